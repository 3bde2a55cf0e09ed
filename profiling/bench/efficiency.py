"""Section ``efficiency``: useful FLOPs per second of the shared-prefix text step against a dense GEMM's rate."""

from __future__ import annotations

import argparse
import sys

import torch

from pfedmoap.federated.prompt import PromptEncoder
from pfedmoap.model.clip import FrozenCLIP

from .harness import Sizes, class_names, gemm_rate, measure


def text_step_flops(encoder: PromptEncoder) -> dict[str, float]:
    """FLOPs of one shared-prefix training step of the text encoder (local prompt, all C classes).

    Matmul FLOPs only (2 per multiply-add). Per layer and token: the block's linear layers (in-projection,
    out-projection, MLP); per (query, key) pair: 4 W (QK^T and attention x V). The CLIP weights are frozen, so
    backward needs input gradients only: linear layers cost 1x forward again, attention 2x (dQ, dK, dV, dP).
    ``useful`` counts each class's suffix only up to its EOT and only causally visible keys; ``executed`` counts
    what the shared-prefix encoder runs (linear layers on the packed tokens, attention padded to the longest EOT
    with full P + S score rows).
    """
    tower = encoder.clip.text
    blocks = tower.shared_prefix_blocks() or []
    width = tower.width
    per_token = 0
    for blk in blocks:
        per_token += 2 * blk.attn.in_proj_weight.numel() + 2 * blk.attn.out_proj.weight.numel()
        per_token += sum(2 * m.weight.numel() for m in blk.mlp.modules() if isinstance(m, torch.nn.Linear))
    layers = len(blocks)
    proj = tower.text_projection
    out_dim = proj.out_features if isinstance(proj, torch.nn.Linear) else (proj.shape[-1] if proj is not None else 0)
    n_pre = 1 + encoder.n_ctx
    n_suf = encoder.length - n_pre
    n_cls = encoder.num_classes
    suf_len = (encoder.eot.cpu() - n_pre + 1).tolist()
    pre_pairs = n_pre * (n_pre + 1) // 2

    def total(tokens: int, pairs: int) -> float:
        linear = per_token * tokens + 2 * n_cls * width * out_dim
        attention = layers * 4 * width * pairs
        return 2 * linear + 3 * attention

    useful_tokens = n_pre + sum(suf_len)
    useful_pairs = pre_pairs + sum(s * n_pre + s * (s + 1) // 2 for s in suf_len)
    # the linear layers run on the packed suffix stream (each class up to its own EOT); attention runs on
    # the padded [C, S] layout, with full P + S score rows
    exec_tokens = useful_tokens
    exec_pairs = n_pre * n_pre + n_cls * n_suf * (n_pre + n_suf)
    return {
        "useful_flops": total(useful_tokens, useful_pairs),
        "executed_flops": total(exec_tokens, exec_pairs),
        "useful_tokens": useful_tokens,
        "executed_tokens": exec_tokens,
        "mlp_hidden": max(
            (m.out_features for b in blocks for m in b.mlp.modules() if isinstance(m, torch.nn.Linear)), default=0
        ),
    }


def bench_efficiency(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    device = clip.device
    rows = []
    big = 4096 if device.type == "cuda" else 1024
    for n_cls in sizes.eff_classes:
        encoder = PromptEncoder(clip, class_names(n_cls), 16, mode="shared-prefix")
        flops = text_step_flops(encoder)
        g = torch.Generator().manual_seed(5)
        ctx = torch.nn.Parameter((torch.randn(16, clip.width, generator=g) * 0.02).to(device))
        upstream = torch.randn(n_cls, clip.embed_dim, generator=g).to(device)

        def text_step(encoder=encoder, ctx=ctx, upstream=upstream):
            ctx.grad = None
            (encoder.encode(ctx) * upstream).sum().backward()

        m = int(flops["executed_tokens"])
        hidden = int(flops["mlp_hidden"]) or 4 * clip.width
        variants = {
            "text_step": text_step,
            "gemm_comparable": gemm_rate(m, clip.width, hidden, device),
            "gemm_large": gemm_rate(big, big, big, device),
        }
        stats = measure(variants, max(3, sizes.repeats), device)
        t = stats["text_step"]["seconds"]
        comparable = 2 * m * clip.width * hidden / stats["gemm_comparable"]["seconds"]
        large = 2 * big**3 / stats["gemm_large"]["seconds"]
        useful_rate = flops["useful_flops"] / t
        rows.append(
            {
                "model": clip.model_name,
                "classes": n_cls,
                "dtype": "float32",
                "useful_tokens": flops["useful_tokens"],
                "executed_tokens": flops["executed_tokens"],
                "useful_gflop": flops["useful_flops"] / 1e9,
                "executed_gflop": flops["executed_flops"] / 1e9,
                "text_step_s": t,
                "useful_gflops": useful_rate / 1e9,
                "executed_gflops": flops["executed_flops"] / t / 1e9,
                "gemm_shape": f"{m}x{clip.width}x{hidden}",
                "gemm_comparable_gflops": comparable / 1e9,
                "gemm_large_shape": f"{big}x{big}x{big}",
                "gemm_large_gflops": large / 1e9,
                "efficiency": useful_rate / comparable,
                "efficiency_vs_large_gemm": useful_rate / large,
            }
        )
        r = rows[-1]
        print(
            f"  efficiency {clip.model_name} C={n_cls}: {r['useful_gflops']:.1f} useful GFLOP/s vs GEMM "
            f"{r['gemm_comparable_gflops']:.1f} ({r['efficiency']:.0%})",
            file=sys.stderr,
            flush=True,
        )
    return rows
