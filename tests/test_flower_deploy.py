"""A real Flower deployment on the loopback (profiling/flower_deploy.sh: a SuperLink, SuperNodes in their own
processes, `flwr run`, node workers): it completes, stops everything it started, and its per-round numbers equal
the in-process engine's for the same config (CPU, 1 thread)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower's CLI is not on PATH")
def test_a_loopback_deployment_equals_the_in_process_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    out = tmp_path / "deploy"
    done = subprocess.run(
        ["bash", "profiling/flower_deploy.sh", "-n", "2", "-r", "2", "-p", "19391", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "deploy.txt").read_text()
    assert "2 SuperNodes, 2 of 2 rounds" in report and "failed 0" in report
    assert "security: TLS + SuperNode authentication" in report  # the default deployment is the secure one
    # every process it started has stopped (the node workers go with their SuperNodes)
    left = subprocess.run(["pgrep", "-f", "pfedmoap-deploy\\."], capture_output=True, text=True).stdout.split()
    assert left == [], left

    local = tmp_path / "local"
    subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--clients", "2", "--experts", "1", "--rounds", "2",
         "--threads", "1", "--parallel-clients", "1", "--out", str(local)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    deployed, in_process = _records(out / "run" / "metrics.jsonl"), _records(local / "metrics.jsonl")
    assert [r["client_acc"] for r in deployed] == [r["client_acc"] for r in in_process]
    assert [r["bytes_down"] for r in deployed] == [r["bytes_down"] for r in in_process]
    assert [r["experts"] for r in deployed] == [r["experts"] for r in in_process]


def test_a_killed_flower_simulation_resumes_to_the_uninterrupted_numbers(tmp_path):
    """`--engine flower` killed (SIGKILL, the whole process group: the ServerApp and Ray's workers) after two
    rounds, then `--engine flower --resume RUN_DIR`: the metrics equal an uninterrupted in-process run's (Flower's
    equal the in-process engine's; CPU, 1 thread)."""
    import signal
    import time

    # --parallel-clients 1: the in-process run in the order Flower's nodes train (one client each), bit for bit
    args = [
        "--clients",
        "4",
        "--experts",
        "2",
        "--rounds",
        "6",
        "--threads",
        "1",
        "--parallel-clients",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "pfedmoap.train", *args, "--out", str(ref)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfedmoap.train", "--engine", "flower", *args, "--out", str(killed)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the SuperLink's supervisor (its own session) sees the engine die and takes Flower's processes down: wait for it
    # before counting the rounds, and check it left nothing running
    supervisor = f"pfedmoap.flower.local_link --parent {proc.pid} "
    deadline = time.time() + 30
    while time.time() < deadline and _pgrep(supervisor):
        time.sleep(0.1)
    assert not _pgrep(supervisor), "the local SuperLink outlived the killed engine"
    while time.time() < deadline and (_pgrep("flwr-simulation") or _pgrep("ray::ClientAppActor")):
        time.sleep(0.1)  # SIGKILLed a moment ago: let the kernel finish
    assert not _pgrep("flwr-simulation") and not _pgrep("ray::ClientAppActor")
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6, "the run must have been killed before it finished"
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--engine", "flower", "--resume", str(killed)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming {killed.resolve()} after round {done}" in resumed.stdout + resumed.stderr
    a, b = _records(ref / "metrics.jsonl"), _records(metrics)
    assert [r["round"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("client_acc", "sampled", "experts", "bytes_down", "bytes_up"):
        assert [r[key] for r in b] == [r[key] for r in a], key


def _pgrep(pattern: str) -> list[str]:
    """Live processes whose command line matches (zombies, dead but not yet reaped, are left out)."""
    from pfedmoap.flower.local_link import pid_alive

    pids = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [pid for pid in pids if pid_alive(int(pid))]
