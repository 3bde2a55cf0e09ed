"""The run directory: ``config.json``, ``metrics.jsonl`` (one object per round), ``summary.json``, ``checkpoints/``."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..base.errors import UserError
from ..base.files import bad_file, read_jsonl, replacing

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file."""
    with replacing(path) as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.write("\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunDir:
    """A run's output folder. Creating one over another run is refused: nothing is ever overwritten."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def check(cls, path: str | os.PathLike) -> None:
        """Refuse (UserError) a path that is a file or already holds a run; creates nothing."""
        run = cls(path)
        try:
            exists, is_dir = run.path.exists(), run.path.is_dir()
            held = [name for name in RUN_FILES if (run.path / name).exists()]
        except OSError as exc:  # a name too long, a component that is a file, no permission to look
            raise UserError(f"out={str(run.path)!r} cannot be used ({exc.strerror or type(exc).__name__})") from None
        if exists and not is_dir:
            raise UserError(f"out={str(run.path)!r} exists and is not a directory")
        if held:
            raise UserError(f"out={str(run.path)!r} already holds a run ({held[0]}); choose a new --out directory")

    @classmethod
    def create(cls, path: str | os.PathLike) -> RunDir:
        cls.check(path)
        run = cls(path)
        try:
            (run.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # read-only, a parent that is a file, no permission
            raise UserError(f"out={str(run.path)!r} cannot be created ({exc.strerror or type(exc).__name__})") from None
        return run

    def check_writable(self) -> None:
        """Refuse (UserError) a run folder this process cannot write to (read-only, full, not ours): a resumed run
        appends to it, and it should say so before it spends any time."""
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise UserError(
                f"run directory {str(self.path)!r} cannot be written ({exc.strerror or type(exc).__name__}); a run "
                "writes its rounds there"
            ) from None

    def write_config(self, config: dict[str, Any]) -> None:
        with self._writing("config.json"):
            write_json_atomic(self.path / "config.json", config)

    def append_round(self, record: dict[str, Any]) -> None:
        with self._writing("metrics.jsonl"), open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()

    def write_rounds(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with exactly these rounds, atomically (used when resuming)."""
        with self._writing("metrics.jsonl"), replacing(self.path / "metrics.jsonl") as f:
            f.write("".join(json.dumps(r, default=_jsonable) + "\n" for r in records))

    def write_summary(self, summary: dict[str, Any]) -> None:
        with self._writing("summary.json"):
            write_json_atomic(self.path / "summary.json", summary)

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """A failed write of a run file (disk full, the folder made read-only) is one UserError line; the files
        written before it are whole (each write replaces its file atomically, or appends one line)."""
        try:
            yield
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise UserError(
                f"could not write {str(self.path / name)!r} ({reason}); the last complete round's checkpoint is "
                "intact: free space and continue with --resume"
            ) from None

    def check_resumable(self, rounds: list[dict[str, Any]]) -> None:
        """Refuse (one UserError line, nothing written) a ``metrics.jsonl`` that does not belong with the checkpoint
        being resumed, whose rounds are ``rounds`` (their JSON records). A run appends a round's line, then
        checkpoints: the file holds the checkpoint's rounds, perhaps one more line, complete or torn by a kill
        (that line is dropped when the file is rewritten). A missing file is rewritten from the checkpoint."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        what = "the resumed run's metrics.jsonl"
        lines = read_jsonl(path, what, torn_tail=True)
        for number, line in enumerate(lines, 1):
            if not isinstance(line.get("round"), int) or isinstance(line.get("round"), bool):
                raise bad_file(path, what, f"line {number} has no round number (another file?)")
        saved = [(r["round"], r.get("mean_acc")) for r in rounds]
        found = [(r["round"], r.get("mean_acc")) for r in lines]
        if found[: len(saved)] != saved or len(found) > len(saved) + 1:
            raise bad_file(
                path, what, f"its {len(found)} rounds do not match the checkpoint's {len(saved)} (another run's file?)"
            )


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rounds of a run directory's ``metrics.jsonl``, as the JSON objects written there (one UserError line for
    a damaged file)."""
    return read_jsonl(Path(path, "metrics.jsonl"), "metrics file")
