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

from typing import TYPE_CHECKING, Any  # noqa: E402

if TYPE_CHECKING:
    from .simulation import run_simulation
    from .strategy import PFedMoAPStrategy
    from .task import config_from_run_config

# loaded on first use: the ClientApp (pfedmoap.flower.client_app) must import without torch
_EXPORTS = {"run_simulation": "simulation", "PFedMoAPStrategy": "strategy", "config_from_run_config": "task"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PFedMoAPStrategy", "config_from_run_config", "run_simulation"]
