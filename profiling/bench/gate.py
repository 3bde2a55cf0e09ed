"""Section ``gate``: the gate + score op alone, forward + backward: the reference code's eager gate vs each backend."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pfedmoap import ops
from pfedmoap.gates import AttentionGate

from .harness import Sizes, _interpreted, measure
from .refstyle import RefStyleGate


def bench_gate(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    d, heads, gamma = sizes.d_gate, sizes.heads, 100.0
    impls = [b for b in ops.available_backends()["gate_score"] if not _interpreted(b, device)]
    rows = []
    for b_size, n_cls, n_exp in sizes.gate_shapes:
        g = torch.Generator().manual_seed(b_size * 7 + n_cls * 13 + n_exp)
        query = F.normalize(torch.randn(b_size, d, generator=g), dim=-1).to(device)
        experts = F.normalize(torch.randn(n_exp, n_cls, d, generator=g), dim=-1).to(device)
        labels = torch.randint(0, n_cls, (b_size,), generator=g).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            gate = AttentionGate(d, heads, 10.0).to(device)
        ref_gate = RefStyleGate(d, heads, 10.0).to(device)
        ref_gate.load_state_dict(gate.state_dict())
        leaf = experts.clone().requires_grad_(True)

        def refstyle(train: bool, query=query, leaf=leaf, labels=labels, ref_gate=ref_gate):
            with torch.set_grad_enabled(train):
                moe, _ = ref_gate(query, leaf)
                logits = gamma * torch.bmm(query.unsqueeze(1), moe.permute(1, 2, 0)).squeeze(1)
                if train:
                    F.cross_entropy(logits, labels).backward()
            return logits

        def fused_op(train: bool, backend: str, query=query, leaf=leaf, labels=labels, gate=gate):
            gate_score = ops.select_ops(pins={"gate_score": backend}).gate_score
            with torch.set_grad_enabled(train):
                logits, _ = gate_score(query, leaf, *gate.weights(), heads=heads, scaling=10.0, gamma=gamma)
                if train:
                    F.cross_entropy(logits, labels).backward()
            return logits

        variants: dict[str, Callable[[], Any]] = {}
        for train in (True, False):
            tag = "train" if train else "eval"
            variants[f"refstyle eager|{tag}"] = lambda train=train, f=refstyle: f(train)
            for b in impls:
                variants[f"ops.gate_score[{b}]|{tag}"] = lambda train=train, b=b, f=fused_op: f(train, b)
        stats = measure(variants, sizes.gate_repeats, device)
        ref_logits = refstyle(False)
        base = {v: stats[f"refstyle eager|{v}"]["seconds"] for v in ("train", "eval")}
        for name, st in stats.items():
            variant, mode = name.split("|")
            row = {
                "batch": b_size,
                "classes": n_cls,
                "experts": n_exp,
                "d_gate": d,
                "variant": variant,
                "mode": mode,
                "seconds": st["seconds"],
                "peak_mib": st.get("peak_mib"),
                "speedup_vs_refstyle": base[mode] / st["seconds"],
            }
            if variant.startswith("ops.gate_score["):
                backend = variant[len("ops.gate_score[") : -1]
                row["max_abs_diff_vs_refstyle"] = float((fused_op(False, backend) - ref_logits).abs().max())
            rows.append(row)
        timings = "  ".join(f"{r['variant']}/{r['mode']} {r['seconds'] * 1e3:.2f}ms" for r in rows[-len(stats) :])
        print(f"  gate B={b_size:<4} C={n_cls:<5} E={n_exp:<3} {timings}", file=sys.stderr, flush=True)
    return rows
