"""Section ``knn``: expert selection over pools of 100 .. 100,000 prompts: a Python loop, cdist + topk, ``ops.knn``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from pfedmoap import ops

from .harness import PAPER_PROMPT_VALUES, Sizes, bench_ops, measure


def knn_loop(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> list[list[int]]:
    """The per-pair pattern: one distance computation per (query, candidate) pair in Python, then a sort."""
    out = []
    for q in queries.tolist():
        dists = []
        for j in range(pool.shape[0]):
            if j != q and bool(present[j]):
                dists.append((float(torch.dist(pool[q], pool[j])), j))
        dists.sort()
        out.append([j for _, j in dists[:k]])
    return out


def knn_cdist_topk(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(pool[queries], pool)
    d[torch.arange(len(queries), device=d.device), queries] = float("inf")
    d = d.masked_fill(~present[None, :], float("inf"))
    return torch.topk(d, k, dim=1, largest=False).indices


def bench_knn(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    impls = ops.available_backends()["knn"]
    rows = []
    for n in sizes.knn_pools:
        g = torch.Generator().manual_seed(n)
        pool = (torch.randn(n, PAPER_PROMPT_VALUES, generator=g) * 0.02).to(device)
        present = torch.ones(n, dtype=torch.bool, device=device)
        q = max(1, int(sizes.knn_frac * n))
        queries = torch.randperm(n, generator=g)[:q].to(device)
        k = min(sizes.knn_k, n - 1)
        loop_q = queries[: min(q, sizes.knn_loop_queries)]
        variants: dict[str, Callable[[], Any]] = {
            "loop": lambda pool=pool, present=present, loop_q=loop_q, k=k: knn_loop(pool, present, loop_q, k),
            "cdist+topk": lambda pool=pool, present=present, queries=queries, k=k: knn_cdist_topk(
                pool, present, queries, k
            ),
        }
        for b in impls:
            if b == "reference" and len(impls) > 1 and n > sizes.knn_reference_max_pool:
                continue  # exact difference-based distances in float64: minutes at 10,000 x 1,000 on a CPU

            knn = ops.select_ops(pins={"knn": b}).knn

            def ours(knn=knn, pool=pool, present=present, queries=queries, k=k):
                return knn(pool, present, queries, k)

            variants[f"ops.knn[{b}]"] = ours
        stats = measure(variants, sizes.knn_repeats, device, warmup=False, cap_s=10.0)
        expected = knn_loop(pool, present, loop_q, k)
        best = bench_ops(True).backends["knn"]
        scale = q / len(loop_q)
        loop_s = stats["loop"]["seconds"] * scale
        cdist_s = stats["cdist+topk"]["seconds"]
        for name, st in stats.items():
            seconds = loop_s if name == "loop" else st["seconds"]
            row = {
                "pool": n,
                "queries": q,
                "k": k,
                "variant": name,
                "seconds": seconds,
                "measured_queries": len(loop_q) if name == "loop" else q,
                "speedup_vs_loop": loop_s / seconds,
                "vs_cdist_topk": cdist_s / seconds,
            }
            if name.startswith("ops.knn["):
                b = name[len("ops.knn[") : -1]
                got = ops.select_ops(pins={"knn": b}).knn(pool, present, loop_q, k).tolist()
                row["matches_loop"] = got == expected
                row["best"] = b == best
            rows.append(row)
        timings = "  ".join(f"{r['variant']} {r['seconds']:.4f}s" for r in rows[-len(stats) :])
        print(f"  knn N={n:<7} Q={q:<6} {timings}", file=sys.stderr, flush=True)
    return rows
