"""Section ``text-encoder``: one training step with each prompt text encoder (full, truncated, shared-prefix)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from pfedmoap.federated.prompt import PromptEncoder
from pfedmoap.gates import AttentionGate, pfedmoap_logits
from pfedmoap.model.clip import FrozenCLIP

from .harness import Sizes, class_names, measure


def token_positions(enc: PromptEncoder, experts: int) -> int:
    """Token positions the text transformer processes for `experts` prompts over all classes."""
    n_cls = enc.num_classes
    if enc.mode == "shared-prefix":
        shared = 1 + enc.n_ctx
        return experts * (shared + n_cls * (enc.length - shared))
    return experts * n_cls * enc.length


def bench_text_encoder(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    device = clip.device
    for n_cls in sizes.text_classes:
        names = class_names(n_cls)
        d = sizes.d_gate
        image = F.normalize(torch.randn(sizes.batch, clip.embed_dim, device=device), dim=-1)
        labels = torch.randint(0, n_cls, (sizes.batch,), device=device)
        experts_ctx = torch.randn(sizes.experts, 16, clip.width, device=device) * 0.02
        steps, encoders = {}, {}
        for mode in sizes.text_modes:
            if mode == "full" and n_cls > args.full_max_classes:
                continue
            enc = PromptEncoder(clip, names, 16, mode=mode)
            with torch.no_grad():
                expert_text = enc.encode(experts_ctx)
            ctx = torch.nn.Parameter(torch.randn(16, clip.width, device=device) * 0.02)
            gate = AttentionGate(d, sizes.heads).to(device)
            opt = torch.optim.SGD([ctx, *gate.parameters()], lr=0.002, momentum=0.9, weight_decay=5e-4)

            def step(enc=enc, ctx=ctx, gate=gate, opt=opt, expert_text=expert_text, image=image, labels=labels, d=d):
                text = enc.encode(ctx)
                logits, _ = pfedmoap_logits(image, text, expert_text, gate, clip.gamma, 0.5, d)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            steps[mode], encoders[mode] = step, enc
        stats = measure(steps, sizes.repeats, device)
        base = stats["truncated"]["seconds"] if "truncated" in stats else None
        for mode, st in stats.items():
            enc = encoders[mode]
            row = {
                "model": clip.model_name,
                "classes": n_cls,
                "mode": mode,
                "tokens_per_prompt": enc.length,
                "token_positions": token_positions(enc, 1),
                "step_seconds": st["seconds"],
                "repeats": len(st["samples"]),
            }
            if base:
                row["speedup_vs_truncated"] = base / st["seconds"]
            rows.append(row)
            print(f"  C={n_cls:<5} {mode:<14} {st['seconds'] * 1000:9.1f} ms/step", file=sys.stderr, flush=True)
    return rows
