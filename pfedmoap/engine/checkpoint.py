"""The checkpoint format: everything a run's remaining rounds depend on, written atomically after every round.

A checkpoint holds the server side (the round driver: pool, P_g, RNG streams, DP releases, the rounds so far)
and every client's private state, as plain tensors and Python containers, so that it loads with
``torch.load(weights_only=True)``. ``--resume`` continues from it exactly (tests/test_resume.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..base.errors import UserError
from ..base.files import first_line, load_torch
from .rundir import RunDir

FORMAT = 2  # bump when the layout below changes
LAST_CHECKPOINT = "last.pt"


def checkpoint_path(run_dir: Path) -> Path:
    """Where a run directory keeps its last complete round's checkpoint."""
    return Path(run_dir) / "checkpoints" / LAST_CHECKPOINT


def save(state: dict[str, Any], path: Path) -> None:
    """Write the state atomically: a kill at any moment leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save({"format": FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, permissions: the previous checkpoint is still intact
        tmp.unlink(missing_ok=True)
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"could not write checkpoint {str(path)!r} ({reason}); the last complete round's checkpoint is "
            "intact: free space and continue with --resume"
        ) from None


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint; a damaged, foreign or other-format file is one UserError line."""
    state = load_torch(path, "checkpoint")
    found = state.get("format") if isinstance(state, dict) else None
    if found != FORMAT:
        what = f"format {found!r}" if isinstance(state, dict) else f"a {type(state).__name__}, not a checkpoint"
        raise UserError(
            f"checkpoint {str(path)!r} cannot be used: {what}, this pfedmoap reads format {FORMAT} (another version "
            "or another file)"
        )
    return state


def resume_into(target: Any, run_dir: RunDir) -> None:
    """Restore ``run_dir``'s last checkpoint, if it has one, into ``target`` (an engine with ``load_state_dict`` and
    ``rounds``), then check that the run's ``metrics.jsonl`` belongs with it; one UserError line otherwise."""
    ckpt = checkpoint_path(run_dir.path)
    if ckpt.exists():
        restore(target, ckpt)
    run_dir.check_resumable([r.to_json() for r in target.rounds])


def restore(target: Any, path: Path) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``target`` (an engine's ``load_state_dict``) and return it. A checkpoint
    that reads but does not fit (missing entries, another run's shapes or client count) is one UserError line; the
    caller drops ``target`` then, which may be half loaded."""
    state = load(path)
    try:
        target.load_state_dict(state)
    except UserError as exc:
        raise UserError(f"checkpoint {str(path)!r} cannot be used: {exc}") from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise UserError(
            f"checkpoint {str(path)!r} cannot be used: it does not fit the run's config.json ({first_line(exc)})"
        ) from None
    return state
