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

from typing import TYPE_CHECKING  # noqa: E402

from .._lazy import lazy_exports  # noqa: E402

if TYPE_CHECKING:
    from .run_config import config_from_run_config
    from .simulation import run_simulation
    from .strategy import PFedMoAPStrategy

# loaded on first use: the ClientApp (pfedmoap.flower.client_app) must import without torch
_EXPORTS = {"run_simulation": "simulation", "PFedMoAPStrategy": "strategy", "config_from_run_config": "run_config"}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = ["PFedMoAPStrategy", "config_from_run_config", "run_simulation"]
