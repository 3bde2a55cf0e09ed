"""Same numbers before and after a change of structure: run a fixed set of CLI configs on two checkouts and
compare their ``metrics.jsonl`` round by round.

    python profiling/parity.py run --checkout /path/to/old-clone --out /tmp/parity/old
    python profiling/parity.py run --checkout . --out /tmp/parity/new
    python profiling/parity.py compare /tmp/parity/old /tmp/parity/new
    python profiling/parity.py run --checkout . --out /tmp/parity/seq --extra="--parallel-clients 1"

``run`` calls ``python -m pfedmoap.train`` exactly as a user would, from the checkout's root (so that checkout's
``pfedmoap`` is the one imported), one run directory per config. ``compare`` checks every per-round field except
wall-clock timings for equality and prints one line per config; it exits 1 when any config differs. Run both
sides on one machine with the same thread count: a seed gives the same numbers on one machine only.

A config may use a flag that an older checkout lacks: when the flag only spells out that older checkout's
behaviour (:data:`OLD_BEHAVIOUR`), it is left out there; otherwise (a new method, a new choice) the older checkout
refuses the config, and ``compare`` reports it as new on one side without counting it as a difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# partial participation with client dropout and random expert selection, over 3 rounds
PARTIAL = ["--frac", "0.5", "--expert-selection", "random", "--client-dropout", "0.2", "--rounds", "3"]
# FedOTP's Sinkhorn ran our log-v stopping rule before --fedotp-stop existed (its default is now the published rule)
PINNED_OLD = ["--fedotp-stop", "log-v"]
# a flag and the value that is a checkout's behaviour from before the flag existed (left out on such a checkout)
OLD_BEHAVIOUR = {"--fedotp-stop": "log-v"}
# name -> CLI flags. The first two are the "one house" refactor's acceptance runs; the rest reach every method,
# DP, the wire dtype, the live pool view and the fused backends.
CONFIGS: dict[str, list[str]] = {
    "default": ["--rounds", "3"],
    "dirichlet": ["--partition", "dirichlet", *PARTIAL],
    "synthetic-dirichlet": ["--preset", "synthetic-dirichlet", *PARTIAL],
    "promptfl": ["--method", "promptfl", "--rounds", "2"],
    "fedprox": ["--method", "fedprox", "--rounds", "2", "--fedprox-mu", "0.5"],
    "local": ["--method", "local", "--rounds", "2"],
    "zeroshot": ["--method", "zeroshot"],
    "fedotp": ["--method", "fedotp", "--rounds", "1", "--local-epochs", "2", *PINNED_OLD],
    "fedpgp": ["--method", "fedpgp", "--rounds", "2"],
    "dp": ["--rounds", "2", "--dp-epsilon", "50", "--dp-delta", "0.05", "--dp-clip", "0.3", "--frac", "0.5"],
    "wire-live": ["--rounds", "2", "--comm-dtype", "float16", "--pool-view", "live", "--lambda", "0"],
    "fused": ["--rounds", "2", "--fused"],
    # every setting that belongs to one plug-in, at a value other than its default (the house's second pass moved
    # them out of the shared config)
    "fedotp-settings": (
        "--method fedotp --rounds 1 --local-epochs 1 --fedotp-eps 0.05 --fedotp-top-percent 0.6 "
        "--fedotp-thresh 0.01 --fedotp-max-iter 50 --fedotp-stop log-v"
    ).split(),
    "fedpgp-settings": (
        "--method fedpgp --rounds 2 --fedpgp-bottleneck 2 --fedpgp-mu 1.0 --fedpgp-temperature 0.2"
    ).split(),
    "gate-settings": (
        "--rounds 2 --expert-distance cosine --d-gate 64 --heads 4 --attn-scale sqrt --reduction avgpool --lambda 1.0"
    ).split(),
    "linear-gate": "--rounds 2 --gate linear --expert-selection fixed".split(),
    "shared-gate": "--rounds 2 --gate-sharing aggregated".split(),
    # new behaviour (older checkouts refuse these): the published FedOTP stopping rule
    "fedotp-published": "--method fedotp --rounds 1 --local-epochs 2 --fedotp-stop published".split(),
    "promptfolio": "--method promptfolio --rounds 2 --promptfolio-theta 0.4".split(),
    "fedpha": "--method fedpha --rounds 2 --fedpha-local-ctx 8,16 --fedpha-rho 0.8".split(),
    "fedtpg": "--method fedtpg --rounds 2 --n-ctx 4 --fedtpg-heads 4".split(),
    "pfedmma": "--method pfedmma --model pfedmoap-tiny-vit --rounds 2 --pfedmma-lr 0.01".split(),
    "dpfpl": "--method dpfpl --rounds 2 --dpfpl-rank 4 --dpfpl-epsilon 0.4 --frac 0.5".split(),
    "base2novel": "--preset synthetic-b2n --rounds 2".split(),
    # the target protocols (new: older checkouts refuse them)
    "cross-dataset": "--eval-split cross-dataset --rounds 2 --frac 0.5".split(),
    "cross-domain": "--method fedpgp --eval-split cross-domain --eval-targets synthetic:noisy --rounds 2".split(),
    "leave-one-domain-out": "--preset synthetic-leave-one-domain-out --rounds 2".split(),
}

# fields that measure time, not results
TIMING = {"seconds", "phase_seconds"}


def _for_checkout(flags: list[str], known: str) -> list[str]:
    """``flags`` without the :data:`OLD_BEHAVIOUR` pairs that the checkout's ``--help`` text ``known`` lacks."""
    kept, i = [], 0
    while i < len(flags):
        flag = flags[i]
        if flag in OLD_BEHAVIOUR and flag not in known and flags[i + 1] == OLD_BEHAVIOUR[flag]:
            i += 2
            continue
        kept.append(flag)
        i += 1
    return kept


