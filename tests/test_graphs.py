"""CUDA graphs of the training step (``--cuda-graphs``): replay equals eager (CUDA only), and one clear line for a
setting the machine cannot run."""

from __future__ import annotations

import pytest
import torch

import pfedmoap.federated.graphs as graphs_module
from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.graphs import resolve_cuda_graphs
from pfedmoap.federated.plan import make_config
from tests.conftest import federation_tensors, small_config


def test_resolution_and_bad_settings():
    assert resolve_cuda_graphs("auto", torch.device("cpu")) is False
    assert resolve_cuda_graphs("off", torch.device("cuda")) is False
    assert resolve_cuda_graphs("auto", torch.device("cuda")) is True
    with pytest.raises(ConfigError, match=r"cuda_graphs=on needs a CUDA device \(this run is on cpu\)"):
        resolve_cuda_graphs("on", torch.device("cpu"))
    with pytest.raises(ConfigError, match="cuda_graphs='always' is not one of: auto, on, off"):
        make_config("synthetic", cuda_graphs="always")


def test_step_graphs_only_for_cuda_and_graphable_objectives():
    from types import SimpleNamespace

    yes, no = SimpleNamespace(graphable=True), SimpleNamespace(graphable=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert isinstance(graphs_module.step_graphs(True, cuda, [yes, yes]), graphs_module.StepGraphs)
    assert graphs_module.step_graphs(False, cuda, [yes]) is None
    assert graphs_module.step_graphs(True, cpu, [yes]) is None
    assert graphs_module.step_graphs(True, cuda, [yes, no]) is None  # one ungraphable client: the group runs eagerly


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cli_refuses_graphs_without_cuda(tmp_path, capsys):
    from pfedmoap.train import main

    out = tmp_path / "run"
    code = main(["--pretrained", "none", "--rounds", "1", "--no-progress", "--cuda-graphs", "on", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cuda_graphs=on needs a CUDA device" in err
    assert not (out / "config.json").exists()


def _counting(monkeypatch) -> list[graphs_module.StepGraphs]:
    made: list[graphs_module.StepGraphs] = []
    real = graphs_module.StepGraphs

    class Counting(real):
        def __init__(self, device):
            super().__init__(device)
            made.append(self)

    monkeypatch.setattr("pfedmoap.federated.graphs.StepGraphs", Counting)  # what step_graphs builds
    return made


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("pfedmoap", {"parallel_clients": 1}),
        ("pfedmoap", {"parallel_clients": 4}),
        ("pfedmoap", {"parallel_clients": 1, "fused": True}),
        ("pfedmoap", {"parallel_clients": 4, "precision": "bf16"}),
        ("promptfl", {"parallel_clients": 4}),
        ("fedprox", {"parallel_clients": 1}),
        ("fedpgp", {"parallel_clients": 4}),
    ],
)
def test_replay_equals_eager(method, extra, monkeypatch):
    """Two rounds (first participation, then with experts and gates), with CUDA graphs and without: every client's
    prompt, gate and private tensors and every accuracy equal; the steps were really replayed."""
    cfg = small_config(method=method, clients=4, experts=2, rounds=2, local_epochs=3, device="cuda", **extra)
    eager = Federation(cfg.replace(cuda_graphs="off"), log=lambda _: None)
    made = _counting(monkeypatch)
    graphed = Federation(cfg.replace(cuda_graphs="on"), log=lambda _: None)
    for t in (1, 2):
        ra, rb = eager.run_round(t), graphed.run_round(t)
        a, b = federation_tensors(eager), federation_tensors(graphed)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)
        assert ra.client_acc == pytest.approx(rb.client_acc, abs=1e-9)
    assert made and all(g.failed is None for g in made), [g.failed for g in made]
    assert sum(g.replayed for g in made) > sum(g.eager for g in made)  # most steps replayed


@pytest.mark.cuda
def test_an_ungraphable_objective_runs_eagerly(monkeypatch):
    made = _counting(monkeypatch)
    cfg = small_config(method="fedotp", clients=4, experts=2, rounds=1, device="cuda", cuda_graphs="on")
    Federation(cfg, log=lambda _: None).run_round(1)
    assert made == []


class _FakeCuda:
    """Just enough of torch.cuda for StepGraphs' control flow on CPU: capture records the step instead of running
    it (as a real capture runs no kernel), replay runs it on the captured inputs."""

    def __init__(self, fail_capture: bool = False):
        self.capturing = None
        self.fail_capture = fail_capture

    def install(self, monkeypatch):
        fake = self

        class Graph:
            def replay(self):
                self.step(*self.static)

        class Capture:
            def __init__(self, graph):
                self.graph = graph

            def __enter__(self):
                fake.capturing = self.graph

            def __exit__(self, *exc):
                fake.capturing = None
                return False

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: Capture(None))
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def step(self, log: list):
        def run(x: torch.Tensor) -> None:
            if self.capturing is not None:
                if self.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
                self.capturing.step, self.capturing.static = run, (x,)
                return
            log.append(x.clone())

        return run


@pytest.mark.parametrize("fail", [False, True])
def test_step_graphs_run_every_step_once_in_order(monkeypatch, fail):
    """Warm-up eager, then capture + replay, then replays, per shape; each step runs once on its own batch. A failed
    capture says so once and runs that step and every later one eagerly."""
    fake = _FakeCuda(fail_capture=fail)
    fake.install(monkeypatch)
    log: list[torch.Tensor] = []
    graphs = graphs_module.StepGraphs(torch.device("cpu"))
    batches = [torch.full((4,), float(i)) for i in range(5)] + [torch.full((2,), 5.0)] * 3
    step = fake.step(log)
    if fail:
        with pytest.warns(RuntimeWarning, match="capture of the training step failed"):
            for b in batches:
                graphs.run(step, (b,))
    else:
        for b in batches:
            graphs.run(step, (b,))
    assert len(log) == len(batches) and all(torch.equal(a, b) for a, b in zip(log, batches, strict=True))
    if fail:
        assert graphs.captured == 0 and graphs.replayed == 0 and "not permitted" in graphs.failed
    else:  # two shapes: each warmed once, captured once; the rest replayed
        assert (graphs.eager, graphs.captured, graphs.replayed) == (2, 2, 6)
