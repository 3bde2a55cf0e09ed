"""Reading the files a run depends on: every failure is one :class:`~pfedmoap.base.errors.UserError` line.

A file the library reads (a saved ``config.json``, ``metrics.jsonl``, ``summary.json``, a checkpoint, a weights
file, a suite or a preset) can be missing, a folder, unreadable, empty, truncated, binary where text belongs, text
where a torch file belongs, or valid but of another shape. Each reader here turns all of those into one line that
names the file, says what it was meant to be (``what``) and what is wrong with it. Nothing here writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError

PathLike = str | os.PathLike


def os_reason(exc: OSError) -> str:
    """A short, human reason for an OSError (no errno numbers, no repeated path)."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def bad_file(path: PathLike, what: str, reason: str) -> UserError:
    """The one-line error for a file that is not what it should be."""
    return UserError(f"{what} {str(path)!r} cannot be used: {reason}")


def read_bytes(path: PathLike, what: str) -> bytes:
    """The file's bytes; missing, a folder or unreadable is one UserError line."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise bad_file(path, what, os_reason(exc)) from None


def read_text(path: PathLike, what: str) -> str:
    """The file as UTF-8 text; binary contents are one UserError line."""
    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_file(path, what, "not UTF-8 text (binary or damaged)") from None


def parse_json(text: str, path: PathLike, what: str, kind: type = dict) -> Any:
    """``text`` (the contents of ``path``) as JSON of type ``kind``; anything else is one UserError line."""
    if not text.strip():
        raise bad_file(path, what, "the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_file(path, what, f"not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise bad_file(path, what, "not JSON this reader accepts (nested too deeply)") from None
    if not isinstance(data, kind):
        raise bad_file(path, what, f"it holds a JSON {_json_type(data)}, not a JSON {_json_type(kind())}")
    return data


def read_json(path: PathLike, what: str, kind: type = dict) -> Any:
    """A JSON file whose top level is a ``kind`` (an object by default)."""
    return parse_json(read_text(path, what), path, what, kind)


def read_jsonl(path: PathLike, what: str, torn_tail: bool = False) -> list[dict[str, Any]]:
    """A JSON-lines file of objects. With ``torn_tail``, a last line without its newline that does not parse is
    dropped: the line a process killed in the middle of an append left behind."""
    text = read_text(path, what)
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            if torn_tail and number == len(lines):  # no newline after it: the tail of an interrupted append
                break
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise bad_file(path, what, f"line {number} is not JSON ({msg})") from None
        if not isinstance(record, dict):
            raise bad_file(path, what, f"line {number} holds a JSON {_json_type(record)}, not an object")
        records.append(record)
    return records


def load_torch(path: PathLike, what: str) -> Any:
    """A file written by ``torch.save``, loaded with ``weights_only=True`` onto the CPU. A truncated, foreign, text
    or empty file (torch's unpickler raises anything from EOFError to IndexError on those) is one UserError line."""
    import torch

    try:
        if Path(path).stat().st_size == 0:
            raise bad_file(path, what, "the file is empty")
        return torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except OSError as exc:
        raise bad_file(path, what, os_reason(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the unpickler's errors on a damaged file have no common type
        raise bad_file(path, what, f"not a torch file this version can read ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """``Type: the first line of the message`` (some libraries' messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "number"


@contextlib.contextmanager
def replacing(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """Like :func:`atomic_file`, but the new file gets the mode the umask gives (a run's files, shared weights),
    not 0600: a temporary file of a name unique to this writer beside ``path``, flushed and fsynced, then renamed
    over it; removed on any error, so ``path`` is the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb" if binary else "x") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def cache_dir() -> Path:
    """Where pretrained weights are cached: ``$PFEDMOAP_CACHE`` if set, else ``~/.cache/pfedmoap``."""
    env = os.environ.get("PFEDMOAP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pfedmoap"
