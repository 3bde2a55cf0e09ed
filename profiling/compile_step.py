"""Does ``torch.compile`` speed up the training step's text-encoder pass (``--compile``)? Side by side in one run.

    python profiling/compile_step.py                       # ViT-B/16's text tower, C = 10 and 102, CPU
    python profiling/compile_step.py --classes 10 --repeats 5 --json out.json

For each class count C, the step a client takes (the shared-prefix text pass of its contexts, forward and backward,
as ``Objective.loss`` runs it) is timed eagerly and compiled (``torch.compile(dynamic=False)`` of the encoder's
``shared_prefix_pass``, ``TextTower.encode_shared_prefix``: what ``--compile`` turns on), for one client (1 context:
a sequential step) and for 10 clients in lock step (10 contexts in one pass). Reported per variant: the median step
time, the compile cost paid at the first step of that shape (Inductor also caches compiled code on disk: a shape
compiled by an earlier process costs seconds, not tens), the useful FLOP rate as a share of a dense GEMM as tall as
the pass's token rows (the ``efficiency`` section's measure), and the largest difference of the context gradient from
eager. Random weights: the time does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfedmoap.federated.prompt import PromptEncoder  # noqa: E402
from pfedmoap.model.clip import load_clip  # noqa: E402
from profiling.bench.efficiency import text_step_flops  # noqa: E402
from profiling.bench.harness import class_names, gemm_rate  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(model: str, classes: list[int], contexts: list[int], repeats: int) -> list[dict]:
    device = torch.device("cpu")
    clip = load_clip(model, "none", device, progress=False)
    eager_pass = clip.text.encode_shared_prefix
    rows = []
    for n_cls in classes:
        encoder = PromptEncoder(clip, class_names(n_cls), 16, mode="shared-prefix")
        flops = text_step_flops(encoder)
        hidden = int(flops["mlp_hidden"]) or 4 * clip.width
        for n in contexts:
            m = n * int(flops["executed_tokens"])  # the pass's token rows: a GEMM as tall as its MLP's
            gemm = gemm_rate(m, clip.width, hidden, device)
            gemm()
            gemm_rate_flops = 2 * m * clip.width * hidden / _median_time(gemm, max(3, repeats))
            g = torch.Generator().manual_seed(5)
            ctx = torch.nn.Parameter(torch.randn(n, 16, clip.width, generator=g) * 0.02)
            upstream = torch.randn(n, n_cls, clip.embed_dim, generator=g)

            def step(encoder=encoder, ctx=ctx, upstream=upstream) -> torch.Tensor:
                ctx.grad = None
                (encoder.encode(ctx) * upstream).sum().backward()
                return ctx.grad

            passes = {"eager": eager_pass, "compiled": torch.compile(eager_pass, dynamic=False)}
            grads, first = {}, {}
            for variant, fn in passes.items():  # the first step of this shape: the compile cost, or a warm-up
                encoder.shared_prefix_pass = fn
                t0 = time.perf_counter()
                grads[variant] = step().clone()
                first[variant] = time.perf_counter() - t0
            samples: dict[str, list[float]] = {v: [] for v in passes}
            for _ in range(repeats):  # interleaved, so that a slow spell of the machine hits both
                for variant, fn in passes.items():
                    encoder.shared_prefix_pass = fn
                    t0 = time.perf_counter()
                    step()
                    samples[variant].append(time.perf_counter() - t0)
            for variant in passes:
                seconds = sorted(samples[variant])[len(samples[variant]) // 2]
                useful = n * flops["useful_flops"] / seconds
                rows.append(
                    {
                        "model": model,
                        "classes": n_cls,
                        "contexts": n,
                        "variant": variant,
                        "step_s": seconds,
                        "first_step_s": first[variant],
                        "useful_gflops": useful / 1e9,
                        "gemm_gflops": gemm_rate_flops / 1e9,
                        "share_of_gemm": useful / gemm_rate_flops,
                    }
                )
                print(
                    f"{model} C={n_cls} contexts={n} {variant}: {seconds:.3f} s/step (first {first[variant]:.1f} s), "
                    f"{rows[-1]['share_of_gemm']:.0%} of the GEMM rate",
                    file=sys.stderr,
                    flush=True,
                )
            encoder.shared_prefix_pass = eager_pass
            eager = rows[-2]
            rows[-1]["speedup"] = eager["step_s"] / rows[-1]["step_s"]
            rows[-1]["compile_s"] = rows[-1]["first_step_s"] - eager["step_s"]
            rows[-1]["max_abs_grad_diff"] = float((grads["compiled"] - grads["eager"]).abs().max())
            rows[-1]["grad_scale"] = float(grads["eager"].abs().max())
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | C | contexts | eager (s/step) | compiled (s/step) | speed-up | compile cost (s) "
        "| share of GEMM rate, eager / compiled | max abs Δ grad (of max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for eager, comp in zip(rows[::2], rows[1::2], strict=True):
        lines.append(
            f"| {eager['model']} | {eager['classes']} | {eager['contexts']} | {eager['step_s']:.3f} | "
            f"{comp['step_s']:.3f} | {comp['speedup']:.2f}x | {comp['compile_s']:.0f} | "
            f"{eager['share_of_gemm']:.0%} / {comp['share_of_gemm']:.0%} | "
            f"{comp['max_abs_grad_diff']:.1e} ({comp['grad_scale']:.1e}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", default="10,102", help="comma-separated class counts")
    p.add_argument("--contexts", default="1,10", help="contexts per pass: 1 (sequential), 10 (10 clients in lock step)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median taken)")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = [int(c) for c in args.classes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = measure(args.model, classes, contexts, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
