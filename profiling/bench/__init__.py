"""Benchmarks, measured side by side in one process; prints markdown tables and writes JSON.

    python -m profiling.bench                      # every default section, sizes for this device
    python -m profiling.bench --size smoke         # seconds: tiny model, tiny shapes (CI)
    python -m profiling.bench round knn --size cpu --json out.json
    python -m profiling.bench text-encoder --model ViT-B-16 --classes 10,102

Sections (default: all but text-encoder):
  bytes         bytes down / up per client and round through the library's own payload and wire code, vs the
                paper's figures (8,192 values per prompt; (K+1) x 8,192 down).
  knn           expert selection over pools of 100 .. 100,000 prompts (16 x 512 values each), one round's
                queries (--knn-frac of the pool): a per-pair Python loop vs torch.cdist + topk vs ``ops.knn``
                (every backend that can run here).
  gate          the gate + score op alone, forward + backward: the reference code's eager gate (query repeated
                per class, T_MoE materialised) vs ``ops.gate_score`` with each backend that can run here.
  round         one client round at paper shapes (5 local epochs, 16 shots, batch 16, K = 9, real-size
                architecture with random weights): the reference-style pipeline (profiling/bench/refstyle.py) vs
                ours with the reference op backend vs ours with --fused; plus training / evaluation
                throughput (images/s), peak memory, the one-time feature-cache cost, a check that the
                reference-style pipeline computes the same logits, and a full round of ours per backend
                (same seed) comparing final accuracy and prompts.
  efficiency    useful FLOPs per second of the shared-prefix text-encoder training step (forward + backward,
                counting only the token positions and causal attention pairs it needs) / the measured rate
                of a same-dtype dense GEMM of comparable size.
  text-encoder  one training step with each prompt text encoder: full (77 tokens) vs truncated vs shared-prefix.
  parallel      one round's local training of 10 sampled clients (pFedMoAP with experts, K = 9) one after another
                vs in lock step (--parallel-clients: one text-encoder pass per step for all of them): torch ops
                dispatched (counted with a TorchDispatchMode: the same on every machine), wall time, and the
                trained prompts' largest difference; beside the reference pattern when `round` ran too.

Timing: every variant runs once as a warm-up (its peak memory is measured then), then the variants of a
section are interleaved within each of --repeats rounds and the median is taken, so that machine drift hits
them all alike and ratios survive noise. Round times are composed from measured medians: one-time costs
(expert encoding, selection) + steps x median step; ours is also run end to end once per backend and that
wall time is reported beside it. Random weights (speed does not depend on the weights).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip is imported: benchmarks never download

from .bytes import bench_bytes  # noqa: E402
from .cli import main  # noqa: E402
from .efficiency import text_step_flops  # noqa: E402
from .harness import SECTIONS, SIZES, Sizes  # noqa: E402

__all__ = ["SECTIONS", "SIZES", "Sizes", "bench_bytes", "main", "text_step_flops"]
