"""A deployment node's long-lived worker: the node's world stays in memory across Flower's ClientApp processes.

In flwr 1.42 a SuperNode starts a fresh ``flwr-clientapp`` process for every message (Flower issue #3670). Each
would import torch and open_clip and rebuild the node's world (the frozen CLIP, the dataset, the partition) to
answer one message. With node config ``state-dir`` (and ``worker`` not false), the ClientApp (which imports no
torch) instead hands the message to this worker over a Unix socket in the node's state folder, and the worker
answers it with :func:`pfedmoap.flower.node_handlers.answer`, the same function the in-process path calls.

- **Started on demand** by the first ClientApp process of the node, detached, under a lock (one worker per node
  and code version: the socket's name carries a hash of the code's path and version, so a new app version gets a
  new worker). Its log is ``STATE_DIR/worker.log``.
- **Tied to its SuperNode**: it watches the ClientApp's parent (Flower's SuperExec) and grandparent (the
  SuperNode) and exits within half a second of either ending, of its socket file being removed, or after
  :data:`IDLE_EXIT` seconds without a message. A SuperNode killed mid-round takes its worker with it; restarted,
  it starts a new one.
- **Stateless between messages**: the node's ``context.state`` travels with each message and comes back updated,
  so a worker that dies loses nothing but its in-memory world (the message fails, the server counts the client
  failed for that round, and the next message starts a new worker).
- **No pickle**: a request is a JSON header and Flower's protobuf encoding of the message content and the state;
  the socket file is private to the node's user (mode 0600).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from .._version import __version__
from .local_link import pid_alive
from .node_state import decode_records, encode_records

PROTOCOL = 1
START_TIMEOUT = 300.0  # seconds for a new worker to listen (it imports torch first; 2 busy cores can be slow)
IDLE_EXIT = 1800.0  # a worker with no message for this long exits (the next message starts a new one)
_LEN = struct.Struct("!Q")
_CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding this pfedmoap package (a FAB's, or ours)
IDENTITY = hashlib.blake2b(f"{_CODE_ROOT}|{__version__}|{sys.executable}".encode(), digest_size=6).hexdigest()


def uses_worker(node_config: Mapping[str, Any]) -> bool:
    """Whether this node answers through its worker: it has a ``state-dir`` and ``worker`` is not false."""
    if not node_config.get("state-dir"):
        return False
    value = node_config.get("worker", True)
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"node config worker={value!r} is not a boolean: use worker=true or worker=false")
    return bool(value)


def socket_path(state_dir: str | os.PathLike) -> Path:
    """The worker's socket for this node and code version (under /tmp when the state folder's path is too long for
    a Unix socket)."""
    path = Path(state_dir).resolve() / f"worker-{IDENTITY}.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        digest = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
        path = Path(tempfile.gettempdir()) / f"pfedmoap-worker-{digest}.sock"
    return path


# ------------------------------------------------------------------------------------------ framing
def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    return _recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0])


# ------------------------------------------------------------------------------------------ the ClientApp's side
def forward(kind: str, content: RecordDict, node_config: Mapping[str, Any], state: RecordDict) -> RecordDict:
    """Have the node's worker answer a message; ``state`` (the node's ``context.state``) is replaced by the state
    it returns."""
    state_dir = Path(str(node_config["state-dir"]))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = socket_path(state_dir)
    header = {"protocol": PROTOCOL, "type": kind, "node_config": dict(node_config)}
    request = (json.dumps(header).encode(), encode_records(content), encode_records(state))
    for attempt in range(2):  # a worker that exits (idle) just as this connects is started again, once
        try:
            with _connect(path, state_dir) as sock:
                _send(sock, *request)
                head = json.loads(_recv(sock))
                if not head.get("ok"):
                    raise RuntimeError(str(head.get("error", "the node worker failed")))
                reply, new_state = decode_records(_recv(sock)), decode_records(_recv(sock))
                break
        except ConnectionError:
            if attempt:
                raise RuntimeError(
                    f"the node worker ended while answering a {kind} message (see {state_dir / 'worker.log'})"
                ) from None
    for name in list(state):
        if name not in new_state:
            del state[name]
    for name, record in new_state.items():
        state[name] = record
    return reply


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _watched() -> list[int]:
    """The processes whose end ends the worker: this ClientApp's parent (SuperExec) and its parent (SuperNode)."""
    pids = [os.getppid()]
    with contextlib.suppress(OSError, IndexError, ValueError):
        stat = Path(f"/proc/{pids[0]}/stat").read_text()
        grand = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
        if grand > 1:
            pids.append(grand)
    return pids


