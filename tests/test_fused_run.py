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
from pfedmoap.federation import Federation

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def test_fused_and_reference_runs_agree(tiny_clip, small_world):
    runs = {}
    try:
        for fused in (False, True):
            # 2 shots x 10 classes per client keeps the interpreted kernels to a few steps per round
            cfg = small_config(experts=2, clients=4, rounds=3, shots=2, fused=fused, text_encoder="truncated")
            fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
            runs[fused] = (fed.run(), fed)
    finally:
        ops.select_backends(False)
    (ref, ref_fed), (fused, fused_fed) = runs[False], runs[True]
    assert fused_fed.backends["gate_score"] == "triton"
    assert ref_fed.backends == dict.fromkeys(ops.OPS, "reference")
    if "cpp" in ops.available_backends()["knn"]:
        assert fused_fed.backends["knn"] == fused_fed.backends["assemble_prompts"] == "cpp"
    assert [r["client_acc"] for r in fused.rounds] == [r["client_acc"] for r in ref.rounds]
    assert [r["experts"] for r in fused.rounds] == [r["experts"] for r in ref.rounds]
    g_ref, g_fused = ref_fed.server.global_prompt, fused_fed.server.global_prompt
    assert ((g_fused - g_ref).norm() / g_ref.norm()).item() < 1e-5
    for a, b in zip(ref_fed.clients, fused_fed.clients, strict=True):
        assert ((a.prompt - b.prompt).norm() / a.prompt.norm()).item() < 1e-5
        if a.gate is not None:
            for pa, pb in zip(a.gate.parameters(), b.gate.parameters(), strict=True):
                assert ((pa - pb).norm() / pa.norm()).item() < 1e-5
