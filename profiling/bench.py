"""Benchmarks, measured side by side in one process; prints a markdown table and writes JSON.

    python profiling/bench.py text-encoder --model ViT-B-16 --classes 10,102,1000 --json out.json

Sections:
  text-encoder   one pFedMoAP training step (local prompt with grad, K frozen experts, gate, CE, SGD) at
                 B = 16 with each prompt text encoder: full (77 tokens) vs truncated vs shared-prefix;
                 step time, token positions, and the speed-up over truncated.

Random weights (``--pretrained none``): speed does not depend on the weights. Ratios come from one run on
one machine; absolute times on shared machines are noisy, so every timing is the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pfedmoap.clip import load_clip  # noqa: E402
from pfedmoap.gate import AttentionGate, pfedmoap_logits  # noqa: E402
from pfedmoap.prompt import PromptEncoder  # noqa: E402

# one- to four-word class names, like the CLIP benchmarks' ("english marigold", "giant white arum lily")
_WORDS = (
    "red white giant black small common great yellow blue spotted wild sea mountain garden desert "
    "lily rose orchid daisy poppy tulip iris lotus aster violet sparrow hawk eagle heron owl finch "
    "terrier spaniel retriever shepherd hound beagle pizza salad soup cake bread pasta curry taco"
).split()


def class_names(count: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        words = int(torch.randint(1, 5, (1,), generator=g))
        picks = torch.randint(0, len(_WORDS), (words,), generator=g).tolist()
        names.append(" ".join(_WORDS[p] for p in picks) + f" {i}")
    return names


def token_positions(enc: PromptEncoder, experts: int) -> int:
    """Token positions the text transformer processes for `experts` prompts over all classes."""
    n_cls = enc.num_classes
    if enc.mode == "shared-prefix":
        shared = 1 + enc.n_ctx
        return experts * (shared + n_cls * (enc.length - shared))
    return experts * n_cls * enc.length


def bench_text_encoder(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    clip = load_clip(args.model, "none", torch.device(args.device), progress=False)
    rows = []
    for n_cls in args.classes:
        names = class_names(n_cls)
        d = args.d_gate
        image = F.normalize(torch.randn(args.batch, clip.embed_dim, device=clip.device), dim=-1)
        labels = torch.randint(0, n_cls, (args.batch,), device=clip.device)
        experts_ctx = torch.randn(args.experts, 16, clip.width, device=clip.device) * 0.02
        steps, encoders = {}, {}
        for mode in args.modes:
            if mode == "full" and n_cls > args.full_max_classes:
                continue
            enc = PromptEncoder(clip, names, 16, mode=mode)
            with torch.no_grad():
                expert_text = enc.encode(experts_ctx)
            ctx = torch.nn.Parameter(torch.randn(16, clip.width, device=clip.device) * 0.02)
            gate = AttentionGate(d, 8).to(clip.device)
            opt = torch.optim.SGD([ctx, *gate.parameters()], lr=0.002, momentum=0.9, weight_decay=5e-4)

            def step(enc=enc, ctx=ctx, gate=gate, opt=opt, expert_text=expert_text, image=image, labels=labels, d=d):
                text = enc.encode(ctx)
                logits, _ = pfedmoap_logits(image, text, expert_text, gate, clip.gamma, 0.5, d)
                loss = F.cross_entropy(logits, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if clip.device.type == "cuda":
                    torch.cuda.synchronize()

            step()  # warm-up
            steps[mode], encoders[mode] = step, enc
        # interleave the modes within every repeat so that machine drift hits them all alike
        times: dict[str, list[float]] = {m: [] for m in steps}
        for _ in range(args.repeats):
            for mode, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[mode].append(time.perf_counter() - t0)
        base = statistics.median(times["truncated"]) if "truncated" in times else None
        for mode, ts in times.items():
            seconds = statistics.median(ts)
            enc = encoders[mode]
            row = {
                "section": "text-encoder",
                "model": args.model,
                "classes": n_cls,
                "mode": mode,
                "tokens_per_prompt": enc.length,
                "token_positions": token_positions(enc, 1),
                "step_seconds": seconds,
                "repeats": len(ts),
            }
            if base:
                row["speedup_vs_truncated"] = base / seconds
            rows.append(row)
            print(f"  C={n_cls:<5} {mode:<14} {seconds * 1000:9.1f} ms/step", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | C | text encoder | tokens / prompt | token positions | step (ms) | vs truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_truncated']:.2f}x" if "speedup_vs_truncated" in r else "n/a"
        lines.append(
            f"| {r['model']} | {r['classes']} | {r['mode']} | {r['tokens_per_prompt']} | "
            f"{r['token_positions']:,} | {r['step_seconds'] * 1000:.1f} | {speed} |"
        )
    return "\n".join(lines)


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="profiling/bench.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="section", required=True)
    te = sub.add_parser("text-encoder", help="full vs truncated vs shared-prefix prompt encoding")
    te.add_argument("--model", default="ViT-B-16")
    te.add_argument("--classes", type=_csv_ints, default=[10, 102, 1000])
    te.add_argument("--modes", default="full,truncated,shared-prefix")
    te.add_argument("--full-max-classes", type=int, default=102, help="skip the 77-token encoder above this C")
    te.add_argument("--batch", type=int, default=16)
    te.add_argument("--experts", type=int, default=9)
    te.add_argument("--d-gate", type=int, default=128)
    te.add_argument("--repeats", type=int, default=3)
    te.add_argument("--threads", type=int, default=None)
    te.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args(argv)
    if args.section == "text-encoder":
        args.modes = [m for m in args.modes.split(",") if m]
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d} | torch {torch.__version__} | {args.device} ({device_name}) | "
        f"{torch.get_num_threads()} threads | `python profiling/bench.py {' '.join(argv or sys.argv[1:])}`"
    )
    rows = bench_text_encoder(args)
    print(header)
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
