"""The in-process engine's whole run: ``run(config)`` and ``resume(run_dir)`` with its run directory, and what
every engine reads back from a run directory (:func:`saved_run`, :func:`check_engine`). The library's entry points,
for either engine, are :mod:`pfedmoap.api`'s."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..base.errors import UserError
from ..base.files import read_json
from ..config import Config
from ..federated.plan import resolve_config, saved_config_from_dict
from . import checkpoint
from .federation import Federation
from .records import History
from .rundir import RunDir


def default_run_dir(cfg: Config) -> Path:
    """``runs/<preset>-<method>-s<seed>-<time>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.preset or cfg.dataset
    return Path("runs") / f"{name}-{cfg.method}-s{cfg.seed}-{stamp}"


def run_meta(fed: Federation) -> dict[str, Any]:
    """``config.json``'s ``_meta``: versions, device, op backends, client sizes, gamma."""
    return {
        "pfedmoap_version": __version__,
        "torch_version": torch.__version__,
        "device": str(fed.device),
        "backends": fed.backends,
        "num_classes": fed.dataset.num_classes,
        "client_train_sizes": [c.data.num_train for c in fed.clients],
        "client_test_sizes": [c.data.num_test for c in fed.clients],
        "prompt_tokens": fed.encoder.length,
        "prompt_width": fed.clip.width,
        "gamma": fed.clip.gamma,
    }


def run(cfg: Config, out: str | Path | None = None, log: Callable[[str], None] | None = None) -> History:
    """Run a whole simulated federation. With ``out`` (or ``cfg.out``), write the run directory there.

    Returns the :class:`~pfedmoap.engine.rounds.History` (per-round records, summary, and the final state).
    """
    cfg = resolve_config(cfg)
    target = out if out is not None else cfg.out
    if target is not None:
        RunDir.check(target)  # fail before any expensive work; nothing is created on a bad config
    fed = Federation(cfg, log=log)
    run_dir = RunDir.create(target) if target is not None else None
    return fed.run(run_dir, meta=run_meta(fed))


def saved_run(path: str | Path) -> tuple[RunDir, Config, dict[str, Any]]:
    """An unfinished run's directory, its saved config and its ``_meta`` (engine, versions); a folder that holds no
    run, a finished run or another version's run is one UserError line."""
    run_dir = RunDir(path)
    config_file = run_dir.path / "config.json"
    if not config_file.is_file():
        raise UserError(f"resume={str(run_dir.path)!r} holds no run (no config.json)")
    if (run_dir.path / "summary.json").exists():
        raise UserError(f"resume={str(run_dir.path)!r} is already finished (summary.json exists)")
    run_dir.check_writable()
    data = read_json(config_file, "the resumed run's config.json")
    meta = data.pop("_meta", None)
    if not isinstance(meta, dict):  # every run directory pfedmoap writes has it
        raise UserError(
            f"the resumed run's config.json {str(config_file)!r} cannot be used: it has no _meta object (not a run "
            "directory pfedmoap wrote)"
        )
    if meta.get("pfedmoap_version", __version__) != __version__:
        raise UserError(
            f"resume={str(run_dir.path)!r} was written by pfedmoap {meta.get('pfedmoap_version')}, "
            f"this is {__version__}"
        )
    try:
        cfg = resolve_config(saved_config_from_dict(data, source=str(config_file)))
    except UserError as exc:
        raise UserError(f"the resumed run's config.json {str(config_file)!r} cannot be used: {exc}") from None
    return run_dir, cfg, meta


def check_engine(run_dir: RunDir, meta: dict[str, Any], engine: str) -> None:
    """Refuse to resume a run with another engine than the one that made it."""
    made = meta.get("engine", "local")
    if made != engine:
        raise UserError(
            f"resume={str(run_dir.path)!r} was made with --engine {made}; resume it with --engine {made}, not {engine}"
        )


def resume(path: str | Path, log: Callable[[str], None] | None = None, progress: bool | None = None) -> History:
    """Continue a run from its directory: the saved config, the last complete round's checkpoint.

    The metrics of a resumed run equal an uninterrupted run's exactly on CPU (same config, same seed).
    """
    run_dir, cfg, meta = saved_run(path)
    check_engine(run_dir, meta, "local")
    return continue_run(run_dir, cfg, log, progress)


def continue_run(
    run_dir: RunDir, cfg: Config, log: Callable[[str], None] | None = None, progress: bool | None = None
) -> History:
    """Continue an in-process run from its directory, its config as :func:`saved_run` read it."""
    if progress is not None:
        cfg = cfg.replace(progress=progress)
    fed = Federation(cfg, log=log)
    checkpoint.resume_into(fed, run_dir)
    fed.log(f"resuming {run_dir.path} after round {fed.rounds[-1].round if fed.rounds else 0}")
    return fed.run(run_dir, resumed=True)
