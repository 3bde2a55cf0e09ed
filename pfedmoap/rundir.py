"""The run directory: ``config.json``, ``metrics.jsonl`` (one object per round), ``summary.json``, ``checkpoints/``."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace ``path`` only once whole: a temporary file in the same folder (mode
    0600), flushed and fsynced, then renamed over ``path``. On any error the temporary file is removed and ``path``
    is left as it was, so a killed process leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", config)

    def append_round(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
            f.flush()

    def write_rounds(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with exactly these rounds, atomically (used when resuming)."""
        path = self.path / "metrics.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, default=_jsonable) + "\n" for r in records))
        os.replace(tmp, path)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / "summary.json", summary)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rounds of a run directory's ``metrics.jsonl``, as the JSON objects written there."""
    lines = Path(path, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
