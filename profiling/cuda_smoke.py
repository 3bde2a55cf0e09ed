"""A smoke matrix of real CLI runs on the tiny model, so that a GPU user's first run cannot die on a tensor left on
the wrong device (issue 15, item 8). Every cell is ``python -m pfedmoap.train`` (2 rounds, small world) with its
flags, checked for exit 0, a finite final accuracy, and metrics.jsonl with every round.

    python profiling/cuda_smoke.py --device cuda --out OUT/smoke --jobs 6     # on the GPU machine
    python profiling/cuda_smoke.py --device cpu --out /tmp/smoke --jobs 1     # CI's dry run

The cells: every method; --fused on and off; sequential and parallel clients; bf16 (also with --fused); CUDA graphs
off; DP; client dropout with partial participation; augmentation; base-to-novel; kill-and-resume (SIGKILL after a
round is on disk, then --resume); --engine flower (Flower's simulation; skipped, saying so, without flwr and ray).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--rounds", "2", "--clients", "4", "--experts", "2", "--local-epochs", "1", "--train-per-class", "20",
    "--test-per-class", "5", "--no-progress",
]  # fmt: skip
METHODS = [
    "pfedmoap", "pfedmoap-shared-gate", "promptfl", "fedprox", "local", "fedotp", "fedpgp", "promptfolio", "fedpha",
    "fedtpg", "dpfpl", "zeroshot",
]  # fmt: skip


def cells(device: str) -> list[tuple[str, list[str]]]:
    out = [(f"method {m}", ["--method", m]) for m in METHODS]
    out += [
        ("pfedmoap --fused", ["--fused"]),
        ("pfedmoap --no-fused sequential", ["--no-fused", "--parallel-clients", "1"]),
        ("pfedmoap --fused sequential", ["--fused", "--parallel-clients", "1"]),
        ("pfedmoap parallel", ["--parallel-clients", "4"]),
        ("pfedmoap bf16", ["--precision", "bf16"]),
        ("pfedmoap bf16 --fused", ["--precision", "bf16", "--fused"]),
        ("pfedmoap bf16 sequential", ["--precision", "bf16", "--parallel-clients", "1"]),
        ("pfedmoap dp", ["--dp-epsilon", "50"]),
        ("pfedmoap dropout + frac", ["--client-dropout", "0.3", "--frac", "0.75"]),
        ("pfedmoap augment", ["--augment"]),
        ("pfedmoap base2novel", ["--subsample", "base", "--eval-split", "base2novel"]),
        ("fedotp --fused bf16", ["--method", "fedotp", "--fused", "--precision", "bf16"]),
        ("dpfpl private bf16", ["--method", "dpfpl", "--dpfpl-epsilon", "0.4", "--precision", "bf16"]),
        ("pfedmma tiny ViT", ["--method", "pfedmma", "--model", "pfedmoap-tiny-vit"]),
        ("pfedmma tiny ViT bf16", ["--method", "pfedmma", "--model", "pfedmoap-tiny-vit", "--precision", "bf16"]),
    ]
    if device == "cuda":
        out.append(("pfedmoap --compile", ["--compile"]))  # a cold compile takes tens of seconds: not in CI's dry run
        out.append(("pfedmoap --fused --compile bf16", ["--fused", "--compile", "--precision", "bf16"]))
        out.append(("pfedmoap cuda graphs off", ["--cuda-graphs", "off"]))
        out.append(("pfedmoap cuda graphs on sequential", ["--cuda-graphs", "on", "--parallel-clients", "1"]))
    return out


def _finite_rounds(run_dir: Path, rounds: int) -> str | None:
    """Why the run's metrics.jsonl is not ``rounds`` rounds of finite accuracies, or None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return "no metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(lines) != rounds:
        return f"{len(lines)} rounds in metrics.jsonl, expected {rounds}"
    bad = [r["round"] for r in lines if not math.isfinite(r["mean_acc"])]
    return f"non-finite accuracy in round(s) {bad}" if bad else None


def _final(stdout: str) -> float | None:
    m = re.search(r"done: final (\S+)%", stdout)
    return float(m.group(1)) if m else None


