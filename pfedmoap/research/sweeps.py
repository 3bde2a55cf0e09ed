"""Methods x seeds on presets: the runs, the results tables (markdown + JSON) and the plots of a sweep.

Each (preset, method, seed) run gets its own run directory; a run whose ``summary.json`` exists is skipped, so an
interrupted sweep resumes where it stopped. ``python -m pfedmoap.experiments`` is the command over this module
(and over :mod:`pfedmoap.research.ablations` for ``--suite``). "pfedmoap-lambda0" is pFedMoAP with lambda = 0 (the
paper's ablation row); "fedotp", "fedpgp", "promptfolio", "fedpha", "fedtpg" (with its paper's n_ctx of 4) and
"dpfpl" (without noise; "dpfpl-eps04" at its paper's largest epsilon) are the competitors. A base-to-novel preset
(``*-b2n``) also gets a Local / Base / Novel / HM table, beside the averages pFedMMA reports for the methods it
compares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..base.files import read_json
from ..engine.records import seed_stats
from ..federated.plan import make_config

DEFAULT_ROWS = "zeroshot,local,promptfl,pfedmoap"

# table rows: name -> (method, config overrides); labels as in the paper's tables
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "zeroshot": ("zeroshot", {}, "Zero-shot CLIP"),
    "local": ("local", {}, "CoOp (local only)"),
    "promptfl": ("promptfl", {}, "PromptFL (FedAvg prompt)"),
    "fedprox": ("fedprox", {}, "PromptFL + FedProx"),
    "pfedmoap-lambda0": ("pfedmoap", {"lam": 0.0}, "pFedMoAP, lambda = 0"),
    "fedotp": ("fedotp", {}, "FedOTP (global + local prompt, OT)"),
    "fedpgp": ("fedpgp", {}, "FedPGP (global + low-rank prompt)"),
    "promptfolio": ("promptfolio", {}, "PromptFolio (global + local text features, mixed)"),
    "fedpha": ("fedpha", {}, "FedPHA (global + projected local prompt)"),
    "fedtpg": ("fedtpg", {"n_ctx": 4}, "FedTPG (shared prompt generator, n_ctx 4)"),
    "dpfpl": ("dpfpl", {}, "DP-FPL, no noise (global + low-rank local prompt, per-batch sync)"),
    "dpfpl-eps04": ("dpfpl", {"dpfpl_epsilon": 0.4}, "DP-FPL, epsilon 0.4"),
    "pfedmoap": ("pfedmoap", {}, "pFedMoAP, lambda = 0.5"),
    # on the ViT tiny CLIP (pFedMMA adapts ViT blocks): pFedMMA, and the rows it is read against on the same backbone
    "zeroshot-vit": ("zeroshot", {"model": "pfedmoap-tiny-vit"}, "Zero-shot CLIP (tiny ViT)"),
    "pfedmma": ("pfedmma", {"model": "pfedmoap-tiny-vit"}, "pFedMMA (tiny ViT, its lr 0.001)"),
    "pfedmma-lr01": ("pfedmma", {"model": "pfedmoap-tiny-vit", "pfedmma_lr": 0.01}, "pFedMMA (tiny ViT, lr 0.01)"),
    "pfedmoap-vit": ("pfedmoap", {"model": "pfedmoap-tiny-vit"}, "pFedMoAP, lambda = 0.5 (tiny ViT)"),
    "pfedmoap-vit-init": (
        "pfedmoap",
        {"model": "pfedmoap-tiny-vit", "ctx_init": "a photo of a", "n_ctx": 4},
        "pFedMoAP, lambda = 0.5 (tiny ViT, CoOp's init)",
    ),
}


# The paper's headline results (personalised accuracy %, mean of 3 seeds; ICLR 2025, Table 1-3), by dataset.
_PAPER_DATASETS = (
    "flowers102",
    "oxfordpets",
    "food101",
    "caltech101",
    "dtd",
    "cifar10",
    "cifar100",
    "domainnet",
    "office-caltech10",
)
_PAPER_ROWS = {
    "zeroshot": (62.17, 84.47, 75.27, 85.14, 40.21, 53.46, 32.68, 9.81, 9.40),
    "local": (70.14, 83.21, 70.43, 87.37, 44.23, 80.84, 48.74, 36.99, 32.37),
    "promptfl": (72.80, 90.79, 77.31, 89.70, 54.11, 73.29, 45.00, 24.48, 23.41),
    "fedprox": (66.40, 89.24, 76.24, 89.41, 44.26, 73.32, 45.63, 20.27, 20.51),
    "pfedmoap-lambda0": (97.61, 94.83, 86.71, 95.71, 85.64, None, None, None, None),
    # FedOTP's row in the pFedMoAP paper's Table 1 (same pathological setting)
    "fedotp": (96.23, 98.82, 92.73, 97.02, 87.64, None, None, None, None),
    "pfedmoap": (98.41, 99.06, 93.39, 97.95, 89.13, 83.46, 53.42, 38.80, 38.31),
}
PAPER_RESULTS: dict[str, dict[str, float]] = {
    ds: {row: vals[i] for row, vals in _PAPER_ROWS.items() if vals[i] is not None}
    for i, ds in enumerate(_PAPER_DATASETS)
}


# Base-to-novel as pFedMMA (ICLR'26) reports it: Local / Base / Novel / HM (the 3-way harmonic mean), averaged
# over 7 CLIP datasets, ViT-B/16, 16 shots (from a third-party summary of the paper; per-dataset numbers unseen)
PFEDMMA_BASE2NOVEL: dict[str, tuple[float, float, float, float]] = {
    "zeroshot": (76.36, 76.81, 81.21, 78.03),
    "fedpgp": (95.38, 76.49, 71.68, 79.09),
    "fedotp": (97.34, 18.00, 36.69, 31.08),
    "pfedmoap": (97.89, 61.82, 66.60, 71.05),
    "pfedmma": (97.17, 77.40, 81.49, 84.15),
}
B2N_COLUMNS = (("local", "Local"), ("base", "Base"), ("novel", "Novel"), ("hm", "HM"))


def base2novel_table(results: dict[str, Any], preset: str) -> str | None:
    """Local / base / novel / HM (final round, mean ± std over seeds) of one base-to-novel preset, with
    pFedMMA's reported averages beside each method it reports."""
    rows = results.get(preset, {})
    if not rows or not all("b2n" in r for r in rows.values()):
        return None
    lines = [
        "| Method | "
        + " | ".join(title for _, title in B2N_COLUMNS)
        + " | pFedMMA's report (7 datasets): L / B / N / HM |",
        "|---|" + "---|" * (len(B2N_COLUMNS) + 1),
    ]
    for name, r in rows.items():
        cells = [f"{r['b2n'][key][0]:.2f} ± {r['b2n'][key][1]:.2f}" for key, _ in B2N_COLUMNS]
        reported = PFEDMMA_BASE2NOVEL.get(VARIANTS[name][0] if name != "pfedmoap-lambda0" else "")
        ref = " / ".join(f"{v:.2f}" for v in reported) if reported else "-"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {ref} |")
    return "\n".join(lines)


