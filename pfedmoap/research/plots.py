"""PNG plots of runs: accuracy per round, gate attention per expert, per-client accuracy, bytes per round.

Needs matplotlib (``pip install 'pfedmoap[plots]'``); everything else in the library works without it.
Each function takes ``runs``: a mapping from a label (a method) to a list of runs, each run being its
list of per-round metric records (``metrics.jsonl`` rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import UserError

Runs = Mapping[str, Sequence[Sequence[dict[str, Any]]]]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'pfedmoap[plots]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)  # pyplot keeps every figure open otherwise: a suite of many plots would hold them all
    return path


def accuracy_per_round(runs: Runs, path: Path) -> Path:
    """Mean client accuracy per round, averaged over seeds (band: min..max over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        length = min(len(r) for r in seeds)
        rounds = [rec["round"] for rec in seeds[0][:length]]
        accs = np.array([[rec["mean_acc"] for rec in r[:length]] for r in seeds])
        ax.plot(rounds, accs.mean(0), marker="o" if length < 30 else None, label=label)
        if len(seeds) > 1:
            ax.fill_between(rounds, accs.min(0), accs.max(0), alpha=0.2)
    ax.set(xlabel="round", ylabel="mean client accuracy (%)", title="Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def attention_per_expert(rounds: Sequence[dict[str, Any]], path: Path) -> Path:
    """Average gate weight of the local expert and of the non-local experts sorted by weight (as the
    paper's Fig. 6), over the clients of the last round that has gate weights."""
    plt = _pyplot()
    with_gate = [r for r in rounds if r.get("client_attention")]
    if not with_gate:
        raise UserError("no gate attention in these metrics (method without a gate, or no round with experts)")
    rows = [np.asarray(w) for w in with_gate[-1]["client_attention"].values()]
    width = max(len(w) for w in rows)
    table = np.full((len(rows), width), np.nan)
    for i, w in enumerate(rows):
        table[i, 0] = w[0]
        table[i, 1 : len(w)] = np.sort(w[1:])[::-1]
    mean, std = np.nanmean(table, 0), np.nanstd(table, 0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["local"] + [f"non-local {k}" for k in range(1, width)]
    colors = ["tab:red"] + ["tab:blue"] * (width - 1)
    ax.bar(range(width), mean, yerr=std, color=colors, capsize=3)
    ax.set_xticks(range(width), names, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="average attention weight", title=f"Gate attention per expert (round {with_gate[-1]['round']})")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def client_accuracy(runs: Runs, path: Path) -> Path:
    """Distribution of the per-client accuracy in the final round (all seeds pooled), one box per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(runs)
    data = [[a for r in runs[k] for a in r[-1]["client_acc"] if a == a] for k in labels]
    ax.boxplot(data)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="client accuracy (%)", title="Per-client accuracy, final round")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def bytes_per_round(runs: Runs, path: Path) -> Path:
    """Bytes sent down (server -> clients) and up per round, first seed of each label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        rounds = [rec["round"] for rec in seeds[0]]
        ax.plot(rounds, [rec["bytes_down"] / 1024 for rec in seeds[0]], label=f"{label} down")
        ax.plot(rounds, [rec["bytes_up"] / 1024 for rec in seeds[0]], linestyle="--", label=f"{label} up")
    ax.set(xlabel="round", ylabel="KiB", title="Communication per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- ablation studies
# Each takes one study of :func:`pfedmoap.research.ablations.summarise`: its ``axes``, ``title`` and ``rows`` (each with
# ``values``, ``label``, ``final`` = (mean, std) and bytes).


def metric_vs_value(study: dict[str, Any], path: Path) -> Path:
    """Final accuracy (mean ± std over seeds) against the study's one varied field."""
    plt = _pyplot()
    axis = study["axes"][0]
    rows = study["rows"]
    xs = list(range(len(rows)))
    mean = [r["final"][0] for r in rows]
    std = [r["final"][1] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(xs, mean, yerr=std, marker="o", capsize=4)
    ax.set_xticks(xs, [str(r["values"][axis]) for r in rows])
    ax.set(xlabel=axis, ylabel="final mean client accuracy (%)", title=study["title"])
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def case_bars(study: dict[str, Any], path: Path) -> Path:
    """One bar per case (mean ± std over seeds)."""
    plt = _pyplot()
    rows = study["rows"]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.8))
    ax.bar(range(len(rows)), [r["final"][0] for r in rows], yerr=[r["final"][1] for r in rows], capsize=4)
    ax.set_xticks(range(len(rows)), [r["label"].replace(", ", "\n") for r in rows], fontsize=7)
    low = min(r["final"][0] - r["final"][1] for r in rows)
    ax.set_ylim(max(0.0, low - 5), None)
    ax.set(ylabel="final mean client accuracy (%)", title=study["title"])
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def bytes_vs_value(study: dict[str, Any], path: Path) -> Path:
    """Measured and theoretical bytes per round (down and up) against the varied field, accuracy beside."""
    plt = _pyplot()
    axis = study["axes"][0]
    rows = study["rows"]
    xs = [r["values"][axis] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, style in (("down", "-"), ("up", "--")):
        left.plot(xs, [r[f"last_round_bytes_{key}"] / 1024 for r in rows], "o" + style, label=f"measured {key}")
        if all(f"theoretical_bytes_{key}" in r for r in rows):
            left.plot(xs, [r[f"theoretical_bytes_{key}"] / 1024 for r in rows], "x:", label=f"theoretical {key}")
    left.set(xlabel=axis, ylabel="KiB per round", title="Bytes per round (last round)")
    left.set_xscale("log", base=2)
    left.set_yscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.errorbar(xs, [r["final"][0] for r in rows], yerr=[r["final"][1] for r in rows], marker="o", capsize=4)
    right.set_xscale("log", base=2)
    right.set_xticks(xs, [str(x) for x in xs])
    right.set(xlabel=axis, ylabel="final mean client accuracy (%)", title="Accuracy")
    right.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_heatmap(study: dict[str, Any], path: Path) -> Path:
    """Final accuracy over the study's two varied fields (rows: the first, columns: the second)."""
    plt = _pyplot()
    first, second = study["axes"]
    rows = study["rows"]
    ys = list(dict.fromkeys(r["values"][first] for r in rows))
    xs = list(dict.fromkeys(r["values"][second] for r in rows))
    grid = np.full((len(ys), len(xs)), np.nan)
    std = np.full_like(grid, np.nan)
    for r in rows:
        i, j = ys.index(r["values"][first]), xs.index(r["values"][second])
        grid[i, j], std[i, j] = r["final"]
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 0.9 * len(ys) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(ys)):
        for j in range(len(xs)):
            if grid[i, j] == grid[i, j]:
                ax.text(j, i, f"{grid[i, j]:.1f}\n± {std[i, j]:.1f}", ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set(xlabel=second, ylabel=first, title=study["title"])
    ax.title.set_fontsize(8)
    fig.colorbar(image, ax=ax, label="final accuracy (%)")
    return _save(fig, path)
