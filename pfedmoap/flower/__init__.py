"""pFedMoAP on Flower: a ServerApp with a per-client-experts Strategy, and a ClientApp whose gate stays on its node.

    from pfedmoap import make_config
    from pfedmoap.flower import run_simulation
    history = run_simulation(make_config("synthetic", rounds=3), out="runs/flower-demo")

Needs the optional extra: ``pip install 'pfedmoap[flower]'``. The core library never imports flwr.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # one clear line instead of a deep traceback
    raise ImportError("pfedmoap.flower needs Flower: pip install 'pfedmoap[flower]'") from exc

from .simulation import run_simulation  # noqa: E402
from .strategy import PFedMoAPStrategy  # noqa: E402
from .task import config_from_run_config  # noqa: E402

__all__ = ["PFedMoAPStrategy", "config_from_run_config", "run_simulation"]
