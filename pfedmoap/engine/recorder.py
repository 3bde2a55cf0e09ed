"""A run's bookkeeping, once for every engine: what happens when a round finishes and when the run ends.

At the start: ``config.json`` (a new run) or ``metrics.jsonl`` made to match the checkpoint (a resumed one). Per
finished round: its line in ``metrics.jsonl``, the checkpoint (``checkpoints/last.pt``, atomically), the
TensorBoard step (``--tensorboard``) and the log line. At the end: ``summary.json`` and the :class:`History`. The
in-process engine (:meth:`pfedmoap.engine.federation.Federation.run`) and the Flower strategy each hand their records to
one :class:`RunRecorder`; what the checkpoint holds is the engine's (``state``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import checkpoint
from .records import History, RoundRecord
from .tensorboard import TensorBoardLog, open_board

if TYPE_CHECKING:
    from ..config import Config
    from .rundir import RunDir


class RunRecorder:
    """Writes a run's rounds and summary into its run directory (none: only the log line and the History).

    ``state`` returns what a checkpoint holds (the engine's ``state_dict``); it is called once per round, after the
    round's record is made. Open the TensorBoard log with :meth:`open` (a context manager closes it).
    """

    def __init__(
        self, cfg: Config, run_dir: RunDir | None, log: Callable[[str], None], state: Callable[[], dict[str, Any]]
    ):
        self.cfg, self.run_dir, self.log, self.state = cfg, run_dir, log, state
        self.board: TensorBoardLog | None = None

    def open(self) -> RunRecorder:
        """Open the TensorBoard log when the config asks for one (it lives in the run directory)."""
        if self.board is None:
            self.board = open_board(self.cfg, self.run_dir)
        return self

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def __enter__(self) -> RunRecorder:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin(self, meta: dict[str, Any]) -> None:
        """A new run: ``config.json``, the config with the run's facts under ``_meta`` (versions, device, engine)."""
        if self.run_dir is not None:
            self.run_dir.write_config({**self.cfg.to_dict(), "_meta": meta})

    def resumed(self, rounds: list[RoundRecord]) -> None:
        """A run continued from its checkpoint: ``metrics.jsonl`` rewritten to exactly the checkpoint's rounds (a
        kill between the two writes of a round can leave one line more)."""
        if self.run_dir is not None:
            checkpoint.checkpoint_path(self.run_dir.path).parent.mkdir(parents=True, exist_ok=True)
            self.run_dir.write_rounds([r.to_json() for r in rounds])

    def round(self, record: RoundRecord, total: int) -> None:
        """A finished round (``total``: the run's last round index, for the log line)."""
        if self.run_dir is not None:
            self.run_dir.append_round(record.to_json())
            checkpoint.save(self.state(), checkpoint.checkpoint_path(self.run_dir.path))
        if self.board is not None:
            self.board.add(record)
        self.log(record.line(total))

    def finish(
        self, rounds: list[RoundRecord], summary: dict[str, Any], driver: Any, federation: Any = None
    ) -> History:
        """The end of the run: ``summary.json`` and the run's :class:`History`."""
        if self.run_dir is not None:
            self.run_dir.write_summary(summary)
        path = self.run_dir.path if self.run_dir is not None else None
        return History(self.cfg, rounds, summary, path, driver, federation)
