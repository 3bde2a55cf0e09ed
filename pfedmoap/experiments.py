"""Run methods x seeds on presets and write a results table (markdown + JSON).

    python -m pfedmoap.experiments --preset synthetic --methods zeroshot,local,promptfl,fedprox,pfedmoap \
        --seeds 1,2,3 --out runs/table

Each (preset, method, seed) run gets its own run directory under ``--out``; the table goes to
``results.md`` / ``results.json`` and the plots to ``plots/<preset>/*.png`` (needs matplotlib). A run
whose ``summary.json`` exists is skipped, so an interrupted sweep resumes where it stopped.

    python -m pfedmoap.experiments --suite ablations --out runs/ablations

runs an ablation suite instead (:mod:`pfedmoap.research.ablations`: the built-in ``ablations``, or a JSON file of your
own grid) and writes ``ablations.md``, ``ablations.json`` and ``plots/<study>.png``; ``--readme README.md`` also
fills the README's "Ablations" section from it.

    python -m pfedmoap.experiments --study gate-outside-fl --out runs/gate-study [--dataset pacs --data-root ~/data]

runs a study outside federated learning instead (:mod:`pfedmoap.research.gate_study`: K+1 prompts trained on source
domains, the attention, linear and average gates trained on a few labelled shots of a held-out domain, against
baselines; ``--target-shots``, ``--seeds``, and ``--set`` for the study's other settings) and writes
``gate_study.md`` and ``gate_study.json``.

The sweeps themselves are :mod:`pfedmoap.research.sweeps`; this module is the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .base.cli import OneLineParser, fail, run_command
from .base.errors import UserError
from .config import load_preset
from .research.ablations import main_suite
from .research.gate_study import STUDIES, main_study
from .research.sweeps import (
    DEFAULT_ROWS,
    VARIANTS,
    base2novel_table,
    markdown_table,
    paper_table,
    run_sweep,
    targets_table,
    write_plots,
)

PROG = "pfedmoap.experiments"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m pfedmoap.experiments", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", help="comma-separated presets (default: synthetic)")
    p.add_argument("--methods", help=f"comma-separated rows from: {', '.join(VARIANTS)} (default: {DEFAULT_ROWS})")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds (default: 1,2,3, or the suite's)")
    p.add_argument(
        "--suite",
        help="run an ablation suite instead of a table: a built-in name (ablations) or a JSON file of your own grid",
    )
    p.add_argument(
        "--study",
        help=f"run a study instead of a table: {', '.join(STUDIES)} (the attention gate against a linear gate "
        "outside FL, leave-one-domain-out)",
    )
    p.add_argument("--dataset", help="with --study: a dataset with domains (default synthetic; pacs, office-home, ...)")
    p.add_argument("--data-root", help="with --study: the folder holding --dataset's images")
    p.add_argument(
        "--target-shots", type=_positive, help="with --study: labelled images per class of the held-out domain (4)"
    )
    p.add_argument("--readme", help="with --suite: fill this README's ablation section from the suite's report")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="with --suite: run nothing, report the finished runs (an unfinished study is marked as such)",
    )
    p.add_argument("--rounds", type=int, help="override the presets' rounds (e.g. for a quick check)")
    p.add_argument("--out", default="runs/experiments")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field in every run, e.g. --set data_root=~/data --set rounds=3 (JSON values)",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    args = p.parse_args(argv)
    if args.suite is None and (args.readme is not None or args.report_only):
        return fail(PROG, f"{'--readme' if args.readme is not None else '--report-only'} needs --suite")
    study_flags = (("--dataset", args.dataset), ("--data-root", args.data_root), ("--target-shots", args.target_shots))
    if args.study is None:
        given = [flag for flag, value in study_flags if value is not None]
        if given:
            return fail(PROG, f"{given[0]} needs --study")
    else:
        if args.suite is not None:
            return fail(PROG, "--study and --suite are two different runs: give one")
        others = (("--preset", args.preset), ("--methods", args.methods), ("--rounds", args.rounds))
        given = [flag for flag, value in others if value is not None]
        if given:
            return fail(PROG, f"{given[0]} does not apply to --study (a study names its own runs)")
        if args.study not in STUDIES:
            return fail(PROG, f"study={args.study!r} is not one of: {', '.join(STUDIES)}")
    if args.suite is not None:
        given = [flag for flag, value in (("--preset", args.preset), ("--methods", args.methods)) if value]
        if given:
            return fail(PROG, f"{given[0]} does not apply to --suite (a suite names its own presets and methods)")
    if args.seeds is not None and not args.seeds:
        return fail(PROG, "seeds is empty")
    variants = [v for v in (args.methods or DEFAULT_ROWS).split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        return fail(PROG, f"methods={bad[0]!r} is not one of: {', '.join(VARIANTS)}")
    overrides: dict[str, Any] = {"progress": args.progress}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return fail(PROG, f"--set {item!r} is not KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string, e.g. a path
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    out = Path(args.out)
    if args.study is not None:
        dataset = args.dataset or "synthetic"
        return run_command(
            PROG,
            lambda: main_study(
                args.study, out, args.seeds or [1, 2, 3], dataset, args.data_root, args.target_shots, overrides
            ),
            "interrupted (the study writes its report at the end: nothing was written; rerun)",
        )
    if args.suite is not None:
        overrides.pop("progress")  # a suite's runs never draw bars; it prints one line per run
        readme = Path(args.readme) if args.readme else None
        return run_command(
            PROG,
            lambda: main_suite(
                args.suite, out, overrides, args.seeds, args.plots, readme, report_only=args.report_only
            ),
            "interrupted (finished runs are kept, the interrupted one resumes from its last round; rerun to go on)",
        )
    presets = [x for x in (args.preset or "synthetic").split(",") if x]
    seeds = args.seeds or [1, 2, 3]
    return run_command(
        PROG,
        lambda: _report(presets, variants, seeds, out, overrides, args.plots),
        "interrupted (finished runs are kept; rerun to resume)",
    )


def _report(
    presets: list[str], variants: list[str], seeds: list[int], out: Path, overrides: dict[str, Any], plots: bool
) -> int:
    results = run_sweep(presets, variants, seeds, out, overrides)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        try:
            for path in write_plots(out, presets, variants, seeds):
                print(f"wrote {path}", file=sys.stderr)
        except UserError as exc:  # matplotlib missing: the table is still written
            print(f"{PROG}: no plots: {exc}", file=sys.stderr)
    text = []
    for metric, title in (("final", "final round"), ("best", "best round"), ("last5", "mean of the last 5 rounds")):
        text.append(f"### Mean client accuracy (%), {title}, mean ± std over seeds {seeds}\n")
        text.append(markdown_table(results, metric) + "\n")
    for preset in presets:
        b2n = base2novel_table(results, preset)
        if b2n:
            text.append(f"### Base-to-novel on {preset} (%), final round, mean ± std over seeds {seeds}\n")
            text.append(b2n + "\n")
    for preset in presets:
        table = targets_table(results, preset)
        if table:
            split = load_preset(preset).get("eval_split", "")
            text.append(f"### {split} on {preset} (%), final round, mean ± std over seeds {seeds}\n")
            text.append(table + "\n")
    comparison = paper_table(results)
    if comparison:
        text.append("### Final-round accuracy (%) next to the paper's (ICLR 2025)\n")
        text.append(comparison + "\n")
    report = "\n".join(text)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
