"""The library's one way in: :func:`run` a config on an engine, :func:`resume` a run directory, whatever made it.

    import pfedmoap

    history = pfedmoap.run(pfedmoap.make_config("synthetic", rounds=3), out="runs/demo")
    history = pfedmoap.run(cfg, engine="flower", out="runs/demo-flower")   # pip install 'pfedmoap[flower]'
    history = pfedmoap.resume("runs/demo")                                 # the engine it was made with

``python -m pfedmoap.train`` is a thin recipe over these two calls.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any

from .base.errors import ConfigError, UserError
from .config import Config
from .engine import launch
from .engine.records import History
from .federated.plan import resolve_config

ENGINES = ("local", "flower")
FLOWER_HINT = "--engine flower needs Flower: pip install 'pfedmoap[flower]'"


def run(
    cfg: Config,
    out: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    *,
    engine: str = "local",
    federation_config: Mapping[str, Any] | None = None,
    round_timeout: float = 3600.0,
) -> History:
    """Run a whole federation and return its :class:`~pfedmoap.engine.records.History`.

    ``engine="local"``: the in-process simulation; it writes a run directory only with ``out`` (or ``cfg.out``).
    ``engine="flower"``: the same run on Flower's simulation engine through ``flwr run`` on a private local
    SuperLink, one SuperNode per client (``pfedmoap.flower.run_simulation``; ``federation_config`` and
    ``round_timeout`` are its options); it always writes a run directory (``out``, ``cfg.out``, or
    ``runs/flower-<preset>-<method>-s<seed>-<time>``). With the same config both engines give the same numbers.
    """
    check_engine_name(engine)
    if engine == "local":
        if federation_config is not None:
            raise ConfigError("federation_config is an option of engine='flower'")
        return launch.run(cfg, out=out, log=log)
    require_flower()
    from .flower.server_app import flower_run_dir
    from .flower.simulation import run_simulation

    cfg = resolve_config(cfg)
    target = out if out is not None else flower_run_dir(cfg, cfg.out)
    return run_simulation(
        cfg, out=target, log=log or print, federation_config=federation_config, round_timeout=round_timeout
    )


def resume(
    path: str | os.PathLike,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    *,
    engine: str | None = None,
) -> History:
    """Continue a killed run from its directory: its saved config, its last complete round's checkpoint, on the
    engine that made it (read from ``config.json``; ``engine``, when given, must be that one). The metrics of a
    resumed run equal an uninterrupted run's (same machine, same config)."""
    run_dir, cfg, meta = launch.saved_run(path)
    made = meta.get("engine", "local")
    launch.check_engine(run_dir, meta, made if engine is None else check_engine_name(engine))
    if made == "local":
        return launch.continue_run(run_dir, cfg, log, progress)
    require_flower()
    from .flower.simulation import run_simulation

    return run_simulation(cfg, out=run_dir.path, log=log or print, resume=True)


def check_engine_name(engine: str) -> str:
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not one of: {', '.join(ENGINES)}")
    return engine


def require_flower() -> None:
    """Refuse the Flower engine (one line) when the extra (flwr with Ray) is not installed."""
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise UserError(FLOWER_HINT)
