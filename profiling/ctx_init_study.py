"""Does CoOp's phrase initialisation restore the paper's baseline ordering on the embedded benchmark?

    python profiling/ctx_init_study.py [--out runs/ctxinit] [--rounds 30] [--seed 1]

Runs PromptFL, FedProx, CoOp (local) and pFedMoAP on the synthetic preset with three initial contexts:
random with n_ctx = 16 (the paper's default), random with n_ctx = 4, and "a photo of a" with n_ctx = 4 (CoOp's
form, which starts exactly at the hand-written prompt), for ``--rounds`` rounds. A finished run (its
``summary.json`` exists) is reused. Prints mean client accuracy at round 10 and at the last round; rounds are a
prefix of a longer run (constant learning rates, same streams), so round 10 is what a 10-round run gives. Also
runs the control: PromptFL on an IID split (every client sees every class) against zero-shot.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pfedmoap import make_config, run  # noqa: E402

METHODS = ("promptfl", "fedprox", "local", "pfedmoap")
INITS = {
    "random16": {},
    "random4": {"n_ctx": 4},
    "phrase4": {"n_ctx": 4, "ctx_init": "a photo of a"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ctxinit"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    table: dict[tuple[str, str], list[float]] = {}
    for method in METHODS:
        for init, extra in INITS.items():
            out = args.out / f"{method}-{init}"
            if not (out / "summary.json").is_file():
                cfg = make_config(
                    "synthetic", method=method, rounds=args.rounds, seed=args.seed, progress=False, **extra
                )
                run(cfg, out=out, log=lambda m: None)
            lines = (out / "metrics.jsonl").read_text().splitlines()
            table[(method, init)] = [json.loads(line)["mean_acc"] for line in lines if line.strip()]
    finals = {}
    # the control: the same world with an IID split (every client sees all 40 classes), 10 rounds
    for name, extra in (
        ("zeroshot", {"method": "zeroshot"}),
        ("promptfl-iid", {"method": "promptfl", "partition": "iid"}),
    ):
        out = args.out / name
        if not (out / "summary.json").is_file():
            run(make_config("synthetic", seed=args.seed, progress=False, **extra), out=out, log=lambda m: None)
        finals[name] = json.loads((out / "summary.json").read_text())["final_mean_acc"]
    print(f"zero-shot: {finals['zeroshot']:.2f}; PromptFL with an IID split, 10 rounds: {finals['promptfl-iid']:.2f}\n")
    print("| method | " + " | ".join(f"{i} r10 | {i} r{args.rounds}" for i in INITS) + " |")
    print("|---|" + "---|---|" * len(INITS))
    for method in METHODS:
        cells = []
        for init in INITS:
            accs = table[(method, init)]
            cells += [f"{accs[9]:.2f}", f"{accs[-1]:.2f}"]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