def _connect(path: Path, state_dir: Path) -> socket.socket:
    sock = _try_connect(path)
    if sock is not None:
        return sock
    with open(f"{path}.lock", "w") as lock:  # one start per node, however many ClientApp processes ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is not None:
            return sock
        log_path = state_dir / "worker.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_CODE_ROOT, env.get("PYTHONPATH", "")) if p)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pfedmoap.flower.node_worker", "--socket", str(path), "--watch"]
                + [str(p) for p in _watched()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=state_dir,
                env=env,
                start_new_session=True,  # not in the ClientApp's process group: it outlives this process
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise RuntimeError(f"the node worker exited at start with code {proc.returncode} (see {log_path})")
            time.sleep(0.05)
        proc.kill()
        raise RuntimeError(f"the node worker did not start within {START_TIMEOUT:g} s (see {log_path})")


# ------------------------------------------------------------------------------------------ the worker
def serve(path: Path, watch: list[int], idle_exit: float = IDLE_EXIT) -> None:
    """Answer messages on ``path`` one at a time until a watched process ends or the worker is idle too long."""
    from .node_handlers import answer  # torch, open_clip: imported before listening, so the first message is fast

    log = logging.getLogger("pfedmoap.flower.node_worker")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a worker that was killed (the start lock is held: none is listening)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(8)
    server.settimeout(0.5)
    log.info("node worker %s listening on %s (watching %s)", os.getpid(), path, watch)
    last = time.monotonic()
    try:
        # a removed socket file (the node's state folder deleted) also ends the worker
        while all(pid_alive(pid) for pid in watch) and path.exists() and time.monotonic() - last < idle_exit:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                _answer(conn, answer, log)
            last = time.monotonic()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    log.info("node worker %s exits", os.getpid())


def _answer(conn: socket.socket, answer: Any, log: logging.Logger) -> None:
    """Serve one request: the reply and the updated state, or the error the ClientApp raises again."""
    try:
        head = json.loads(_recv(conn))
        content, state = decode_records(_recv(conn)), decode_records(_recv(conn))
    except (ConnectionError, ValueError) as exc:
        log.warning("a malformed request was dropped (%s)", exc)
        return
    if head.get("protocol") != PROTOCOL:  # the socket's name pins the code version, so only a hand-made request
        error = f"the node worker speaks protocol {PROTOCOL}, the request {head.get('protocol')!r}"
        _send(conn, json.dumps({"ok": False, "error": error}).encode())
        return
    start = time.perf_counter()
    try:
        reply = answer(str(head["type"]), content, head["node_config"], state)
    except Exception as exc:  # noqa: BLE001 - the ClientApp raises it again: Flower reports a node error
        log.exception("the %s message failed", head.get("type"))
        _send(conn, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    # logged before the reply leaves: whoever reads the log after receiving the reply finds this line in it
    log.info("answered a %s message in %.2f s", head["type"], time.perf_counter() - start)
    try:
        _send(conn, json.dumps({"ok": True}).encode(), encode_records(reply), encode_records(state))
    except ConnectionError as exc:
        log.warning("the reply to that %s message was lost (%s)", head["type"], exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A pfedmoap Flower node's worker (started by its ClientApp).")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--watch", nargs="*", type=int, default=[])
    parser.add_argument("--idle-exit", type=float, default=IDLE_EXIT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.socket, args.watch, args.idle_exit)


if __name__ == "__main__":
    main()
