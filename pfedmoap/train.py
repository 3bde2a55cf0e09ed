"""CLI: ``python -m pfedmoap.train [--preset NAME] [--method M] [--fused] [--engine E] [overrides]``.

With no arguments: pFedMoAP on the synthetic world (preset "synthetic"). Flags override the preset;
the resolved config is saved as ``config.json`` in the run directory (``--print-config`` prints it and runs
nothing). Exit codes: 0 success, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import api
from .base import tracing as profiling
from .base.cli import OneLineParser, fail, run_command
from .base.errors import UserError
from .config import (
    COMM_DTYPES,
    DEFAULT_PRESET,
    DEVICES,
    EVAL_SPLITS,
    GATE_SHARINGS,
    PARTITIONS,
    POOL_VIEWS,
    SUBSAMPLES,
    TEXT_ENCODERS,
    Config,
    list_presets,
    preset_description,
)
from .engine.launch import default_run_dir
from .engine.records import History
from .engine.rundir import RunDir
from .federated import registry
from .federated.graphs import CUDA_GRAPHS
from .federated.plan import make_config
from .model.precision import PRECISIONS

PROG = "pfedmoap.train"


# flag -> (config field, type, help); flags default to "not given" so the preset's value stands. METHODS, GATES and
# SELECTIONS in a help line become the registered names when the parser is built (outside plug-ins included).
_OVERRIDES: list[tuple[str, str, Any, str]] = [
    ("--method", "method", str, "METHODS"),
    ("--dataset", "dataset", str, "a registered dataset (default: synthetic)"),
    ("--data-root", "data_root", str, "folder holding real datasets"),
    ("--model", "model", str, "open_clip architecture, e.g. RN50, ViT-B-16, pfedmoap-tiny"),
    ("--pretrained", "pretrained", str, "synthetic | none | an open_clip tag (openai) | a weights file"),
    ("--partition", "partition", str, " | ".join(PARTITIONS)),
    ("--clients", "clients", int, "number of clients N"),
    ("--frac", "frac", float, "fraction of clients sampled per round, in (0, 1]"),
    ("--rounds", "rounds", int, "communication rounds"),
    ("--local-epochs", "local_epochs", int, "local epochs per round"),
    ("--batch-size", "batch_size", int, "local batch size"),
    ("--shots", "shots", int, "train images per class (pathological split; 0 = all)"),
    ("--dirichlet-alpha", "dirichlet_alpha", float, "Dirichlet concentration for label-shift splits"),
    ("--min-client-size", "min_client_size", int, "minimum train images per client (Dirichlet splits)"),
    ("--domains", "domains", lambda s: [d for d in s.split(",") if d], "comma-separated dataset domains"),
    (
        "--eval-targets",
        "eval_targets",
        lambda s: [d for d in s.split(",") if d],
        "cross-dataset / cross-domain targets: comma-separated DATASET or DATASET:DOMAIN+DOMAIN",
    ),
    ("--held-out-domain", "held_out_domain", str, "leave-one-domain-out: the domain no client trains on"),
    ("--train-per-class", "train_per_class", int, "synthetic world: train images per class and domain"),
    ("--test-per-class", "test_per_class", int, "synthetic world: test images per class and domain"),
    ("--data-seed", "data_seed", int, "seed of the generated data"),
    ("--n-ctx", "n_ctx", int, "learnable context vectors"),
    ("--ctx-init", "ctx_init", str, "initialise the context from a phrase, e.g. 'a photo of a' (CoOp; default random)"),
    ("--text-encoder", "text_encoder", str, " | ".join(TEXT_ENCODERS)),
    ("--experts", "experts", int, "K non-local experts per client"),
    ("--gate", "gate", str, "GATES (how a client mixes its experts)"),
    ("--expert-selection", "expert_selection", str, "SELECTIONS (how experts are chosen)"),
    ("--gate-sharing", "gate_sharing", str, " | ".join(GATE_SHARINGS) + " (private = paper; aggregated = FedAvg'd)"),
    ("--pool-view", "pool_view", str, " | ".join(POOL_VIEWS) + " (snapshot = paper)"),
    ("--parallel-clients", "parallel_clients", int, "clients trained in lock step (default: all; 1: one by one)"),
    ("--lr-prompt", "lr_prompt", float, "prompt learning rate"),
    ("--momentum", "momentum", float, "SGD momentum"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--subsample", "subsample", str, " | ".join(SUBSAMPLES) + " (classes clients see; base = first half)"),
    (
        "--eval-split",
        "eval_split",
        str,
        " | ".join(EVAL_SPLITS) + " (what is scored besides each client's own test split: docs/protocols/)",
    ),
    ("--client-dropout", "client_dropout", float, "probability a sampled client fails mid-round, in [0, 1)"),
    ("--max-prompt-norm", "max_prompt_norm", float, "refuse uploaded prompts with a larger L2 norm"),
    ("--dp-epsilon", "dp_epsilon", float, "differential privacy on uploads: target epsilon per client (off if unset)"),
    ("--dp-delta", "dp_delta", float, "differential privacy delta (default 1e-5)"),
    ("--dp-clip", "dp_clip", float, "L2 clip of a client's prompt update before noise (default 1.0)"),
    ("--seed", "seed", int, "run seed (partition, init, sampling, batches)"),
    ("--device", "device", str, " | ".join(DEVICES)),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--comm-dtype", "comm_dtype", str, " | ".join(COMM_DTYPES) + " (prompts on the wire)"),
    ("--feature-cache", "feature_cache", str, "folder keeping each client's image features between runs / processes"),
    ("--precision", "precision", str, " | ".join(PRECISIONS) + " (bf16: autocast encoders and step, fp32 masters)"),
    ("--cuda-graphs", "cuda_graphs", str, " | ".join(CUDA_GRAPHS) + " (capture the training step; auto: on CUDA)"),
    ("--eval-batch-size", "eval_batch_size", int, "evaluation / feature batch size"),
    ("--out", "out", str, "run directory (must not hold another run)"),
]


def override_table() -> list[tuple[str, str, Any, str]]:
    """The shared config's flags as (flag, config field, type, help), with the registered plug-ins' names filled
    into the help lines; each plug-in's own flags come from its settings (``registry.settings()``)."""
    names = {
        "METHODS": " | ".join(registry.methods()),
        "GATES": " | ".join(registry.gates()),
        "SELECTIONS": " | ".join(registry.selections()),
    }
    table = []
    for flag, dest, kind, text in _OVERRIDES:
        head, _, tail = text.partition(" ")
        table.append((flag, dest, kind, names[head] + (" " + tail if tail else "") if head in names else text))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pfedmoap.train",
        description="Run a simulated federation of CLIP prompt learners (pFedMoAP and baselines).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--preset", help=f"named settings (default: {DEFAULT_PRESET}); see --list-presets")
    parser.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    parser.add_argument(
        "--list-methods", action="store_true", help="print the methods, gates and expert-selection rules and exit"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="check the flags, print the resolved config as JSON, run nothing"
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last complete round")
    parser.add_argument(
        "--engine",
        choices=api.ENGINES,
        help="local: in-process simulation (default); flower: Flower's simulation engine via flwr run on a local "
        "SuperLink, one SuperNode per client",
    )
    for flag, dest, kind, text in override_table():
        parser.add_argument(flag, dest=dest, type=kind, help=text)
    # each plug-in's own settings, from their declarations (pfedmoap.config.settings)
    for name, (setting, owners) in registry.settings().items():
        parser.add_argument(setting.flag, dest=name, type=setting.cli_type(), help=setting.cli_help(", ".join(owners)))
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, help="use the fused op backends")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the step's text-encoder pass (once per shape; eager with one warning if it fails)",
    )
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop + flip")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (default on)")
    parser.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="also log every round to RUN_DIR/tensorboard (pip install 'pfedmoap[tensorboard]')",
    )
    parser.add_argument("--nvtx", action="store_true", help="emit NVTX ranges for Nsight Systems (PFEDMOAP_NVTX=1)")
    parser.add_argument(
        "--profile", metavar="TRACE", help="run under torch.profiler: write a Chrome trace, print the time per range"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except UserError as exc:  # an outside plug-in that cannot be imported ($PFEDMOAP_PLUGINS)
        return fail(PROG, str(exc))
    args = vars(parser.parse_args(argv))
    if args.pop("nvtx", False):
        profiling.enable()
    trace = args.pop("profile", None)
    if args.pop("list_presets", False):
        return run_command(PROG, _list_presets)
    if args.pop("list_methods", False):
        tables = (("method", registry.methods()), ("gate", registry.gates()), ("select", registry.selections()))
        for kind, table in tables:
            for name, cls in table.items():
                print(f"{kind:6s} {name:24s} {cls.help}")
        return 0
    print_config = args.pop("print_config", False)
    resume_dir = args.pop("resume", None)
    engine = args.pop("engine", "local")
    if resume_dir is not None:
        if print_config:
            return fail(PROG, f"--print-config shows a new run's config; a resumed run's is {resume_dir}/config.json")
        others = sorted(k for k in args if k != "progress")
        if others:
            flags = {dest: flag for flag, dest, _, _ in _OVERRIDES}
            flags.update({name: setting.flag for name, (setting, _) in registry.settings().items()})
            flag = flags.get(others[0], "--" + others[0].replace("_", "-"))
            return fail(PROG, f"--resume takes the config saved in {resume_dir}; drop {flag}")
        if engine == "flower":  # Flower's own processes: not profiled here
            return _finish(lambda: api.resume(resume_dir, log=print, engine=engine))
        return _finish(lambda: api.resume(resume_dir, progress=args.get("progress"), engine=engine), trace)
    preset = args.pop("preset", DEFAULT_PRESET)
    if print_config:
        return run_command(PROG, lambda: _print_config(make_config(preset, **args)))

    def start() -> History:
        if engine == "flower":
            api.require_flower()  # before the config: what to install comes first
            return api.run(make_config(preset, **args), engine="flower", log=print)
        cfg = make_config(preset, **args)
        return api.run(cfg.replace(out=cfg.out or str(default_run_dir(cfg))))

    return _finish(start, trace if engine == "local" else None)


def _list_presets() -> int:
    lines = [f"{name:24s} {preset_description(name)}" for name in list_presets()]  # all read before any is printed
    print("\n".join(lines))
    return 0


def _print_config(cfg: Config) -> int:
    if cfg.out is not None:
        RunDir.check(cfg.out)  # what a run would refuse first
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _check_trace(trace: str) -> None:
    """Refuse (UserError) a ``--profile`` path the trace could not be written to at the end of the run: a folder, a
    path under a file or in a folder that does not exist, one that cannot be opened for writing. An existing file
    is opened to append (not changed); a new one is created and removed again."""
    path = Path(trace)
    if not trace or path.is_dir():
        raise UserError(f"profile={trace!r} must name a trace file to write (e.g. trace.json), not a folder")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UserError(f"profile={trace!r} cannot be written ({exc.strerror or type(exc).__name__})") from None
    if not existed:
        path.unlink(missing_ok=True)


def _finish(job: Callable[[], History], trace: str | None = None) -> int:
    """Run the job (under torch.profiler with ``trace``) and print its summary line."""

    def body() -> int:
        if trace is not None:
            _check_trace(trace)  # before hours of training, not at the end
        profiler = profiling.torch_profile(trace, nvtx=profiling.is_enabled()) if trace else contextlib.nullcontext()
        with profiler:
            history = job()
        s = history.summary
        b2n = ""
        if "final_hm" in s:  # --eval-split base2novel
            b2n = f"  base {s['final_base_acc']:.2f}%  novel {s['final_novel_acc']:.2f}%  hm {s['final_hm']:.2f}%"
        elif "final_targets_mean_acc" in s:  # the target protocols: the clients' and the global model's mean
            b2n = f"  targets {s['final_targets_mean_acc']:.2f}%"
            if "final_global_targets_mean_acc" in s:
                b2n += f" (global {s['final_global_targets_mean_acc']:.2f}%)"
        print(
            f"done: final {s['final_mean_acc']:.2f}%  best {s['best_mean_acc']:.2f}% (round {s['best_round']})  "
            f"last-5 mean {s['last5_mean_acc']:.2f}%{b2n}  -> {history.run_dir}"
        )
        return 0

    return run_command(PROG, body, "interrupted (rerun with --resume RUN_DIR to continue)")


if __name__ == "__main__":
    sys.exit(main())
