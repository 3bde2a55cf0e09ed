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

from .errors import UserError

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
    """Read a checkpoint; a corrupted, foreign or other-format file is one UserError line."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupted or foreign file: say so in one line
        raise UserError(f"checkpoint {str(path)!r} cannot be read: {type(exc).__name__}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise UserError(f"checkpoint format {found!r} is not {FORMAT} (another version)")
    return state
