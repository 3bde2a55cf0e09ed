"""Optional TensorBoard logging of a run's rounds (``--tensorboard``; ``pip install 'pfedmoap[tensorboard]'``).

One event file per run, under ``RUN_DIR/tensorboard/``, written through ``torch.utils.tensorboard``. Per round
(the step is the round index): mean and std client accuracy (and base / novel / HM under base2novel), every
client's accuracy as a histogram, bytes down and up, the round's seconds and each phase's, failed and refused
uploads, and the gate's attention per expert slot (local first, then the non-local experts in the order sent),
averaged over the clients that have a gate. Both engines log the same :class:`~pfedmoap.engine.records.RoundRecord`.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..base.errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config
    from .records import RoundRecord
    from .rundir import RunDir

INSTALL_HINT = "--tensorboard needs TensorBoard: pip install 'pfedmoap[tensorboard]'"


def check_available() -> None:
    """Refuse ``--tensorboard`` before a run starts when the package is missing (one line)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(INSTALL_HINT)


class TensorBoardLog:
    """Writes each finished round's record as TensorBoard scalars (and a histogram of client accuracies)."""

    def __init__(self, run_dir: str | Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.path))

    def add(self, record: RoundRecord) -> None:
        step, add = record.round, self.writer.add_scalar
        finite = [a for a in record.client_acc if not math.isnan(a)]
        if not math.isnan(record.mean_acc):
            add("accuracy/mean", record.mean_acc, step)
            add("accuracy/std", record.std_acc, step)
        for name, value in record.split_acc.items():  # base2novel: base, novel, hm
            add(f"accuracy/{name}", value, step)
        if finite:
            self.writer.add_histogram("accuracy/clients", torch.tensor(finite), step)
        add("bytes/down", record.bytes_down, step)
        add("bytes/up", record.bytes_up, step)
        add("time/round", record.seconds, step)
        for phase, seconds in record.phase_seconds.items():
            add(f"time/{phase}", seconds, step)
        add("reliability/failed", record.num_failed, step)
        add("reliability/rejected", record.num_rejected, step)
        weights = [w for w in record.client_attention.values() if w]
        for slot in range(max((len(w) for w in weights), default=0)):
            at = [w[slot] for w in weights if len(w) > slot]
            label = "local" if slot == 0 else f"expert{slot}"
            add(f"gate_attention/{slot:02d}_{label}", sum(at) / len(at), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(cfg: Config, run_dir: RunDir | None) -> TensorBoardLog | None:
    """The run's TensorBoard log when ``cfg.tensorboard`` is on (None otherwise); it lives in the run directory."""
    if not cfg.tensorboard:
        return None
    if run_dir is None:
        raise ConfigError("tensorboard=True writes into the run directory: give the run an out directory")
    return TensorBoardLog(run_dir.path)
