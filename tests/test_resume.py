"""Exact resume: a run killed mid-way (a real process, SIGKILL) and resumed ends with the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import reopen_run, small_config

from pfedmoap.engine.checkpoint import LAST_CHECKPOINT
from pfedmoap.engine.launch import resume, run
from pfedmoap.train import main

ARGS = [
    "--pretrained",
    "none",
    "--rounds",
    "6",
    "--local-epochs",
    "2",
    "--train-per-class",
    "20",
    "--test-per-class",
    "5",
    "--no-progress",
    "--clients",
    "6",
    "--experts",
    "2",
    "--frac",
    "0.5",
    "--threads",
    "1",
]


def _metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["client_acc"], r["sampled"], r["experts"], r["bytes_down"]) for r in rows]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    long = [*ARGS, "--rounds", "12"]  # rounds enough that the kill lands well before the end
    assert main([*long, "--out", str(ref)]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfedmoap.train", *long, "--out", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:  # kill it once two rounds are on disk, wherever it is in round 3
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 12, "the run must have been killed before it finished"
    assert not (killed / "summary.json").exists()
    assert main(["--resume", str(killed), "--no-progress"]) == 0
    assert _metrics(killed) == _metrics(ref)
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["final_mean_acc"] == b["final_mean_acc"] and a["last5_mean_acc"] == b["last5_mean_acc"]


def _resume_to(run_dir, rounds):
    """Continue a finished run directory to ``rounds`` rounds (its config raised, its summary dropped)."""
    reopen_run(run_dir, rounds)
    return resume(run_dir, log=lambda m: None)


def test_resume_after_a_stopped_run_is_exact(tmp_path):
    """A run stopped after round 2 and resumed to round 4 equals a 4-round run, random expert selection
    included (the server's RNG state travels in the checkpoint)."""
    cfg = small_config(clients=5, frac=0.6, experts=2, rounds=4, expert_selection="random")
    ref = run(cfg, out=tmp_path / "ref", log=lambda m: None)
    short = run(cfg.replace(rounds=2), out=tmp_path / "short", log=lambda m: None)
    assert len(short.rounds) == 2
    state = torch.load(tmp_path / "short" / "checkpoints" / LAST_CHECKPOINT, weights_only=True)
    assert [r["round"] for r in state["driver"]["rounds"]] == [1, 2]
    resumed = _resume_to(tmp_path / "short", 4)
    assert [r.client_acc for r in resumed.rounds] == [r.client_acc for r in ref.rounds]
    assert [r.experts for r in resumed.rounds] == [r.experts for r in ref.rounds]
    assert torch.equal(resumed.federation.server.global_prompt, ref.federation.server.global_prompt)


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "fedotp"},
        {"method": "fedpgp", "frac": 0.6},
        {"method": "pfedmoap", "subsample": "base", "eval_split": "base2novel"},
        {"method": "promptfolio", "frac": 0.6},
        {"method": "fedpha", "fedpha_local_ctx": "4,8"},
        {"method": "fedtpg", "n_ctx": 4, "frac": 0.6},
        {"method": "pfedmma", "model": "pfedmoap-tiny-vit", "subsample": "base", "eval_split": "base2novel"},
        # the momenta (p_L's on each client, p_G's on the server) and the batch cursor; without noise, whose level
        # depends on the number of rounds (a 1-round run noises more than a 3-round one)
        {"method": "dpfpl", "dpfpl_rank": 2, "frac": 0.6, "batch_size": 24},
    ],
    ids=["fedotp", "fedpgp", "base2novel", "promptfolio", "fedpha-lengths", "fedtpg", "pfedmma-base2novel", "dpfpl"],
)
def test_competitors_and_base2novel_resume_exactly(tmp_path, overrides):
    """Their private state (FedOTP's local prompt, FedPGP's U and V) and the base / novel accuracies travel in
    the checkpoint: a run stopped after round 1 and resumed to round 3 equals a 3-round run."""
    cfg = small_config(clients=4, experts=2, rounds=3, **overrides)
    ref = run(cfg, out=tmp_path / "ref", log=lambda m: None)
    run(cfg.replace(rounds=1), out=tmp_path / "short", log=lambda m: None)
    resumed = _resume_to(tmp_path / "short", 3)
    assert [r.to_json() | {"seconds": 0, "phase_seconds": {}} for r in resumed.rounds] == [
        r.to_json() | {"seconds": 0, "phase_seconds": {}} for r in ref.rounds
    ]
    for a, b in zip(resumed.federation.clients, ref.federation.clients, strict=True):
        assert a.private.keys() == b.private.keys()
        assert all(torch.equal(a.private[k], b.private[k]) for k in a.private)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "holds no run"),
        ("finished", "already finished"),
        ("bad-json", "not JSON"),
        ("corrupt-ckpt", "cannot be used"),
        ("other-version", "was written by pfedmoap 0.0.0"),
    ],
)
def test_resume_bad_run_dirs(tmp_path, capsys, setup, message):
    out = tmp_path / "r"
    if setup != "missing":
        assert main([*ARGS, "--rounds", "1", "--out", str(out)]) == 0
        capsys.readouterr()
    if setup in ("bad-json", "corrupt-ckpt", "other-version"):
        (out / "summary.json").unlink()
    if setup == "bad-json":
        (out / "config.json").write_text("{not json")
    if setup == "corrupt-ckpt":
        (out / "checkpoints" / LAST_CHECKPOINT).write_bytes(b"\x00garbage")
    if setup == "other-version":
        data = json.loads((out / "config.json").read_text())
        data["_meta"]["pfedmoap_version"] = "0.0.0"
        (out / "config.json").write_text(json.dumps(data))
    before = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()} if out.exists() else {}
    assert main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    after = {p.name: p.read_bytes() for p in out.glob("*") if p.is_file()} if out.exists() else {}
    assert before == after


def test_resume_refuses_other_flags(tmp_path, capsys):
    assert main(["--resume", str(tmp_path), "--lambda", "0.2"]) == 2
    assert "drop --lambda" in capsys.readouterr().err


def test_disk_full_on_checkpoint_write_keeps_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    import pfedmoap.engine.checkpoint as checkpoint

    out = tmp_path / "r"
    real_save = torch.save
    calls = []

    def flaky_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # round 2's checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky_save)
    assert main([*ARGS, "--rounds", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0]
    state = torch.load(out / "checkpoints" / LAST_CHECKPOINT, weights_only=True)
    assert [r["round"] for r in state["driver"]["rounds"]] == [1]  # round 1's checkpoint survived
    assert not list((out / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert [r[0] for r in _metrics(out)] == [1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_mid_round_exits_130_and_resumes(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        # 40 rounds (about 30 s uninterrupted): in one CI run the 20-round version finished (exit 0) before the
        # interrupt landed; the margin keeps Ctrl-C mid-run on a loaded machine
        [sys.executable, "-m", "pfedmoap.train", *ARGS, "--rounds", "40", "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # the messages carry what a failure needs to be understood (this test once failed in a slow-suite run on a
    # loaded machine and passed on its rerun; the assertion that failed was not recorded)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("pfedmoap.train: interrupted"), err[-2000:]
    assert "Traceback" not in err, err[-4000:]
    done_before = [r[0] for r in _metrics(out)]
    assert main(["--resume", str(out), "--no-progress"]) == 0, done_before
    assert [r[0] for r in _metrics(out)] == list(range(1, 41)), done_before
