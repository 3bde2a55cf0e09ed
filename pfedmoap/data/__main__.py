"""CLI: ``python -m pfedmoap.data prepare NAME [NAME ...] --root DIR`` and ``python -m pfedmoap.data check --root DIR
[NAME ...]``.

``prepare`` downloads and arranges what can be downloaded and prints, one line each, what must be placed by hand;
``check`` prints one line per dataset: ``ready (counts)``, ``ready, but counts differ: ...``, ``incomplete (what is
missing)`` or ``absent``. Exit codes: 0 done (whatever was found), 1 a download failed, 2 bad input (an unknown
dataset, a root that is a file, an archive on disk with the wrong md5), 130 interrupted. The logic is in
:mod:`pfedmoap.data.prepare`.
"""

from __future__ import annotations

import argparse

from ..base.cli import OneLineParser, run_command
from . import prepare as prep

PROG = "pfedmoap.data"


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(prep.dataset_names())
    parser = OneLineParser(
        prog=f"python -m {PROG}", description="Download, arrange and check the on-disk datasets (CoOp's layout)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare,check}")
    p = commands.add_parser(
        "prepare",
        help="download and arrange datasets under DIR; list what must be placed by hand",
        description=f"Datasets: {names}.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="datasets to prepare")
    p.add_argument("--root", required=True, metavar="DIR", help="the data root (the loaders' --data-root)")
    c = commands.add_parser(
        "check", help="say for each dataset under DIR: ready, incomplete or absent", description=f"Datasets: {names}."
    )
    c.add_argument("names", nargs="*", metavar="NAME", help="datasets to check (default: all)")
    c.add_argument("--root", required=True, metavar="DIR", help="the data root (the loaders' --data-root)")
    return parser


def _prepare(names: list[str], root: str) -> int:
    prep._validate_names(names)  # every name is checked before anything is downloaded
    for name in names:
        done = prep.prepare_dataset(name, root)
        print(done.status.line(), flush=True)
        for line in done.by_hand:
            print(line, flush=True)
    return 0


def _check(names: list[str], root: str) -> int:
    for status in prep.check(root, names):
        print(status.line(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        return run_command(
            PROG, lambda: _prepare(args.names, args.root), "interrupted (run the same command again to continue)"
        )
    return run_command(PROG, lambda: _check(args.names, args.root))


if __name__ == "__main__":
    raise SystemExit(main())
