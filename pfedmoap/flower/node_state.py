"""A node's private client state on its own disk (node config ``state-dir``), so that a SuperNode restarted mid-run
resumes with its gate, and a resumed server finds every node's state as it was after the last finished round.

Flower keeps a node's ``context.state`` in the SuperNode's memory: a SuperNode that restarts comes back with an
empty one. With ``state-dir`` set, every message's handler also writes the state it leaves behind (prompt, private
gate, RNG, last experts, evaluation cache, a method's private tensors: the ``pfedmoap.*`` records of
``context.state``) to ``STATE_DIR/<run-token>/partition-<pid>.<round>-<phase>.state``, atomically. The run token is
the server's, made once per run (and kept by a resumed run), so two runs never read each other's states.

Every state is tagged with the message that left it: ``(round, phase)``, the train phase of a round before its
evaluate phase; a method that exchanges several times per round (DP-FPL) tags its later train messages
``(round, phase, exchange)`` (file ``<round>-<phase>.<exchange>.state``). A message loads the newest state, in
``context.state`` or on disk, made *before* it: after a server resume that redoes a round, the node starts that round
from the state the interrupted round started from, not from the one it left half-way. Every state of the newest round
is kept, and older ones up to :data:`KEEP` in all (at least one).

A file holds one JSON header line (format, run token, partition, tag, payload length and checksum) and Flower's
protobuf encoding of the records; no pickle. A file that is truncated, corrupt or made for another run or
partition is not used: the node says why in its reply (the server logs it) and starts from the next older state,
or fresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from ..base.files import atomic_file, first_line

FORMAT = 1
KEEP = 3  # states kept per partition: the newest, and enough older ones to redo an interrupted round
PREFIX = "pfedmoap."  # the context.state records that are the client's state

Tag = tuple[int, ...]  # (round, phase), or (round, phase, exchange) for a round's later exchanges (DP-FPL)
PHASES = {"train": 0, "evaluate": 1, "query": -1}


def message_tag(round_index: int, message_type: str, exchange: int = 0) -> Tag:
    """The tag of a message: its round and its phase within the round (train before evaluate); a train message of a
    round's later exchange (a method that synchronises several times per round) also its exchange, so that its
    tag sorts after the earlier exchanges' and before the round's evaluation."""
    tag = (int(round_index), PHASES.get(message_type, -1))
    return (*tag, int(exchange)) if exchange else tag


def state_tag(state: RecordDict) -> Tag | None:
    """The tag a ``context.state`` was saved with (None: no client state in it yet)."""
    meta = state.get(PREFIX + "tag")
    if meta is None:
        return None
    exchange = int(meta["exchange"]) if "exchange" in meta else 0
    return (int(meta["round"]), int(meta["phase"]), *([exchange] if exchange else []))


def client_records(state: RecordDict) -> RecordDict:
    """The client-state records of a ``context.state`` (the ``pfedmoap.*`` ones), as a new RecordDict."""
    return RecordDict({name: record for name, record in state.items() if name.startswith(PREFIX)})


def replace_client_records(state: RecordDict, records: RecordDict | None = None) -> None:
    """Drop the client-state records of ``state``, then put ``records`` (a saved state) in their place."""
    for name in list(client_records(state)):
        del state[name]
    for name, record in (records or RecordDict()).items():
        state[name] = record


def encode_records(records: RecordDict) -> bytes:
    """Flower's protobuf encoding of a RecordDict (what a state file and a worker request carry; no pickle)."""
    return recorddict_to_proto(records).SerializeToString()


def decode_records(data: bytes) -> RecordDict:
    """The RecordDict of :func:`encode_records`; raises ``ValueError`` on bytes that do not decode."""
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError
        raise ValueError(f"does not decode ({type(exc).__name__})") from None
    return recorddict_from_proto(proto)


@dataclass
class Loaded:
    """What :meth:`NodeStateStore.load_before` found: the state (None: none usable) and what was wrong on the way."""

    state: RecordDict | None
    tag: Tag | None
    problems: list[str]


class NodeStateStore:
    """One partition's saved states for one run, in ``root/<run_token>/``."""

    def __init__(self, root: str | os.PathLike, run_token: str, pid: int):
        if not re.fullmatch(r"[0-9a-f]{8,64}", run_token):
            raise ValueError(f"run token {run_token!r} is not a hex string")
        self.folder = Path(root) / run_token
        self.run_token = run_token
        self.pid = pid

    def _files(self) -> list[tuple[Tag, Path]]:
        pattern = re.compile(rf"partition-{self.pid}\.(\d+)-(-?\d+)(?:\.([1-9]\d*))?\.state")
        found = []
        if self.folder.is_dir():
            for path in self.folder.iterdir():
                m = pattern.fullmatch(path.name)
                if m:
                    tag = (int(m.group(1)), int(m.group(2)), *([int(m.group(3))] if m.group(3) else []))
                    found.append((tag, path))
        return sorted(found)

    def save(self, state: RecordDict, tag: Tag) -> Path:
        """Write the client records of ``state`` for ``tag`` atomically; keep the newest :data:`KEEP`."""
        payload = encode_records(client_records(state))
        header = {
            "format": FORMAT,
            "run": self.run_token,
            "partition": self.pid,
            "tag": list(tag),
            "length": len(payload),
            "checksum": hashlib.blake2b(payload, digest_size=16).hexdigest(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        exchange = f".{tag[2]}" if len(tag) > 2 else ""
        target = self.folder / f"partition-{self.pid}.{tag[0]}-{tag[1]}{exchange}.state"
        with atomic_file(target) as f:
            f.write(json.dumps(header).encode() + b"\n" + payload)
        # every state of the newest round (its exchanges) and the newest older ones, KEEP in all, at least one older:
        # a resumed server redoes the round from the state before its first message
        files = self._files()
        newest = [p for t, p in files if t[0] == files[-1][0][0]]
        older = [p for t, p in files if t[0] < files[-1][0][0]]
        for old in older[: -max(1, KEEP - len(newest))]:
            old.unlink(missing_ok=True)
        return target

    def load_before(self, tag: Tag) -> Loaded:
        """The newest whole state saved before ``tag``; files that do not load are skipped and said."""
        problems = []
        for saved, path in reversed(self._files()):
            if saved >= tag:
                continue
            try:
                return Loaded(self._read(path, saved), saved, problems)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is skipped, whatever it raised
                problems.append(f"{path.name}: {exc if isinstance(exc, (OSError, ValueError)) else first_line(exc)}")
        return Loaded(None, None, problems)

    def _read(self, path: Path, tag: Tag) -> RecordDict:
        raw = path.read_bytes()
        head, sep, payload = raw.partition(b"\n")
        if not sep:
            raise ValueError("no header (truncated)")
        try:
            header = json.loads(head)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("header is not JSON (corrupt)") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object (corrupt)")
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
        if header.get("run") != self.run_token or header.get("partition") != self.pid:
            raise ValueError("made for another run or partition")
        if tuple(header.get("tag", ())) != tag:
            raise ValueError("its tag does not match its name")
        if len(payload) != header["length"]:
            raise ValueError(f"{len(payload)} of {header['length']} bytes (truncated)")
        if hashlib.blake2b(payload, digest_size=16).hexdigest() != header["checksum"]:
            raise ValueError("checksum mismatch (corrupt)")
        return decode_records(payload)
