"""Faults in a real Flower deployment on the loopback (a SuperLink, SuperNodes in their own processes, `flwr run`):
a SuperNode killed during a run and restarted, a SuperNode that never connects, and SuperNodes that upload NaNs or a
prompt of the wrong shape. Slow (CI runs them)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's CLI is not on PATH"),
]

ROOT = Path(__file__).resolve().parents[1]


class Loopback:
    """A SuperLink and SuperNodes on 127.0.0.1, each its own process group; everything is killed at the end."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        (self.home / "config.toml").write_text(f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.05",
        }
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def superlink(self, database: Path | None = None) -> subprocess.Popen:
        args = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
        return self._wait_port(self._start(args + (["--database", str(database)] if database else []), "link.log"))

    def _wait_port(self, proc: subprocess.Popen) -> subprocess.Popen:
        """``proc`` (a SuperLink) once its port takes connections."""
        import socket

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return proc
            time.sleep(0.1)
        raise RuntimeError("the SuperLink did not start")

    def supernode(self, pid: int, clients: int, extra: str = "") -> None:
        state = self.root / f"node-{pid}"
        config = f"partition-id={pid} num-partitions={clients} state-dir='{state}' feature-cache='{state}/features'"
        config += f" {extra}" if extra else ""
        self.nodes[pid] = self._start(
            ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
             "--port", str(self.port + 10 + pid), "--node-config", config],
            f"supernode-{pid}.log",
        )  # fmt: skip

    def kill_node(self, pid: int) -> None:
        os.killpg(self.nodes[pid].pid, signal.SIGKILL)
        self.nodes[pid].wait()

    def flwr_run(self, run_config: str, app: Path = ROOT) -> subprocess.Popen:
        args = ["flwr", "run", str(app), "loopback", "--stream", "--run-config", run_config]
        return self._start(args, "flwr-run.log")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


_PORTS = itertools.count(19500, 40)  # a fresh range of ports per test: no test waits on another's sockets


@pytest.fixture
def loopback(tmp_path):
    lb = Loopback(tmp_path, port=next(_PORTS))
    try:
        yield lb
    finally:
        lb.close()
        deadline = time.monotonic() + 10  # every node worker ends with its SuperNode
        while time.monotonic() < deadline and _workers(tmp_path):
            time.sleep(0.1)
        assert not _workers(tmp_path)


def _workers(root: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"node_worker --socket {root}"], capture_output=True, text=True).stdout
    return out.split()


def _rounds(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_supernode_killed_mid_run_is_counted_failed_and_rejoins_with_its_gate(loopback, tmp_path):
    run = tmp_path / "run"
    loopback.superlink()
    for pid in range(3):
        loopback.supernode(pid, 3)
    flwr = loopback.flwr_run(f"clients=3 experts=2 rounds=5 round-timeout=20 connect-timeout=120 out='{run}'")
    _wait(lambda: len(_rounds(run)) >= 1, 240, "round 1")
    loopback.kill_node(2)  # in round 2, before its reply: round 2's messages to it get none
    time.sleep(1)
    loopback.supernode(2, 3)  # restarted: a new node id, an empty context.state, the same state-dir
    assert flwr.wait(timeout=400) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]
    assert rounds[0]["num_failed"] == 0
    assert [f["client"] for f in rounds[1]["failed"]] == [2]  # the round completed without it
    assert rounds[-1]["num_failed"] == 0 and rounds[-1]["num_eval_failed"] == 0  # back in the last rounds
    log = (tmp_path / "flwr-run.log").read_text()
    assert "rejoins as partition 2" in log
    assert "partition 2 restored its client state from its node's disk" in log
    assert json.loads((run / "summary.json").read_text())["final_mean_acc"] > 0


def test_a_supernode_that_never_connects_leaves_its_partition_failed(loopback, tmp_path):
    run = tmp_path / "run"
    loopback.superlink()
    for pid in range(2):  # 3 clients, only 2 SuperNodes
        loopback.supernode(pid, 3)
    flwr = loopback.flwr_run(f"clients=3 experts=1 rounds=2 round-timeout=20 connect-timeout=20 out='{run}'")
    assert flwr.wait(timeout=400) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    log = (tmp_path / "flwr-run.log").read_text()
    assert "only 2 of 3 nodes connected within 20 s" in log
    rounds = _rounds(run)
    assert len(rounds) == 2
    for r in rounds:
        assert [f["client"] for f in r["failed"]] == [2]
        assert [f["client"] for f in r["eval_failed"]] == [2]
        assert r["client_acc"][2] != r["client_acc"][2]  # NaN: never evaluated


