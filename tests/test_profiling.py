"""Profiling: NVTX-style ranges (off = no-op, on = properly nested), the benchmark's smoke run, bytes accounting,
and the nsys script's behaviour without nsys."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config

from pfedmoap.base import tracing as profiling
from pfedmoap.base.tracing import nvtx_range
from pfedmoap.engine.federation import Federation

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """A fake range backend: records pushes and pops and checks they pair up."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.stack: list[str] = []
        self.paths: list[tuple[str, ...]] = []  # the stack at every push, outermost first

    def push(self, name):
        self.stack.append(name)
        self.paths.append(tuple(self.stack))
        self.events.append(("push", name))

    def pop(self):
        name = self.stack.pop()
        self.events.append(("pop", name))


@pytest.fixture(autouse=True)
def ranges_off():
    profiling.disable()
    yield
    profiling.disable()


def test_ranges_are_noops_when_off(monkeypatch):
    rec = Recorder()
    profiling.enable(backends=[rec])
    profiling.disable()
    import nvtx

    def boom(*a, **k):
        raise AssertionError("nvtx called while profiling is off")

    monkeypatch.setattr(nvtx, "push_range", boom)
    monkeypatch.setattr(nvtx, "pop_range", boom)

    @nvtx_range("decorated")
    def f(x):
        return x + 1

    with nvtx_range("outer"):
        with nvtx_range("inner"):
            assert f(1) == 2
    assert rec.events == []
    assert not profiling.is_enabled()


def test_ranges_nest_and_pair_when_on():
    rec = Recorder()

    @nvtx_range("decorated")
    def f():
        with nvtx_range("inside"):
            return 3

    with profiling.enabled([rec]):
        with nvtx_range("a"):
            assert f() == 3
            with pytest.raises(ValueError):
                with nvtx_range("raises"):
                    raise ValueError("x")
        for i in profiling.ranged(range(3), "loop"):
            if i == 1:
                continue
            with nvtx_range("body"):
                pass
    assert rec.stack == []
    assert rec.paths == [
        ("a",),
        ("a", "decorated"),
        ("a", "decorated", "inside"),
        ("a", "raises"),
        ("loop",),
        ("loop", "body"),
        ("loop",),
        ("loop",),
        ("loop", "body"),
    ]
    assert not profiling.is_enabled()  # the context manager restored the previous state


def test_decorator_checks_at_call_time():
    rec = Recorder()

    @nvtx_range("late")
    def f():
        return 1

    f()
    profiling.enable(backends=[rec])
    f()
    assert rec.events == [("push", "late"), ("pop", "late")]


def test_env_var_switches_ranges_on():
    code = "import pfedmoap.base.tracing as p; print(p.is_enabled(), p.describe())"
    env = {**os.environ, "PFEDMOAP_NVTX": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True profiling ranges: on -> nvtx via nvtx")


def test_federation_emits_every_phase_nested(tiny_clip, small_world):
    rec = Recorder()
    cfg = small_config(clients=4, experts=2, rounds=2, parallel_clients=1)  # the sequential loop's ranges
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    with profiling.enabled([rec]):
        fed.run()
    assert rec.stack == []
    pushed = {p[-1] for p in rec.paths}
    assert set(profiling.RANGES) <= pushed, set(profiling.RANGES) - pushed
    parents = {}
    for path in rec.paths:
        parents.setdefault(path[-1], set()).add(path[:-1])
    assert parents["round"] == {()}
    assert parents["client_update"] == {("round",)}
    assert parents["server.select_experts"] == {("round", "client_update")}
    assert parents["encode_experts"] == {("round", "client_update")}
    assert parents["local_train"] == {("round", "client_update")}
    assert parents["step"] == {("round", "client_update", "local_train")}
    for child in ("step.features", "step.text_encode", "step.gate", "step.backward", "step.optimizer"):
        assert parents[child] == {("round", "client_update", "local_train", "step")}, child
    assert parents["server.aggregate"] == {("round",)}
    assert parents["evaluate"] == {("round",)}
    # one round range per round, one client_update per sampled client
    assert sum(1 for p in rec.paths if p == ("round",)) == 2
    assert sum(1 for p in rec.paths if p[-1] == "client_update") == sum(len(r.sampled) for r in fed.rounds)


def test_ranges_do_not_change_results(tiny_clip, small_world):
    cfg = small_config(clients=4, experts=2, rounds=2)
    plain = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None).run()
    with profiling.enabled([Recorder()]):
        traced = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None).run()
    assert [r.client_acc for r in plain.rounds] == [r.client_acc for r in traced.rounds]


