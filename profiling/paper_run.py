"""The paper's Flowers102 run at full shape, end to end, on random weights and random images (issue 15, item 8).

    python profiling/paper_run.py --size full --json OUT/paper-run.json --markdown OUT/paper-run.md
    python profiling/paper_run.py --size smoke            # seconds, any machine (CI's dry run)

Shape (``--size full``): RN50 (random weights), 102 classes, 10 clients, pathological split, 16 shots, 10 rounds,
5 local epochs, batch 16, K = 9, d_gate 128, every client evaluated every round: the ``flowers102`` preset with
``pretrained=none``. Images are uniform random uint8 at the model's input size, with Flowers102's counts: 16
training shots per class, and CoOp's 2,463 test images spread over the 102 classes (24 or 25 each; the per-class
test counts of CoOp's split are not available offline). The pathological split gives nine clients 10 classes
(160 training, 240-243 test images) and the last 12 (192 and 291). Accuracy on random data is chance; what is
measured is time.

Configurations, each timed from the world's build (image features encoded) to the last round's evaluation, with
the frozen CLIP loaded once beforehand and shared (its load is reported separately):

- ``sequential fp32``: one client after another, eager (``--parallel-clients 1 --cuda-graphs off``);
- ``sequential fp32 + graphs``: the same, each step replayed from a CUDA graph;
- ``parallel fp32``: every sampled client in lock step (the CUDA default), graphs on (exact);
- ``parallel bf16 + graphs``: the same under ``--precision bf16`` (not exact: bf16 rounding).

The per-phase seconds are the rounds' own ``phase_seconds`` (prepare, train, eval, ...) summed over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfedmoap import make_config  # noqa: E402
from pfedmoap.data.registry import DatasetBundle, LabeledImages  # noqa: E402
from pfedmoap.engine.federation import Federation  # noqa: E402
from pfedmoap.model.clip import load_clip, resolve_device  # noqa: E402


@dataclass
class Shape:
    model: str
    classes: int
    test_images: int  # spread over the classes
    clients: int
    rounds: int
    local_epochs: int
    experts: int
    d_gate: int
    shots: int = 16


SHAPES = {
    "full": Shape("RN50", 102, 2463, 10, 10, 5, 9, 128),
    "smoke": Shape("pfedmoap-tiny", 20, 100, 4, 2, 1, 3, 32),  # the tiny CLIP's features are 64-d
}

CONFIGS = {
    "sequential fp32": {"parallel_clients": 1, "cuda_graphs": "off"},
    "sequential fp32 + graphs": {"parallel_clients": 1, "cuda_graphs": "auto"},
    "parallel fp32": {"parallel_clients": "all", "cuda_graphs": "auto"},
    "parallel bf16 + graphs": {"parallel_clients": "all", "cuda_graphs": "auto", "precision": "bf16"},
}


def random_bundle(shape: Shape, image_size: int, seed: int = 0) -> DatasetBundle:
    """Random uint8 images with Flowers102's counts (16 train shots per class; the test images spread evenly)."""
    g = torch.Generator().manual_seed(seed)
    base, extra = divmod(shape.test_images, shape.classes)
    per_test = [base + (c < extra) for c in range(shape.classes)]
    train_labels = np.repeat(np.arange(shape.classes), shape.shots)
    test_labels = np.concatenate([np.full(n, c) for c, n in enumerate(per_test)])

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)

    return DatasetBundle(
        name="flowers102-shape",
        classnames=[f"flower {c}" for c in range(shape.classes)],
        train=LabeledImages(images(len(train_labels)), train_labels),
        test=LabeledImages(images(len(test_labels)), test_labels),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(name: str, changes: dict, shape: Shape, device: torch.device, clip, bundle) -> dict:
    cfg = make_config(
        "flowers102",
        model=shape.model,
        pretrained="none",
        device=device.type,
        clients=shape.clients,
        rounds=shape.rounds,
        local_epochs=shape.local_epochs,
        experts=shape.experts,
        d_gate=shape.d_gate,
        shots=shape.shots,
        progress=False,
        **{k: shape.clients if v == "all" else v for k, v in changes.items()},
    )
    if device.type != "cuda":
        cfg = cfg.replace(cuda_graphs="off")
    sync(device)
    t0 = time.perf_counter()
    fed = Federation(cfg, clip=clip, dataset=bundle, log=lambda _: None)
    sync(device)
    build = time.perf_counter() - t0
    history = fed.run()
    sync(device)
    total = time.perf_counter() - t0
    phases: dict[str, float] = {}
    for r in history.rounds:
        for k, v in r.phase_seconds.items():
            phases[k] = phases.get(k, 0.0) + v
    final = history.rounds[-1]
    row = {
        "config": name,
        "parallel_clients": fed.parallel_clients,
        "precision": cfg.precision,
        "cuda_graphs": fed.runtime.settings.cuda_graphs,
        "seconds_total": total,
        "seconds_world": build,
        "seconds_rounds": sum(r.seconds for r in history.rounds),
        "phase_seconds": phases,
        "final_mean_acc": final.mean_acc,
        "finite": all(math.isfinite(a) for a in final.client_acc),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "global_prompt": fed.server.global_prompt.float().cpu(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"{name:<28} {total:7.2f} s  (world {build:.2f} s, rounds {row['seconds_rounds']:.2f} s)  "
        + "  ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())),
        file=sys.stderr,
        flush=True,
    )
    return row


def markdown(rows: list[dict], shape: Shape, meta: dict) -> str:
    phases = sorted({k for r in rows for k in r["phase_seconds"]})
    lines = [
        f"### Flowers102 {meta['size']} shape ({shape.model} random weights, C = {shape.classes}, "
        f"{shape.clients} clients, "
        f"{shape.rounds} rounds, {shape.local_epochs} local epochs, K = {shape.experts}) on {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, CLIP load {meta['clip_load_s']:.1f} s (not included).",
        "",
        "| config | end to end (s) | world (s) | rounds (s) | "
        + " | ".join(f"{p} (s)" for p in phases)
        + " | peak GiB | max rel Δ P_g vs sequential fp32 |",
        "|---|---|---|---|" + "---|" * len(phases) + "---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['config']} | {r['seconds_total']:.2f} | {r['seconds_world']:.2f} | {r['seconds_rounds']:.2f} | "
            + " | ".join(f"{r['phase_seconds'].get(p, 0.0):.2f}" for p in phases)
            + f" | {peak} | {r.get('prompt_rel_diff', float('nan')):.1e} |"
        )
    exact = [r for r in rows if r["precision"] == "fp32"]
    if exact:
        best = min(exact, key=lambda r: r["seconds_total"])
        if meta["size"] == "full" and meta["device"] != "CPU":
            verdict = "met" if best["seconds_total"] < 15 else "NOT met"
            verdict = f"{verdict}: the target is < 15 s"
        else:
            verdict = "the < 15 s target is for the full shape on a GPU"
        lines += ["", f"Fastest exact configuration: {best['config']}, {best['seconds_total']:.2f} s ({verdict})."]
    return "\n".join(lines)


def parse_args(
    argv: list[str] | None, description: str, flag: str, table: dict[str, dict]
) -> tuple[argparse.Namespace, Shape, list[str], torch.device]:
    """The command line both scripts share (``--size``, ``--device``, ``--json``, ``--markdown`` and ``flag``, a
    comma-separated subset of ``table``): the arguments, the shape, the chosen names and the device; seeds torch."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(SHAPES), default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(f"--{flag}", dest="subset", help="comma-separated subset of: " + ", ".join(table))
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    names = list(table) if not args.subset else [c.strip() for c in args.subset.split(",")]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown {flag} {unknown}; valid: {', '.join(table)}")
    torch.manual_seed(0)
    return args, SHAPES[args.size], names, resolve_device(args.device)


def report(args: argparse.Namespace, text: str, meta: dict, rows: list[dict]) -> int:
    """Print the table, write the ``--json`` / ``--markdown`` files; exit 1 when any row ended non-finite."""
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0 if all(r["finite"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args, shape, names, device = parse_args(argv, __doc__.split("\n\n")[0], "configs", CONFIGS)
    t0 = time.perf_counter()
    clip = load_clip(shape.model, "none", device, progress=False)
    sync(device)
    clip_load = time.perf_counter() - t0
    bundle = random_bundle(shape, clip.image_size)
    rows = [run_config(n, CONFIGS[n], shape, device, clip, bundle) for n in names]
    base = rows[0]["global_prompt"]
    for r in rows:
        r["prompt_rel_diff"] = float((r.pop("global_prompt") - base).norm() / base.norm())
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "clip_load_s": clip_load,
        "size": args.size,
    }
    return report(args, markdown(rows, shape, meta), meta, rows)


if __name__ == "__main__":
    sys.exit(main())
