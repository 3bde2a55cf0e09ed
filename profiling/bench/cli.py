"""The command line: ``python -m profiling.bench [SECTION ...] [--size ...] [--json ...] [--markdown ...]``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from pfedmoap import ops
from pfedmoap.base import tracing as prof
from pfedmoap.model.clip import load_clip

from .bytes import bench_bytes
from .efficiency import bench_efficiency
from .gate import bench_gate
from .harness import DEFAULT_SECTIONS, SECTIONS, SIZES, Sizes, _grid
from .knn import bench_knn
from .parallel import bench_parallel
from .report import markdown, targets
from .round import bench_round
from .text_encoder import bench_text_encoder


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m profiling.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    sections_help = f"any of {', '.join(SECTIONS)} (default: all but text-encoder)"
    p.add_argument("sections", nargs="*", metavar="SECTION", help=sections_help)
    p.add_argument("--size", choices=sorted(SIZES), help="smoke (seconds), cpu (minutes), full (GPU); default: device")
    p.add_argument("--smoke", action="store_true", help="same as --size smoke")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--models", "--model", type=_csv, help="open_clip architectures (random weights)")
    p.add_argument("--classes", type=_csv_ints, help="class counts C for round / text-encoder")
    p.add_argument("--repeats", type=int, help="interleaved repeats per variant (median taken; parallel: 0 = ops only)")
    p.add_argument("--no-accuracy-round", action="store_true", help="skip the end-to-end rounds of ours")
    p.add_argument("--shots", type=int, help="training shots per class (fewer: fewer steps per client)")
    p.add_argument("--gate-grid", help="B list;C list;E list, e.g. '16,256;10,1000;2,10,40'")
    p.add_argument("--knn-pools", type=_csv_ints, help="pool sizes, e.g. 100,1000,10000")
    p.add_argument("--knn-frac", type=float, help="queries per round as a fraction of the pool (default 0.1)")
    p.add_argument("--eff-classes", type=_csv_ints, help="class counts for the efficiency section")
    p.add_argument("--modes", type=_csv, help="text-encoder modes (full,truncated,shared-prefix)")
    p.add_argument("--full-max-classes", type=int, default=102, help="text-encoder: skip 77 tokens above this C")
    p.add_argument("--fused", action="store_true", help="parallel: also sequential and lock step with --fused's gate")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for nsys)")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--markdown", help="write the markdown tables here")
    return p


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    name = "smoke" if args.smoke else (args.size or ("full" if args.device == "cuda" else "cpu"))
    s = replace(SIZES[name])
    if args.models:
        s.models = args.models
    if args.classes:
        s.classes = s.text_classes = args.classes
    if args.repeats is not None:  # 0: the parallel section counts dispatched ops without timing
        s.repeats = s.gate_repeats = s.knn_repeats = args.repeats
    if args.shots:
        s.shots = args.shots
    if args.no_accuracy_round:
        s.accuracy_round = False
    if args.gate_grid:
        bs, cs, es = (_csv_ints(x) for x in args.gate_grid.split(";"))
        s.gate_shapes = _grid(bs, cs, es)
    if args.knn_pools:
        s.knn_pools = args.knn_pools
    if args.knn_frac:
        s.knn_frac = args.knn_frac
    if args.eff_classes:
        s.eff_classes = args.eff_classes
    if args.modes:
        s.text_modes = args.modes
    args.size_name = name
    return s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        valid = ", ".join(SECTIONS)
        print(f"python -m profiling.bench: error: unknown section {unknown[0]!r} (valid: {valid})", file=sys.stderr)
        return 2
    sections = args.sections or list(DEFAULT_SECTIONS)
    sizes = resolve_sizes(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nvtx:
        prof.enable()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC | torch {torch.__version__} | {args.device} ({device_name}) "
        f"| {torch.get_num_threads()} threads | {os.cpu_count()} cores | load {load:.2f} at start | size "
        f"{args.size_name} | `python -m profiling.bench {' '.join(argv)}`"
    )
    print(header, file=sys.stderr, flush=True)
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    if "bytes" in sections:
        results["bytes"] = bench_bytes(sizes, args)
    if "knn" in sections:
        results["knn"] = bench_knn(sizes, args)
    if "gate" in sections:
        results["gate"] = bench_gate(sizes, args)
    model_sections = [s for s in ("round", "efficiency", "text-encoder", "parallel") if s in sections]
    if model_sections:
        for model in sizes.models:
            clip = load_clip(model, "none", device, progress=False)
            for s in model_sections:
                fn = {
                    "round": bench_round,
                    "efficiency": bench_efficiency,
                    "text-encoder": bench_text_encoder,
                    "parallel": bench_parallel,
                }[s]
                results.setdefault(s, []).extend(fn(sizes, args, clip))
            del clip
    target_rows = targets(results, device)
    table = markdown(results, target_rows)
    print(header)
    print()
    print(table)
    elapsed = time.perf_counter() - started
    print(f"\n(bench took {elapsed:.0f} s)", file=sys.stderr)
    if args.json:
        payload = {
            "header": header,
            "meta": {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "device": args.device,
                "device_name": device_name,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "load_at_start": load,
                "size": args.size_name,
                "sizes": asdict(sizes),
                "command": f"python -m profiling.bench {' '.join(argv)}",
                "seconds": elapsed,
                "backends_available": ops.available_backends(),
                "backends_unavailable": ops.unavailable_backends(),
            },
            "sections": results,
            "targets": target_rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
