"""A private, local SuperLink for ``--engine flower``: Flower's simulation runtime, reached with ``flwr run``.

Flower deprecates the ``flwr.simulation.run_simulation`` call; the supported way into its simulation engine is
``flwr run`` against a SuperLink started with ``--simulation``. ``--engine flower`` therefore starts one such
SuperLink per run on a free loopback port, with its own ``FLWR_HOME`` (so it never touches the user's Flower
configuration or their own local SuperLink), submits the run with ``flwr run --stream``, and stops it again.

Flower's SuperLink starts a SuperExec in a session of its own, which starts ``flwr-simulation`` and Ray; stopping
the SuperLink does not stop them (measured with flwr 1.42: a SIGTERM mid-run left the SuperLink, the simulation
and Ray's actors running). So the SuperLink runs under a small supervisor (``python -m
pfedmoap.flower.local_link``) in a session of its own, which takes the whole process tree down, every process group
in it included, when it is told to, when the SuperLink exits, or when the process that started it dies (also by
SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.errors import RunFailed

CONNECTION = "pfedmoap-local"  # the connection name in the private FLWR_HOME/config.toml
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink to answer its health check
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the loopback never goes through a proxy
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_command(name: str) -> str:
    """The path of one of Flower's commands (``flwr``, ``flower-superlink``): next to this Python first, so an
    environment that is not activated still finds its own Flower."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise RunFailed(f"Flower's {name} command is not installed next to {sys.executable} or on PATH")
    return found