def cell_dir(out: Path, name: str) -> Path:
    """Where a cell's run goes: OUT/<the name as a slug>."""
    return out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_cell(name: str, flags: list[str], base: list[str], out: Path, timeout: float) -> dict:
    run_dir = cell_dir(out, name)
    cmd = [sys.executable, "-m", "pfedmoap.train", *base, *flags, "--out", str(run_dir)]
    t0 = time.perf_counter()
    row = {"cell": name, "command": " ".join(["python -m pfedmoap.train", *base, *flags]), "ok": False}
    if "--engine" in flags and not (importlib.util.find_spec("flwr") and importlib.util.find_spec("ray")):
        return {**row, "ok": None, "why": "skipped: flwr and ray are not installed here", "seconds": 0.0}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**row, "why": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - t0}
    row.update(rc=proc.returncode, seconds=time.perf_counter() - t0, final_acc=_final(proc.stdout))
    (out / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    rounds = 1 if "zeroshot" in flags else 2
    if proc.returncode != 0:
        row["why"] = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    elif row["final_acc"] is None or not math.isfinite(row["final_acc"]):
        row["why"] = "no finite final accuracy printed"
    elif "--engine" not in flags and (why := _finite_rounds(run_dir, rounds)):
        row["why"] = why
    else:
        row["ok"] = True
    return row


def kill_and_resume(base: list[str], out: Path, timeout: float) -> dict:
    """SIGKILL a 12-round run once a round is on disk, then --resume it to the end."""
    name = "kill and resume"
    run_dir = cell_dir(out, "kill and resume")
    long = list(base)
    long[long.index("--rounds") + 1] = "12"
    row = {"cell": name, "command": "python -m pfedmoap.train ... --rounds 12; SIGKILL; --resume RUN_DIR", "ok": False}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfedmoap.train", *long, "--out", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    if proc.returncode != -signal.SIGKILL:
        return {**row, "why": f"the run was not killed mid-way (exit {proc.returncode}, {done} rounds)",
                "seconds": time.perf_counter() - t0}  # fmt: skip
    resumed = subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--resume", str(run_dir), "--no-progress"],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    (out / "kill-and-resume.log").write_text(resumed.stdout + resumed.stderr)
    row.update(rc=resumed.returncode, seconds=time.perf_counter() - t0, final_acc=_final(resumed.stdout))
    row["killed_after_rounds"] = done
    if resumed.returncode != 0:
        row["why"] = f"resume exit {resumed.returncode}: " + (resumed.stderr.strip().splitlines() or [""])[-1][:300]
    elif why := _finite_rounds(run_dir, 12):
        row["why"] = why
    else:
        row["ok"] = True
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=4, help="cells run at once")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per cell")
    p.add_argument("--only", help="a regular expression: run the cells whose name matches")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = [*SMALL, "--device", args.device]
    todo = cells(args.device) + [("engine flower", ["--engine", "flower"])]
    if args.only:
        todo = [(n, f) for n, f in todo if re.search(args.only, n)]
    with_resume = not args.only or re.search(args.only, "kill and resume")
    # every cell's run refuses a directory that holds a run: say so once, before any time is spent
    names = [n for n, _ in todo] + (["kill and resume"] if with_resume else [])
    taken = [cell_dir(out, n).name for n in names if cell_dir(out, n).exists()]
    if taken:
        print(
            f"cuda_smoke: error: out='{out}' already holds smoke runs ({', '.join(taken)}); choose a new --out "
            "directory or --only cells it does not hold",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_cell, n, f, base, out, args.timeout) for n, f in todo]
        if with_resume:
            futures.append(pool.submit(kill_and_resume, base, out, args.timeout))
        rows = []
        for f in futures:
            row = f.result()
            rows.append(row)
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[row["ok"]]
            acc = row.get("final_acc")
            print(
                f"{mark} {row['cell']:<36} {row.get('seconds', 0):6.1f} s  "
                + (f"final {acc:.2f}%" if acc is not None else "")
                + (f"  ({row['why']})" if row.get("why") else ""),
                flush=True,
            )
    failed = [r for r in rows if r["ok"] is False]
    lines = [
        f"### Smoke matrix on {args.device} ({len(rows)} cells, {time.perf_counter() - t0:.0f} s, {args.jobs} at once)",
        "",
        "| cell | ok | seconds | final acc | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ok = {True: "yes", False: "**NO**", None: "skipped"}[r["ok"]]
        acc = "" if r.get("final_acc") is None else f"{r['final_acc']:.2f}"
        lines.append(f"| {r['cell']} | {ok} | {r.get('seconds', 0):.1f} | {acc} | {r.get('why', '')} |")
    # an --only run into a directory that holds other cells adds to their record instead of replacing it
    md, js = out / "smoke.md", out / "smoke.json"
    earlier_md = md.read_text() + "\n" if md.exists() else ""
    earlier_rows = json.loads(js.read_text()) if js.exists() else []
    md.write_text(earlier_md + "\n".join(lines) + "\n")
    js.write_text(json.dumps(earlier_rows + rows, indent=2))
    print(f"{len(rows) - len(failed)} of {len(rows)} cells passed or skipped; {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
