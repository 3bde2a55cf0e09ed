"""Scale of the Flower simulation: 100 virtual SuperNodes at 10% participation (Dirichlet label split, tiny model).

    python profiling/flower_scale.py [--clients 100] [--frac 0.1] [--rounds 5] [--out DIR]

Prints seconds per round (the first separately: every node builds its world and encodes its images when it is
first contacted, and every node is evaluated every round), the whole run's wall time, and the peak resident
memory of this process and all its children together (Ray's workers included), sampled every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--frac", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="/tmp/pfedmoap-flower-scale")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pfedmoap import make_config
    from pfedmoap.flower import run_simulation

    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    # 100 clients need more images than the preset's 20: 200 train and 50 test images per class (2,000 / 500
    # over 10 classes), and at least 5 training images per client under Dirichlet(0.5)
    cfg = make_config(
        "synthetic-dirichlet",
        clients=args.clients,
        frac=args.frac,
        rounds=args.rounds,
        train_per_class=200,
        test_per_class=50,
        min_client_size=5,
        threads=1,
        progress=False,
    )
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], _tree_rss(os.getpid()))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    history = run_simulation(cfg, out=out, log=lambda m: None)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    secs = [r.seconds for r in history.rounds]
    result = {
        "clients": args.clients,
        "frac": args.frac,
        "rounds": len(secs),
        "round_1_s": round(secs[0], 2),
        "later_rounds_mean_s": round(statistics.mean(secs[1:]), 2) if len(secs) > 1 else None,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak["rss"] / 2**30, 2),
        "final_mean_acc": history.summary["final_mean_acc"],
        "failed": sum(r.num_failed for r in history.rounds),
        "sampled_per_round": [len(r.sampled) for r in history.rounds],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
