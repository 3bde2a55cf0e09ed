"""End to end on Flower's simulation engine, through ``flwr run`` on a private local SuperLink: ``python -m
pfedmoap.train --engine flower`` against the in-process engine, same config and seed. CPU, 1 torch thread per
node: the numbers must be identical."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from conftest import reopen_run  # noqa: E402

from pfedmoap import run  # noqa: E402
from pfedmoap.engine.rundir import read_metrics  # noqa: E402
from pfedmoap.federated.plan import make_config  # noqa: E402
from pfedmoap.train import main  # noqa: E402

# the synthetic preset, 4 clients x 3 rounds, small enough for CI; a learning rate high enough that
# accuracies move from round to round (random tiny CLIP weights)
SETTINGS = {
    "pretrained": "none",
    "clients": 4,
    "rounds": 3,
    "experts": 2,
    "local_epochs": 1,
    "train_per_class": 20,
    "test_per_class": 6,
    "shots": 8,
    "d_gate": 32,
    "lr_prompt": 0.5,
    "lr_gate": 0.1,
    "threads": 1,
    "parallel_clients": 1,  # the in-process runs in the order a Flower node trains (one client each): bit-equal
}


def _flags(settings: dict) -> list[str]:
    flags = {"lr_prompt": "--lr-prompt", "lr_gate": "--lr-gate", "d_gate": "--d-gate"}
    argv = []
    for key, value in settings.items():
        argv += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    return argv


@pytest.mark.slow
def test_ray_simulation_matches_in_process(tmp_path, capsys, monkeypatch):
    # the engine runs with this Python's bin folder off PATH, as from a virtual environment that is not activated
    # (a scheduler, an IDE): Flower's processes, which start each other by name, must still find their commands
    here = os.path.dirname(sys.executable)
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != here))
    assert shutil.which("flower-superexec") is None or os.path.dirname(shutil.which("flower-superexec")) != here
    start = time.perf_counter()
    argv = ["--preset", "synthetic", "--engine", "flower", "--no-progress", "--out", str(tmp_path / "flower")]
    code = main(argv + _flags(SETTINGS))
    assert code == 0, capsys.readouterr().err
    seconds = time.perf_counter() - start
    local = run(make_config("synthetic", progress=False, **SETTINGS), out=tmp_path / "local", log=lambda m: None)

    flower = read_metrics(tmp_path / "flower")
    assert [r["round"] for r in flower] == [1, 2, 3]
    # tolerance 0: the per-round mean accuracy (and every client's) is bit-identical to in-process
    local_lines = [r.to_json() for r in local.rounds]
    for key in ("mean_acc", "client_acc", "experts", "bytes_up", "bytes_down"):
        assert [r[key] for r in flower] == [r[key] for r in local_lines], key
    assert len({tuple(r["client_acc"]) for r in flower}) > 1  # the accuracies moved: not a vacuous match
    assert all(r["num_failed"] == r["num_rejected"] == r["num_eval_failed"] == 0 for r in flower)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["final_mean_acc"] == local.summary["final_mean_acc"]
    config = json.loads((tmp_path / "flower" / "config.json").read_text())
    assert config["threads"] == 1 and config["_meta"]["nodes"] == 4
    assert "done: final" in capsys.readouterr().out
    print(f"ray simulation: {seconds:.1f} s")  # measured: see docs/flower.md


@pytest.mark.slow
def test_the_library_runs_and_resumes_either_engine(tmp_path):
    """pfedmoap.run(cfg, engine="flower") from Python, and pfedmoap.resume(dir) continuing each engine's run on the
    engine that made it (read from the run's config.json): both end equal to an uninterrupted in-process run."""
    import pfedmoap

    quiet = lambda m: None  # noqa: E731
    whole = pfedmoap.run(make_config("synthetic", progress=False, **SETTINGS), out=tmp_path / "whole", log=quiet)
    short = make_config("synthetic", progress=False, **{**SETTINGS, "rounds": 2})
    for engine in ("local", "flower"):
        out = tmp_path / engine
        first = pfedmoap.run(short, out=out, log=quiet, engine=engine)
        assert first.summary.get("engine", "local") == engine and len(first.rounds) == 2
        reopen_run(out, 3)
        resumed = pfedmoap.resume(out, log=quiet)  # no engine given: the run's own
        assert [r.to_json()["client_acc"] for r in resumed.rounds] == [r.to_json()["client_acc"] for r in whole.rounds]
        assert [r["mean_acc"] for r in read_metrics(out)] == [r.mean_acc for r in whole.rounds], engine
