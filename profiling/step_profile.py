"""Dispatched ops, GPU kernel launches and wall time per training step, for each execution path, at Flowers102's shape.

    python profiling/step_profile.py --size full --json OUT/step-profile.json --markdown OUT/step-profile.md
    python profiling/step_profile.py --size smoke       # seconds, any machine (CI's dry run)

The shape is ``profiling/paper_run.py``'s (``--size full``: RN50 random weights, 102 classes, 10 clients, K = 9,
d_gate 128, batch 16, 16 shots; one local epoch per round here, 10 steps per client), on random images. Each path
builds its federation and runs four rounds: round 1 (every client's first participation: no gate yet) warms up,
round 2 is run under a ``TorchDispatchMode`` that counts the aten ops dispatched, round 3 under ``torch.profiler``
counting the GPU kernels launched (CUDA kernel events; 0 on a CPU), round 4 is timed. Per step means per lock step
of the round (every client advancing one batch): the round's training seconds / steps per client.

Paths, each adding one switch to the one before it (issue 28, item 5):
``sequential`` (one client after another, eager), ``lock step`` (every sampled client together),
``lock step + fused`` (the fused gate: one client-axis launch for all clients), ``+ bf16``, ``+ CUDA graphs``
(replayed steps; CUDA only, off on a CPU), ``+ compile`` (``--compile``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pfedmoap import make_config  # noqa: E402
from pfedmoap.engine.federation import Federation  # noqa: E402
from pfedmoap.model.clip import load_clip  # noqa: E402
from profiling.bench.parallel import OpCounter  # noqa: E402
from profiling.paper_run import parse_args, random_bundle, report, sync  # noqa: E402

PATHS: dict[str, dict] = {
    "sequential": {"parallel_clients": 1, "cuda_graphs": "off"},
    "lock step": {"parallel_clients": "all", "cuda_graphs": "off"},
    "lock step + fused": {"parallel_clients": "all", "cuda_graphs": "off", "fused": True},
    "+ bf16": {"parallel_clients": "all", "cuda_graphs": "off", "fused": True, "precision": "bf16"},
    "+ CUDA graphs": {"parallel_clients": "all", "cuda_graphs": "on", "fused": True, "precision": "bf16"},
    "+ compile": {"parallel_clients": "all", "cuda_graphs": "on", "fused": True, "precision": "bf16", "compile": True},
}


def kernel_launches(fn) -> int:
    """GPU activities (kernels, copies, memsets) while ``fn`` runs: torch.profiler's events on the CUDA device
    (0 without CUDA)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def run_path(name: str, changes: dict, shape, device: torch.device, clip, bundle) -> dict:
    cfg = make_config(
        "flowers102",
        model=shape.model,
        pretrained="none",
        device=device.type,
        clients=shape.clients,
        rounds=4,
        local_epochs=1,
        experts=shape.experts,
        d_gate=shape.d_gate,
        shots=shape.shots,
        progress=False,
        **{k: shape.clients if v == "all" else v for k, v in changes.items()},
    )
    skipped = None
    if device.type != "cuda" and cfg.cuda_graphs == "on":
        cfg, skipped = cfg.replace(cuda_graphs="off"), "CUDA graphs need CUDA: off here"
    logs: list[str] = []
    fed = Federation(cfg, clip=clip, dataset=bundle, log=logs.append)
    fed.run_round(1)
    counter = OpCounter()
    with counter:  # under a TorchDispatchMode a compiled graph runs eagerly: its count is not the compiled path's
        fed.run_round(2)
    kernels = kernel_launches(lambda: fed.run_round(3))
    sync(device)
    t0 = time.perf_counter()
    record = fed.run_round(4)
    sync(device)
    total = time.perf_counter() - t0
    steps = math.ceil(max(fed.world.train_sizes) / cfg.batch_size) * cfg.local_epochs
    train = record.phase_seconds.get("train", float("nan"))
    row = {
        "path": name,
        "parallel_clients": fed.parallel_clients,
        "fused": cfg.fused,
        "precision": cfg.precision,
        "cuda_graphs": fed.runtime.settings.cuda_graphs,
        "compile": cfg.compile,
        "steps_per_client": steps,
        "ops_per_round": None if cfg.compile else counter.count,
        "ops_per_step": None if cfg.compile else counter.count / steps,
        "kernels_per_round": kernels,
        "kernels_per_step": kernels / steps,
        "round_s": total,
        "train_s": train,
        "step_ms": 1000 * train / steps,
        "finite": all(math.isfinite(a) for a in record.client_acc),
        "note": skipped or "; ".join(line for line in logs if "--compile" in line),
    }
    ops = "n/a" if row["ops_per_step"] is None else f"{row['ops_per_step']:.0f}"
    print(
        f"{name:<20} ops/step {ops:>9}  kernels/step {row['kernels_per_step']:8.0f}  "
        f"step {row['step_ms']:8.1f} ms  round {total:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def markdown(rows: list[dict], shape, meta: dict) -> str:
    lines = [
        f"### Per training step, Flowers102 {meta['size']} shape ({shape.model} random weights, C = {shape.classes}, "
        f"{shape.clients} clients, K = {shape.experts}) on {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}. Per step = per lock step of a round (every client one batch).",
        "",
        "| path | ops dispatched / step | GPU kernels + copies / step | train (ms / step) | round (s) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = "n/a (a dispatch mode runs the compiled graph eagerly)" if r["ops_per_step"] is None else None
        ops = ops or f"{r['ops_per_step']:,.0f}"
        lines.append(
            f"| {r['path']} | {ops} | {r['kernels_per_step']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['round_s']:.2f} | {r['note'] or ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, shape, names, device = parse_args(argv, __doc__.split("\n\n")[0], "paths", PATHS)
    clip = load_clip(shape.model, "none", device, progress=False)
    bundle = random_bundle(shape, clip.image_size)
    rows = [run_path(n, PATHS[n], shape, device, clip, bundle) for n in names]
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "size": args.size,
    }
    return report(args, markdown(rows, shape, meta), meta, rows)


if __name__ == "__main__":
    sys.exit(main())
