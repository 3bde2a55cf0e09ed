"""End to end: the same seed gives the same federation with and without ``--fused`` on the CPU.

Tolerance: identical per-round client accuracies, and final prompts equal to a relative 1e-5 (the fused
kernels sum in a different order, so parameters drift by float rounding only). The truncated text encoder
is used so the run exercises every fused op: the gate-and-score kernel (Triton, in the interpreter without
a GPU), and the extension's prompt assembly and KNN where ``pfedmoap._C`` is built.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import small_config

from pfedmoap import ops
from pfedmoap.engine.federation import Federation
from pfedmoap.ops import reference, triton_gate

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)


@pytest.mark.slow
def test_fused_and_reference_runs_agree(tiny_clip, small_world):
    runs = {}
    for fused in (False, True):
        # 2 shots x 10 classes per client keeps the interpreted kernels to a few steps per round
        cfg = small_config(experts=2, clients=4, rounds=3, shots=2, fused=fused, text_encoder="truncated")
        fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
        runs[fused] = (fed.run(), fed)
    (ref, ref_fed), (fused, fused_fed) = runs[False], runs[True]
    assert fused_fed.backends["gate_score"] == "triton"
    assert ref_fed.backends == dict.fromkeys(ops.OPS, "reference")
    if "cpp" in ops.available_backends()["knn"]:
        assert fused_fed.backends["knn"] == fused_fed.backends["assemble_prompts"] == "cpp"
    assert [r.client_acc for r in fused.rounds] == [r.client_acc for r in ref.rounds]
    assert [r.experts for r in fused.rounds] == [r.experts for r in ref.rounds]
    g_ref, g_fused = ref_fed.server.global_prompt, fused_fed.server.global_prompt
    assert ((g_fused - g_ref).norm() / g_ref.norm()).item() < 1e-5
    for a, b in zip(ref_fed.clients, fused_fed.clients, strict=True):
        assert ((a.prompt - b.prompt).norm() / a.prompt.norm()).item() < 1e-5
        if a.gate is not None:
            for pa, pb in zip(a.gate.parameters(), b.gate.parameters(), strict=True):
                assert ((pa - pb).norm() / pa.norm()).item() < 1e-5


def test_two_runs_in_one_process_keep_their_own_backends(tiny_clip, small_world, monkeypatch):
    """The op table belongs to the run: a --fused federation built first and a reference one built after it each
    run on their own backends, whichever is built or run last (the kernels and the reference are counted)."""
    calls = {"triton": 0, "reference": 0}
    kernel, attention = triton_gate._GateScore.apply, reference.gate_attention

    def counted_kernel(*args):
        calls["triton"] += 1
        return kernel(*args)

    def counted_reference(*args, **kwargs):
        calls["reference"] += 1
        return attention(*args, **kwargs)

    monkeypatch.setattr(triton_gate._GateScore, "apply", counted_kernel)
    monkeypatch.setattr(reference, "gate_attention", counted_reference)
    # 1 shot x 10 classes and one local epoch: one interpreted step per client and round
    cfg = small_config(experts=2, clients=4, rounds=3, shots=1)
    fused = Federation(cfg.replace(fused=True), clip=tiny_clip, dataset=small_world, log=lambda m: None)
    plain = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    assert fused.backends["gate_score"] == "triton" and plain.backends["gate_score"] == "reference"
    for fed in (fused, plain):
        fed.run_round(1)  # first participation: no experts, no gate yet
    schedule = [(fused, "triton", "reference"), (plain, "reference", "triton"), (fused, "triton", "reference")]
    for fed, used, unused in schedule:
        before = dict(calls)
        fed.run_round(len(fed.rounds) + 1)
        assert calls[used] > before[used] and calls[unused] == before[unused], (fed.backends, calls)
        assert all(c.gate is not None and c.gate.ops is fed.ops for c in fed.clients)
    assert fused.server.knn is fused.ops.knn and plain.server.knn is reference.knn