def targets_table(results: dict[str, Any], preset: str) -> str | None:
    """A target protocol's table (cross-dataset, cross-domain, leave-one-domain-out) for one preset: each method's
    own-split accuracy, its clients' mean accuracy on each target, their mean, and the global model's mean (final
    round; mean ± std over seeds), and the best round's target mean (FLiP's choice) for comparison."""
    rows = results.get(preset, {})
    if not rows or not all("targets" in r for r in rows.values()):
        return None
    first = next(iter(rows.values()))["targets"]
    names = [n for n in first if n not in TARGET_SUMMARY and n != "local"]
    columns = [("local", "Own split"), *((n, n) for n in names), *TARGET_SUMMARY.items()]
    lines = ["| Method | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---|" * len(columns)]
    for r in rows.values():
        cells = []
        for key, _ in columns:
            stat = r["targets"].get(key)
            cells.append("-" if stat is None else f"{stat[0]:.2f} ± {stat[1]:.2f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# a target table's summary columns: summary.json's key (less "final_" / "_acc") -> the column's title
TARGET_SUMMARY = {
    "targets_mean": "Targets, mean",
    "global_targets_mean": "Global model, targets mean",
    "best_targets_mean": "Targets mean, best round",
}


def _target_values(summary: dict[str, Any]) -> dict[str, float]:
    """The target columns of one run's summary.json (empty when its protocol has no targets)."""
    if "final_targets_mean_acc" not in summary:
        return {}
    out = {"local": summary["final_local_acc"]}
    out.update({n: summary[f"final_{n}_acc"] for n in summary["eval_sets"] if not n.startswith("global@")})
    out["targets_mean"] = summary["final_targets_mean_acc"]
    if "final_global_targets_mean_acc" in summary:
        out["global_targets_mean"] = summary["final_global_targets_mean_acc"]
    out["best_targets_mean"] = summary["best_targets_mean_acc"]
    return out


def paper_table(results: dict[str, Any]) -> str | None:
    """Ours (final round, mean ± std) next to the paper's number, for presets of the paper's datasets."""
    from ..config import load_preset

    columns = [(p, load_preset(p).get("dataset")) for p in results]
    columns = [(p, ds) for p, ds in columns if ds in PAPER_RESULTS]
    if not columns:
        return None
    variants = list(results[columns[0][0]])
    lines = ["| Method | " + " | ".join(f"{p} (ours / paper)" for p, _ in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for name in variants:
        cells = []
        for p, ds in columns:
            mean, std = results[p][name]["final"]
            paper = PAPER_RESULTS[ds].get(name)
            cells.append(
                f"{mean:.2f} ± {std:.2f} / {paper:.2f}" if paper is not None else f"{mean:.2f} ± {std:.2f} / -"
            )
        lines.append(f"| {results[columns[0][0]][name]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_sweep(
    presets: list[str],
    variants: list[str],
    seeds: list[int],
    out: Path,
    overrides: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run (or reuse) every (preset, variant, seed) and return {preset: {variant: {...stats}}}."""
    from ..engine.launch import run

    results: dict[str, Any] = {}
    for preset in presets:
        results[preset] = {}
        for name in variants:
            method, extra, label = VARIANTS[name]
            finals, bests, last5s = [], [], []
            b2n: dict[str, list[float]] = {key: [] for key, _ in B2N_COLUMNS}
            targets: dict[str, list[float]] = {}
            for seed in seeds:
                run_dir = out / preset / name / f"seed{seed}"
                summary_file = run_dir / "summary.json"
                if not summary_file.exists():
                    if run_dir.exists():  # an interrupted run: start it again from scratch
                        for f in ("config.json", "metrics.jsonl"):
                            (run_dir / f).unlink(missing_ok=True)
                    cfg = make_config(preset, method=method, seed=seed, **extra, **(overrides or {}))
                    log(f"== {preset} / {name} / seed {seed}")
                    run(cfg, out=run_dir, log=log)
                summary = read_json(summary_file, "summary.json")
                finals.append(summary["final_mean_acc"])
                bests.append(summary["best_mean_acc"])
                last5s.append(summary["last5_mean_acc"])
                for key, _ in B2N_COLUMNS:
                    field = "final_hm" if key == "hm" else f"final_{key}_acc"
                    if field in summary:
                        b2n[key].append(summary[field])
                for key, value in _target_values(summary).items():
                    targets.setdefault(key, []).append(value)
            results[preset][name] = {
                "label": label,
                "seeds": seeds,
                "final": seed_stats(finals),
                "best": seed_stats(bests),
                "last5": seed_stats(last5s),
                "final_per_seed": finals,
            }
            if all(len(v) == len(seeds) for v in b2n.values()):
                results[preset][name]["b2n"] = {k: seed_stats(v) for k, v in b2n.items()}
            if targets and all(len(v) == len(seeds) for v in targets.values()):
                results[preset][name]["targets"] = {k: seed_stats(v) for k, v in targets.items()}
    return results


def write_plots(out: Path, presets: list[str], variants: list[str], seeds: list[int]) -> list[Path]:
    """PNG plots per preset under ``out/plots/<preset>/``: accuracy per round, gate attention per expert
    (pFedMoAP), per-client accuracy, bytes per round."""
    from ..engine.rundir import read_metrics
    from . import plots

    written = []
    for preset in presets:
        runs = {
            VARIANTS[name][2]: [read_metrics(out / preset / name / f"seed{seed}") for seed in seeds]
            for name in variants
        }
        folder = out / "plots" / preset
        written.append(plots.accuracy_per_round(runs, folder / "accuracy.png"))
        written.append(plots.client_accuracy(runs, folder / "client_accuracy.png"))
        written.append(plots.bytes_per_round(runs, folder / "bytes.png"))
        gated = [name for name in variants if VARIANTS[name][0] == "pfedmoap"]
        if gated:
            # the main pFedMoAP row (lambda = 0.5) when present, else the ablation
            name = "pfedmoap" if "pfedmoap" in gated else gated[0]
            rounds = runs[VARIANTS[name][2]][0]  # its first seed, already read above
            if any(r.get("client_attention") for r in rounds):
                written.append(plots.attention_per_expert(rounds, folder / "attention.png"))
    return written


def markdown_table(results: dict[str, Any], metric: str = "final") -> str:
    presets = list(results)
    variants = list(next(iter(results.values()))) if results else []
    header = "| Method | " + " | ".join(presets) + " |"
    lines = [header, "|---|" + "---|" * len(presets)]
    for name in variants:
        label = results[presets[0]][name]["label"]
        cells = []
        for p in presets:
            mean, std = results[p][name][metric]
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