def flower_path(path: str) -> str:
    """``PATH`` with this Python's ``bin`` folder first. Flower's processes start each other by name (the SuperLink
    starts ``flower-superexec``, the SuperExec ``flwr-simulation`` or ``flwr-clientapp``), so from a virtual
    environment that is not activated (a scheduler, an IDE, a notebook kernel) they would look for them on PATH and
    not find them, or find another environment's Flower."""
    here = str(Path(sys.executable).parent)  # not resolved: a venv's python is a link into the base interpreter
    return os.pathsep.join([here, *(p for p in path.split(os.pathsep) if p and p != here)])


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process of a local run: this Python's commands first on PATH, a private
    FLWR_HOME, no update check (these machines may have no internet), and the environment pfedmoap runs in (no
    per-run ``uv sync``)."""
    env = {
        **os.environ,
        "PATH": flower_path(os.environ.get("PATH", "")),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    }
    # every hop is on the loopback: an HTTP(S)_PROXY set for the package registries must not carry it
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, [env.get(key, ""), "127.0.0.1", "localhost"]))
    return env


@dataclass
class RunStatus:
    """How a Flower run ended, as the SuperLink reports it (``flwr ls --run-id``)."""

    run_id: str
    status: str  # "finished:completed", "finished:failed", "finished:stopped", ...
    details: str

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class LocalSuperLink:
    """One SuperLink in simulation mode on ``127.0.0.1``, alive inside the ``with`` block.

    ``work`` is a scratch folder for its ``FLWR_HOME`` and its log (``superlink.log``). Use :meth:`run` to submit a
    Flower App with ``flwr run``.
    """

    def __init__(self, work: Path):
        self.work = Path(work)
        self.home = self.work / "flwr-home"
        self.log_path = self.work / "superlink.log"
        self.port = 0
        self.env = flower_env(self.home)
        self._supervisor: subprocess.Popen | None = None

    def __enter__(self) -> LocalSuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            self.port = _free_port()
            (self.home / "config.toml").write_text(
                f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
            )
            link = [
                flower_command("flower-superlink"), "--insecure", "--simulation",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port),
            ]  # fmt: skip
            self._supervisor = start_supervised(link, self.log_path, self.env)
            if self._wait_ready():
                return self
            self._stop()
        raise RunFailed(f"the local Flower SuperLink did not start: {_tail(self.log_path)}")

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self._supervisor is not None
        while time.monotonic() < deadline and self._supervisor.poll() is None:
            try:
                with _DIRECT.open(f"http://127.0.0.1:{self.port}/health", timeout=0.5) as reply:
                    if reply.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def _stop(self) -> None:
        proc, self._supervisor = self._supervisor, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # the supervisor stops the tree: SIGTERM, a grace period, SIGKILL
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def run(
        self,
        app: Path,
        run_config: Path,
        federation_config: Mapping[str, Any],
        log: Callable[[str], None],
    ) -> RunStatus:
        """``flwr run APP --stream`` with the run config file and the federation config; every line Flower prints is
        passed to ``log``. Returns the run's final status."""
        command = [
            flower_command("flwr"), "run", str(app), CONNECTION, "--stream", "--run-config", str(run_config),
            "--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items()),
        ]  # fmt: skip
        run_id = None
        strip = not sys.stdout.isatty()
        with subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    line = line.rstrip("\n")
                    if run_id is None and (match := _RUN_ID.search(_ANSI.sub("", line))):
                        run_id = match.group(1)
                    log(_ANSI.sub("", line) if strip else line)
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
        if run_id is None:
            said = _tail(self.log_path)  # the scratch folder with the log goes when the run ends
            raise RunFailed(f"flwr run did not start the run (exit code {code}); the SuperLink said: {said}")
        return self.wait(run_id)

    def wait(self, run_id: str, timeout: float = 60.0) -> RunStatus:
        """The run's status once it has finished (the log stream can end a moment before the run does)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status.status.startswith("finished") or time.monotonic() >= deadline:
                return status
            time.sleep(0.5)

    def status(self, run_id: str) -> RunStatus:
        """The SuperLink's record of one run."""
        reply = subprocess.run(
            [flower_command("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        try:
            (record,) = [r for r in json.loads(reply.stdout)["runs"] if str(r["run-id"]) == run_id]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            said = (reply.stdout + reply.stderr)[-300:]
            raise RunFailed(f"flwr ls gave no status for run {run_id}: {said}") from None
        return RunStatus(run_id, str(record.get("status", "")), str(record.get("status-details", "")))


def _toml(value: Any) -> str:
    """A value as TOML (the syntax of ``--run-config`` / ``--federation-config`` values and files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml_table(table: Mapping[str, Any]) -> str:
    """A flat table as TOML ``key = value`` lines."""
    return "".join(f"{json.dumps(key)} = {_toml(value)}\n" for key, value in table.items())


def write_toml_table(path: Path, table: Mapping[str, Any]) -> None:
    """A flat TOML file (what ``flwr run --run-config FILE.toml`` reads)."""
    path.write_text(toml_table(table))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"no log at {path}"
    return " | ".join(line.strip() for line in text[-lines:]) or f"nothing in {path}"


# ------------------------------------------------------------------------------------------ the supervisor
def start_supervised(command: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Start ``command`` under the supervisor, in a session of its own, tied to this process's life."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pfedmoap.flower.local_link", "--parent", str(os.getpid()), "--", *command],
            env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _processes() -> dict[int, tuple[int, int, bool]]:
    """Every process on the machine: pid -> (parent pid, process group, is a zombie). From ``/proc`` on Linux
    (slim container images often have no ``ps``), else from ``ps`` (macOS)."""
    table = {}
    if Path("/proc/self/stat").is_file():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:  # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0] in ("Z", "X"))
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[:3]):
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[3].startswith("Z"))
    return table


def process_tree(root: int, groups: set[int]) -> tuple[set[int], set[int]]:
    """The live pids under ``root`` (itself included) and the process groups they are in (not the caller's), plus
    the pids still in the already known ``groups`` (a process whose parent died is re-parented, but keeps its
    group).

    Zombies link the tree (a dead child that started a session still names its group) but are not returned: they
    are dead already, and one whose parent is gone may never be reaped (a container's init often does not), so
    waiting for it would only wait out the grace period.
    """
    table = _processes()
    tree = {root} if root in table else set()
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    # the caller's own group is never swept: it holds the caller itself (and the `ps` it may just have run)
    found = (groups | {table[pid][1] for pid in tree}) - {os.getpgid(0)}
    tree |= {pid for pid, (_, pgid, _) in table.items() if pgid in found}
    return {pid for pid in tree if not table[pid][2]}, found


def stop_tree(root: int, groups: set[int], grace: float) -> None:
    """SIGTERM every process of the tree, wait up to ``grace`` seconds, then SIGKILL what is left (by group too)."""
    me = os.getpid()
    tree, groups = process_tree(root, groups)
    tree.discard(me)
    for sig in ((signal.SIGTERM,) if grace > 0 else ()) + (signal.SIGKILL,):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL:
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            tree = {p for p in process_tree(root, groups)[0] if p != me}
            if not tree:
                return
            time.sleep(0.1)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is not a zombie (dead, its parent has not reaped it yet; on
    Linux, where ``/proc`` tells)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if not Path("/proc/self/stat").is_file():
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False  # gone meanwhile


def supervise(parent: int, command: Sequence[str], poll: float = 0.05) -> int:
    """Run ``command``; stop its whole tree when SIGTERM arrives (gracefully), or at once when it exits or when
    ``parent`` dies (the run is over either way). Returns the command's exit code, or 0 when told to stop."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then tells us
    child = subprocess.Popen(list(command), stdin=subprocess.DEVNULL)
    groups: set[int] = set()
    last_scan = 0.0
    while not stop.is_set() and child.poll() is None and pid_alive(parent) and os.getppid() == parent:
        if time.monotonic() - last_scan > 1.0:  # remember the groups the tree makes (SuperExec starts its own)
            groups |= process_tree(child.pid, groups)[1]
            last_scan = time.monotonic()
        stop.wait(poll)
    stop_tree(child.pid, groups, grace=3.0 if stop.is_set() else 0.0)
    code = child.wait()
    return 0 if stop.is_set() else code


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pfedmoap.flower.local_link", description=supervise.__doc__)
    parser.add_argument("--parent", type=int, required=True, help="stop everything when this process is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run and supervise")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to supervise after --")
    return supervise(args.parent, command)


if __name__ == "__main__":
    sys.exit(_main())
