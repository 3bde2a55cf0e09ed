"""``--compile``: the training step's text-encoder pass through torch.compile, and its eager fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import federation_tensors, small_config

from pfedmoap.engine.federation import Federation
from pfedmoap.model.compiled import CompiledPass


def test_a_failed_compilation_is_said_once_and_the_pass_runs_eagerly(monkeypatch):
    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    said: list[str] = []
    calls = []

    def eager(x):
        calls.append(x)
        return x * 2

    compiled = CompiledPass(eager, said.append)
    x = torch.ones(3, requires_grad=True)
    assert torch.equal(compiled(x), x * 2) and torch.equal(compiled(x), x * 2)
    assert len(said) == 1 and "no working C++ compiler found" in said[0] and "runs eagerly" in said[0]
    assert "more detail" not in said[0]  # one line
    assert len(calls) == 2


def test_without_gradients_the_eager_pass_runs(monkeypatch):
    """Evaluation and the frozen experts (no grad) are not compiled: one graph per shape is the step's."""
    used = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda *a: used.append("compiled") or fn(*a))
    compiled = CompiledPass(lambda x: x + 1, print)
    with torch.no_grad():
        compiled(torch.zeros(1))
    assert used == []
    compiled(torch.zeros(1, requires_grad=True))
    assert used == ["compiled"]


def test_the_run_compiles_its_encoders_pass_only_with_the_flag(tiny_clip, small_world):
    plain = Federation(small_config(clients=2, experts=1), clip=tiny_clip, dataset=small_world, log=lambda m: None)
    assert not isinstance(plain.encoder.shared_prefix_pass, CompiledPass)
    cfg = small_config(clients=2, experts=1, compile=True)
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    assert isinstance(fed.encoder.shared_prefix_pass, CompiledPass)
    assert not isinstance(tiny_clip.text.encode_shared_prefix, CompiledPass)  # the shared CLIP is untouched


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_one(tiny_clip, small_world):
    """torch.compile for real (Inductor on the CPU): two rounds, every client's state within float rounding."""
    cfg = small_config(clients=3, experts=1, rounds=2, shots=2, threads=1)
    runs = {}
    for flag in (False, True):
        said: list[str] = []
        fed = Federation(cfg.replace(compile=flag), clip=tiny_clip, dataset=small_world, log=said.append)
        runs[flag] = (fed.run(), fed, said)
    (eager, eager_fed, _), (comp, comp_fed, said) = runs[False], runs[True]
    assert not any("--compile" in line for line in said), said  # it compiled (no fallback)
    one_image = max(100.0 / c.data.num_test for c in eager_fed.clients)  # a near-tie may flip under other rounding
    for r_comp, r_eager in zip(comp.rounds, eager.rounds, strict=True):
        assert all(abs(x - y) <= one_image for x, y in zip(r_comp.client_acc, r_eager.client_acc, strict=True))
    a, b = federation_tensors(eager_fed), federation_tensors(comp_fed)
    for key in a:
        assert ((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)).item() < 1e-4, key