# a ClientApp that answers as pfedmoap's does, then spoils its training reply as its node config's `fault` says
_FAULTY_APP = """
import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.clientapp import ClientApp

from pfedmoap.flower.client_app import make_client_app

inner = make_client_app()
app = ClientApp()


@app.query()
@app.evaluate()
def passthrough(msg, context):
    return inner(msg, context)


@app.train()
def train(msg, context):
    reply = inner(msg, context)
    fault = context.node_config.get("fault", "")
    if fault and reply.has_content():
        prompt = reply.content["upload"]["prompt"].numpy()
        spoiled = np.full_like(prompt, np.nan) if fault == "nan" else np.zeros((3, 3), prompt.dtype)
        reply.content["upload"] = ArrayRecord({"prompt": Array(spoiled)})
    return reply
"""


def test_nan_and_malformed_uploads_from_real_supernodes_are_refused(loopback, tmp_path):
    """Partition 0's SuperNode uploads NaNs, partition 1's a 3x3 prompt, partition 2's its real prompt, every round:
    both bad uploads are refused with their reasons, never reach the pool or P_g, and the run completes."""
    from pfedmoap.flower.simulation import history_from_run_dir, write_app

    app = write_app(tmp_path / "faulty-app")
    (app / "faulty_client.py").write_text(_FAULTY_APP)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("pfedmoap.flower.client_app:app", "faulty_client:app"))
    run = tmp_path / "run"
    loopback.superlink()
    for pid, fault in enumerate(("fault='nan'", "fault='shape'", "")):
        loopback.supernode(pid, 3, fault)
    flwr = loopback.flwr_run(f"clients=3 experts=2 rounds=2 round-timeout=60 connect-timeout=120 out='{run}'", app)
    assert flwr.wait(timeout=400) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2], (tmp_path / "flwr-run.log").read_text()[-3000:]
    for r in rounds:
        assert sorted(r["rejected_uploads"], key=lambda u: u["client"]) == [  # in the order the replies came
            {"client": 0, "reason": "non-finite values"},
            {"client": 1, "reason": "shape (3, 3) != (16, 64)"},
        ]
        assert r["num_failed"] == 0 and r["num_eval_failed"] == 0
    history = history_from_run_dir(run)
    pool = history.server.pool
    assert sorted(pool) == [2]  # the refused uploads never reached the pool
    assert history.server.global_prompt.isfinite().all()
    assert (history.server.global_prompt == pool[2]).all()  # FedAvg over the one accepted upload


def test_a_deployment_whose_server_died_resumes_with_resume_true(loopback, tmp_path):
    """The SuperLink (with its state in a database file, as in production) and its ServerApp are SIGKILLed (the
    whole tree) after two rounds; a new SuperLink on the same port and database, `flwr run ... resume=true`: the
    SuperNodes, still running, serve the rest from their saved states, and every round equals an uninterrupted
    in-process run's (CPU, 1 thread)."""
    import sys

    from pfedmoap.flower.local_link import stop_tree

    run, ref = tmp_path / "run", tmp_path / "ref"
    args = [
        "--clients",
        "2",
        "--experts",
        "1",
        "--rounds",
        "5",
        "--threads",
        "1",
        "--parallel-clients",
        "1",
        "--no-progress",
    ]
    subprocess.run([sys.executable, "-m", "pfedmoap.train", *args, "--out", str(ref)], cwd=ROOT, env=loopback.env,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    database = tmp_path / "superlink.db"
    link = loopback.superlink(database)
    for pid in range(2):
        loopback.supernode(pid, 2)
    config = f"clients=2 experts=1 rounds=5 round-timeout=60 connect-timeout=120 out='{run}'"
    first = loopback.flwr_run(config)
    _wait(lambda: len(_rounds(run)) >= 2, 300, "round 2")
    stop_tree(link.pid, set(), grace=0)  # the server machine dies: SuperLink, SuperExec, ServerApp
    first.wait(timeout=60)
    time.sleep(1)
    done = len(_rounds(run))
    assert 2 <= done < 5 and not (run / "summary.json").exists()
    loopback.superlink(database)
    second = loopback.flwr_run(f"resume=true round-timeout=60 connect-timeout=120 out='{run}'")
    assert second.wait(timeout=400) == 0, (tmp_path / "flwr-run.log").read_text()[-3000:]
    log = (tmp_path / "flwr-run.log").read_text()
    assert f"resuming {run.resolve()} after round {done}" in log, log[-3000:]
    a, b = _rounds(ref), _rounds(run)
    assert [r["round"] for r in b] == [1, 2, 3, 4, 5], log[-3000:]
    for key in ("client_acc", "sampled", "experts", "bytes_down", "bytes_up"):
        assert [r[key] for r in b] == [r[key] for r in a], key