def test_torch_profiler_summary_on_cpu(tiny_clip, small_world, tmp_path):
    import io

    cfg = small_config(clients=3, experts=1, rounds=1, parallel_clients=1)  # a client_update range per client
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    out = io.StringIO()
    trace = tmp_path / "trace.json"
    with profiling.torch_profile(trace, summary=out) as prof:
        fed.run_round(1)
    rows = {r["range"]: r for r in profiling.range_summary(prof, profiling.RANGES)}
    assert rows["round"]["calls"] == 1
    assert rows["client_update"]["calls"] == 3
    assert rows["step"]["calls"] >= 3
    assert rows["round"]["total_ms"] >= rows["local_train"]["total_ms"] > 0
    text = out.getvalue()
    assert "round" in text and "step.backward" in text
    assert json.loads(trace.read_text())["traceEvents"]
    assert not profiling.is_enabled()


# ------------------------------------------------------------------------------------------ profiling/bench
@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("profiling.bench")  # the repository root is on sys.path, as for python -m


def test_bench_smoke_end_to_end(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    assert bench.main(["--smoke", "--threads", "1", "--json", str(out), "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"header", "meta", "sections", "targets"}
    assert set(data["sections"]) == {"bytes", "knn", "gate", "round", "efficiency"}
    assert {"device", "size", "command", "backends_available", "date"} <= set(data["meta"])
    rnd = data["sections"]["round"]
    variants = [r["variant"] for r in rnd]
    assert variants.count("reference-style") == 2 and variants.count("ours --fused") == 2
    for r in rnd:
        assert {"model", "classes", "steps", "step_s", "round_s", "speedup", "backends", "train_img_s"} <= set(r)
        assert r["step_s"] > 0 and r["round_s"] > 0 and r["train_img_s"] > 0 and r["eval_img_s"] > 0
        assert r["backends"]
        # the reference-style cost model computes the same logits as the library
        assert r["logit_max_abs_diff_refstyle_vs_ours"] < 1e-3 * max(1.0, r["logit_max_abs"])
        assert r["expert_feature_max_abs_diff_refstyle_vs_ours"] < 1e-4
    ours = [r for r in rnd if r["variant"] != "reference-style"]
    for r in ours:
        assert 0 <= r["final_acc"] <= 100 and r["round_measured_s"] > 0
        assert r["speedup"] == pytest.approx(
            next(x["round_s"] for x in rnd if x["classes"] == r["classes"] and x["variant"] == "reference-style")
            / r["round_s"]
        )
    knn = data["sections"]["knn"]
    assert {r["variant"] for r in knn} >= {"loop", "cdist+topk", "ops.knn[reference]"}
    assert all(r["matches_loop"] for r in knn if r["variant"].startswith("ops.knn["))
    gate = data["sections"]["gate"]
    assert {r["mode"] for r in gate} == {"train", "eval"}
    assert all(r["max_abs_diff_vs_refstyle"] < 1e-3 for r in gate if "max_abs_diff_vs_refstyle" in r)
    eff = data["sections"]["efficiency"][0]
    assert eff["useful_gflop"] > 0 and 0 < eff["efficiency"] and eff["useful_tokens"] <= eff["executed_tokens"]
    text = md.read_text()
    assert "One client round" in text and "KNN" in text and "Bytes per client" in text
    assert "| reference-style |" in capsys.readouterr().out


def test_bytes_match_the_paper(bench):
    import argparse

    rows = bench.bench_bytes(bench.SIZES["smoke"], argparse.Namespace())
    by = {(r["method"], r["experts"], r["dtype"]): r for r in rows}
    r = by[("pfedmoap", 9, "float16")]
    assert r["values_per_prompt"] == 8192
    assert r["prompts_down"] == 10
    assert r["bytes_down"] == 10 * 8192 * 2 == 160 * 1024  # (K + 1) x 8,192 values, fp16: 160 KiB
    assert r["bytes_up"] == 8192 * 2 == 16 * 1024
    assert by[("pfedmoap", 9, "float32")]["bytes_down"] == 320 * 1024
    assert by[("pfedmoap", 19, "float16")]["bytes_down"] == 20 * 8192 * 2
    assert by[("promptfl", 0, "float16")]["bytes_down"] == 8192 * 2
    assert all(row["matches_paper"] for row in rows)


def test_text_step_flops_counts_causal_pairs(bench, tiny_clip):
    from pfedmoap.federated.prompt import PromptEncoder

    enc = PromptEncoder(tiny_clip, ["a", "b c"], 4, mode="shared-prefix")
    f = bench.text_step_flops(enc)
    tower = tiny_clip.text
    width, layers = tower.width, len(tower.shared_prefix_blocks())
    per_token = 2 * 12 * width * width  # in-proj 3W^2 + out-proj W^2 + MLP 8W^2, 2 FLOPs per MAC
    n_pre = 5
    suf = [int(e) - n_pre + 1 for e in enc.eot.tolist()]
    tokens = n_pre + sum(suf)
    pairs = n_pre * (n_pre + 1) // 2 + sum(s * n_pre + s * (s + 1) // 2 for s in suf)
    proj = tower.text_projection
    out_dim = proj.shape[-1]
    expected = 2 * (layers * per_token * tokens + 2 * 2 * width * out_dim) + 3 * layers * 4 * width * pairs
    assert f["useful_tokens"] == tokens
    assert f["useful_flops"] == expected
    assert f["executed_flops"] >= f["useful_flops"]


# ------------------------------------------------------------------------------------------ nsys_round.sh
def test_nsys_script_says_how_to_get_nsys_when_missing(tmp_path):
    bash = shutil.which("bash")
    env = {"PATH": str(tmp_path), "NSYS": str(tmp_path / "no-such-nsys"), "HOME": str(tmp_path)}
    out = subprocess.run(
        [bash, str(ROOT / "profiling" / "nsys_round.sh"), "synthetic"], env=env, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "nsys" in out.stderr and "not found" in out.stderr
    assert "Nsight Systems" in out.stderr and "torch" in out.stderr  # how to get it, and the CPU alternative


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path")
def test_nvtx_backend_never_uses_torch_cuda_nvtx_on_cpu(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_nvtx(name, *a, **k):
        if name == "nvtx":
            raise ImportError("simulated: nvtx not installed")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_nvtx)
    backend = profiling.NvtxBackend()
    assert not backend.available and "not installed" in backend.reason
    backend.push("x")  # a no-op, not torch.cuda.nvtx (which raises on CPU builds)
    backend.pop()


# ------------------------------------------------------------------------------- gpu_check.sh, cuda_smoke.py
def test_gpu_check_refuses_an_out_that_holds_an_earlier_check(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    (out / "summary.txt").write_text("an earlier check\n")
    proc = subprocess.run(
        [shutil.which("bash"), str(ROOT / "profiling" / "gpu_check.sh"), str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check: error: OUT='{out}' is not empty (it holds an earlier check); choose a new OUT directory"
    ]
    assert [p.name for p in out.iterdir()] == ["summary.txt"]  # nothing written, nothing lost
    assert (out / "summary.txt").read_text() == "an earlier check\n"


@pytest.fixture
def cuda_smoke():
    spec = importlib.util.spec_from_file_location("pfedmoap_cuda_smoke", ROOT / "profiling" / "cuda_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    return smoke


def test_cuda_smoke_refuses_cells_whose_runs_are_there_before_running_any(cuda_smoke, tmp_path, capsys):
    smoke = cuda_smoke
    (tmp_path / "method-fedpgp").mkdir()
    (tmp_path / "kill-and-resume").mkdir()
    assert smoke.main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"out='{tmp_path}'" in err[0]
    assert "method-fedpgp" in err[0] and "kill-and-resume" in err[0] and "method-local" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill-and-resume", "method-fedpgp"]  # no run started


def test_cuda_smoke_only_adds_to_the_record_of_earlier_cells(cuda_smoke, tmp_path, monkeypatch, capsys):
    def fake_cell(name, flags, base, out, timeout):  # what run_cell records, without the run
        cuda_smoke.cell_dir(out, name).mkdir()
        return {"cell": name, "ok": True, "seconds": 1.0, "final_acc": 50.0}

    monkeypatch.setattr(cuda_smoke, "run_cell", fake_cell)
    assert cuda_smoke.main(["--device", "cpu", "--out", str(tmp_path), "--only", "^method local$"]) == 0
    assert cuda_smoke.main(["--device", "cpu", "--out", str(tmp_path), "--only", "^method fedprox$"]) == 0
    assert [r["cell"] for r in json.loads((tmp_path / "smoke.json").read_text())] == ["method local", "method fedprox"]
    md = (tmp_path / "smoke.md").read_text()
    assert md.count("### Smoke matrix") == 2 and "| method local |" in md and "| method fedprox |" in md
    assert cuda_smoke.main(["--device", "cpu", "--out", str(tmp_path), "--only", "^method local$"]) == 2  # refused
    assert len(json.loads((tmp_path / "smoke.json").read_text())) == 2