def run(checkout: Path, out: Path, only: list[str] | None, extra: list[str] | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    helped = subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--help"], cwd=checkout, env=env, capture_output=True, text=True
    )
    known = helped.stdout
    failed = 0
    for name, flags in CONFIGS.items():
        if only and name not in only:
            continue
        target = out / name
        if (target / "summary.json").exists():
            print(f"{name:20s} done before, kept")
            continue
        flags = [*flags, *(extra or [])]
        cmd = [sys.executable, "-m", "pfedmoap.train", *_for_checkout(flags, known), "--out", str(target)]
        cmd.append("--no-progress")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode} (see {name}.log)"
        failed += proc.returncode != 0
        print(f"{name:20s} {status}  {seconds:.1f} s")
    return 1 if failed else 0


def _rounds(path: Path) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _equal(a: object, b: object) -> bool:
    # NaN accuracies (a client without test data) compare equal to themselves here
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _refused(side: Path, name: str) -> bool:
    """Whether ``side``'s run of config ``name`` was refused for a flag or choice that checkout does not know."""
    log = side / f"{name}.log"
    text = log.read_text() if log.exists() else ""
    return any(why in text for why in ("unrecognized arguments", "invalid choice", "is not one of"))


def compare(old: Path, new: Path) -> int:
    """Every config's rounds field by field (timings excluded). A key the old side lacks is reported, not counted
    as a difference (a new field); a key the new side lost, or any differing value, is."""
    bad = 0
    for name in CONFIGS:
        old_ran, new_ran = (old / name / "metrics.jsonl").exists(), (new / name / "metrics.jsonl").exists()
        if not old_ran and new_ran and _refused(old, name):
            print(f"{name:20s} new: the old checkout refuses it (nothing to compare)")
            continue
        if not old_ran or not new_ran:
            print(f"{name:20s} missing on one side")
            bad += 1
            continue
        a, b = _rounds(old / name), _rounds(new / name)
        problems, added = [], set()
        if len(a) != len(b):
            problems.append(f"{len(a)} rounds vs {len(b)}")
        for ra, rb in zip(a, b, strict=False):  # a length difference is reported above
            lost = sorted((ra.keys() - rb.keys()) - TIMING)
            added |= (rb.keys() - ra.keys()) - TIMING
            if lost:
                problems.append(f"round {ra.get('round')}: the new side lacks {lost}")
            common = (ra.keys() & rb.keys()) - TIMING
            differ = sorted(k for k in common if not _equal(ra[k], rb[k]))
            if differ:
                problems.append(f"round {ra.get('round')}: differ in {', '.join(differ)}")
        bad += bool(problems)
        fields = len((a[0].keys() & b[0].keys()) - TIMING) if a and b else 0
        note = f"; new fields {', '.join(sorted(added))}" if added else ""
        verdict = "; ".join(problems) if problems else f"equal ({len(a)} rounds x {fields} fields)"
        print(f"{name:20s} {verdict}{note}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run every config on one checkout")
    p_run.add_argument("--checkout", type=Path, default=Path("."), help="repository root to run from")
    p_run.add_argument("--out", type=Path, required=True, help="folder for one run directory per config")
    p_run.add_argument("--only", help="comma-separated config names")
    p_run.add_argument(
        "--extra", help="flags added to every config, e.g. '--parallel-clients 1' (both sides in one order)"
    )
    p_cmp = sub.add_parser("compare", help="compare two folders written by run")
    p_cmp.add_argument("old", type=Path)
    p_cmp.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        only = args.only.split(",") if args.only else None
        return run(args.checkout.resolve(), args.out.resolve(), only, args.extra.split() if args.extra else None)
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
