"""Reading the files a run depends on: every failure is one :class:`~pfedmoap.errors.UserError` line.

A file the library reads (a saved ``config.json``, ``metrics.jsonl``, ``summary.json``, a checkpoint, a weights
file, a suite or a preset) can be missing, a folder, unreadable, empty, truncated, binary where text belongs, text
where a torch file belongs, or valid but of another shape. Each reader here turns all of those into one line that
names the file, says what it was meant to be (``what``) and what is wrong with it. Nothing here writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
