"""``python -m pfedmoap.pretrain``: pretrain (or find) the tiny CLIP's weights and print where they are.

    python -m pfedmoap.pretrain [--model M] [--steps N] [--batch-size B] [--seed S] [--threads T] [--cache-dir DIR]
                                [--force] [--eval] [--eval-per-class N] [--no-progress] [--ship]

``--model`` picks the tiny CLIP (``pfedmoap-tiny``, a ResNet, or ``pfedmoap-tiny-vit``); the other settings default
to that model's shipped config. With ``--eval``, also the zero-shot accuracy per style. The pretraining itself is
:mod:`pfedmoap.model.pretraining`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch

from .base.cli import OneLineParser, run_command
from .base.errors import UserError
from .base.files import cache_dir
from .data.synthetic import CLASSNAMES, STYLES
from .model import pretraining
from .model.model_configs import TINY_MODEL, TINY_MODELS


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    configs = {name: pretraining.default_pretrain_config(name) for name in TINY_MODELS}

    def per_model(field: str) -> str:
        return ", ".join(f"{getattr(cfg, field)} for {name}" for name, cfg in configs.items())

    parser = OneLineParser(prog="python -m pfedmoap.pretrain", description=pretraining.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=TINY_MODELS,
        default=TINY_MODEL,
        help="which tiny CLIP (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default: {per_model('steps')})")
    parser.add_argument(
        "--batch-size", type=int, default=None, help=f"images per step (default: {per_model('batch_size')})"
    )
    parser.add_argument("--seed", type=int, default=None, help=f"random seed (default: {per_model('seed')})")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"torch threads (results depend on it; default: {per_model('threads')})",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="weights folder (default: $PFEDMOAP_CACHE or ~/.cache/pfedmoap)",
    )
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached weights exist")
    parser.add_argument("--eval", action="store_true", help="print zero-shot accuracy per style")
    parser.add_argument(
        "--eval-per-class",
        type=int,
        default=50,
        help="images per class and style for --eval (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--ship",
        action="store_true",
        help="(maintainers) write the weights into the package as safetensors and print their SHA-256",
    )
    args = parser.parse_args(argv)
    return run_command(parser.prog, lambda: _pretrain_command(args), "interrupted; nothing was saved")


def _pretrain_command(args: argparse.Namespace) -> int:
    given = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads}
    try:
        defaults = pretraining.default_pretrain_config(args.model)
        cfg = dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:  # PretrainConfig's own checks
        raise UserError(str(exc)) from None
    if args.eval_per_class < 1:
        raise UserError(f"--eval-per-class must be at least 1, got {args.eval_per_class}")

    cache = args.cache_dir if args.cache_dir is not None else cache_dir()
    shipped = None if args.force else pretraining.shipped_weights(cfg)
    cached = pretraining.weights_path(cfg, cache).is_file() and not args.force
    start = time.perf_counter()
    try:
        path = pretraining.ensure_tiny_clip(cache, progress=not args.no_progress, cfg=cfg, force=args.force)
    except OSError as exc:
        raise UserError(f"cannot use cache folder {cache}: {exc.strerror or exc}") from None
    took = "shipped" if shipped else "cached" if cached else f"pretrained in {time.perf_counter() - start:.0f} s"
    print(f"weights: {path} ({path.stat().st_size / 1e6:.1f} MB, {took})")
    if args.ship:
        out = pretraining.ship(path, cfg)
        print(f"shipped: {out} sha256 {hashlib.sha256(out.read_bytes()).hexdigest()} (put it in SHIPPED_SHA256)")

    if args.eval:
        n_per_class = args.eval_per_class
        model = pretraining.create_tiny_clip(cfg.image_size, pretrained=path, model=cfg.model)
        tokenizer = open_clip.get_tokenizer(cfg.model)
        with_threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            acc = pretraining.zero_shot_accuracy(
                model, tokenizer, STYLES, n_per_class=n_per_class, seed=pretraining.EVAL_SEED
            )
        finally:
            torch.set_num_threads(with_threads)
        print(
            f"zero-shot accuracy, {len(CLASSNAMES)} classes (chance {1 / len(CLASSNAMES):.1%}), "
            f'{n_per_class} images per class, prompt "{pretraining.ZERO_SHOT_TEMPLATE.format("{class}")}":'
        )
        for style, value in acc.items():
            note = "pretraining style" if style in cfg.styles else "held out"
            print(f"  {style:<10} {value:6.1%}  ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
