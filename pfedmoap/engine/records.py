"""What a run produces, as data: each round's :class:`RoundRecord`, a run's summary and its :class:`History`.

Both engines make the same records (through :class:`~pfedmoap.engine.rounds.RoundDriver`); ``metrics.jsonl`` holds one
:meth:`RoundRecord.to_json` per line and ``summary.json`` :func:`summarize`'s object. Nothing here imports an
engine.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..federated import wire as comm

if TYPE_CHECKING:
    from ..config import Config


DP_FIELDS = ("dp_noise_multiplier", "dp_epsilon_spent", "dp_max_uploads")
SPLITS = ("base", "novel")  # the shared evaluation sets of --eval-split base2novel
GLOBAL = "global@"  # a column of the federation's global model on a shared set (the target protocols)


def is_base2novel(names: Collection[str]) -> bool:
    """Whether the shared evaluation sets are base-to-novel's (summarised by a harmonic mean) rather than targets
    (summarised by their mean)."""
    return set(names) == set(SPLITS)


def split_order(name: str) -> tuple[int, int, str]:
    """Columns in a fixed order on every engine: base, novel; then targets by name; then the global model's."""
    return (SPLITS.index(name) if name in SPLITS else len(SPLITS), int(name.startswith(GLOBAL)), name)


def harmonic_mean(values: list[float]) -> float:
    """Harmonic mean (NaN if any value is NaN, 0 if any is 0)."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


@dataclass
class RoundRecord:
    """What one round did and measured; :meth:`to_json` is its line in ``metrics.jsonl``.

    Client ids are ints here and strings in JSON (JSON object keys). ``client_acc`` has every client, NaN where a
    client has no test data or its evaluation failed.
    """

    round: int
    mean_acc: float
    std_acc: float
    client_acc: list[float]
    sampled: list[int]
    experts: dict[int, list[int]]
    client_attention: dict[int, list[float]]
    client_bytes_down: dict[int, int]
    client_bytes_up: dict[int, int]
    rejected_uploads: list[tuple[int, str]]
    dropped: list[int]
    seconds: float
    phase_seconds: dict[str, float]
    failed: dict[int, str] = field(default_factory=dict)  # sampled clients that never delivered an upload
    eval_failed: dict[int, str] = field(default_factory=dict)  # clients whose evaluation failed
    # differential privacy (None when off): the noise multiplier, and the largest epsilon any client has spent so
    # far with its number of uploads
    dp_noise_multiplier: float | None = None
    dp_epsilon_spent: float | None = None
    dp_max_uploads: int | None = None
    # --eval-split base2novel: every client's accuracy on the shared base and novel sets ({} otherwise)
    client_split_acc: dict[str, list[float]] = field(default_factory=dict)

    @property
    def split_acc(self) -> dict[str, float]:
        """Mean over clients of each shared set's accuracy, and the protocol's summary. Base-to-novel: ``hm``, the
        harmonic mean of the mean local, base and novel accuracies (the 3-way HM that pFedMMA's tables fit; PMFLT's
        code averages a per-client HM of base and novel only). Target protocols: ``mean``, the mean over the targets
        of the clients' mean accuracy, and ``global_mean``, the global model's mean over the targets (when scored).
        Empty under ``--eval-split local``."""
        if not self.client_split_acc:
            return {}
        means = {name: mean_std(accs)[0] for name, accs in self.client_split_acc.items()}
        if is_base2novel(means):
            return {**means, "hm": harmonic_mean([self.mean_acc, *means.values()])}
        targets = [v for k, v in means.items() if not k.startswith(GLOBAL)]
        globals_ = [v for k, v in means.items() if k.startswith(GLOBAL)]
        out = {**means, "mean": mean_std(targets)[0]}
        if globals_:
            out["global_mean"] = mean_std(globals_)[0]
        return out

    @property
    def client_hm(self) -> list[float]:
        """Each client's harmonic mean of its local, base and novel accuracies."""
        columns = [self.client_acc, *self.client_split_acc.values()]
        return [harmonic_mean(list(vals)) for vals in zip(*columns, strict=True)]

    @property
    def bytes_down(self) -> int:
        return sum(self.client_bytes_down.values())

    @property
    def bytes_up(self) -> int:
        return sum(self.client_bytes_up.values())

    @property
    def num_failed(self) -> int:
        return len(self.failed)

    @property
    def num_rejected(self) -> int:
        return len(self.rejected_uploads)

    @property
    def num_eval_failed(self) -> int:
        return len(self.eval_failed)

    def to_json(self) -> dict[str, Any]:
        """The record as one JSON object (the ``metrics.jsonl`` line; keys are the documented ones)."""

        def keyed(d: Mapping[int, Any]) -> dict[str, Any]:
            return {str(k): v for k, v in d.items()}

        def listed(d: Mapping[int, str]) -> list[dict[str, Any]]:
            return [{"client": c, "reason": r} for c, r in sorted(d.items())]

        return {
            "round": self.round,
            "mean_acc": self.mean_acc,
            "std_acc": self.std_acc,
            "client_acc": list(self.client_acc),
            "sampled": list(self.sampled),
            "experts": keyed(self.experts),
            "client_attention": keyed(self.client_attention),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "client_bytes_down": keyed(self.client_bytes_down),
            "client_bytes_up": keyed(self.client_bytes_up),
            "rejected_uploads": [{"client": c, "reason": r} for c, r in self.rejected_uploads],
            "dropped": list(self.dropped),
            "seconds": self.seconds,
            **{k: getattr(self, k) for k in DP_FIELDS if getattr(self, k) is not None},
            **self._split_json(),
            "phase_seconds": dict(self.phase_seconds),
            "failed": listed(self.failed),
            "eval_failed": listed(self.eval_failed),
            "num_failed": self.num_failed,
            "num_rejected": self.num_rejected,
            "num_eval_failed": self.num_eval_failed,
        }

    def _split_json(self) -> dict[str, Any]:
        if not self.client_split_acc:
            return {}
        means = self.split_acc
        out: dict[str, Any] = {"local_acc": self.mean_acc, "eval_sets": list(self.client_split_acc)}
        for name, accs in self.client_split_acc.items():
            out[f"{name}_acc"] = means[name]
            out[f"client_{name}_acc"] = list(accs)
        if "hm" in means:
            out["hm"] = means["hm"]
            out["client_hm"] = self.client_hm
        else:
            out["targets_mean_acc"] = means["mean"]
            if "global_mean" in means:
                out["global_targets_mean_acc"] = means["global_mean"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """The record :meth:`to_json` wrote (checkpoints keep rounds in this form)."""

        def ints(d: Mapping[str, Any]) -> dict[int, Any]:
            return {int(k): v for k, v in d.items()}

        def reasons(items: list[Mapping[str, Any]]) -> dict[int, str]:
            return {int(i["client"]): str(i["reason"]) for i in items}

        return cls(
            round=int(data["round"]),
            mean_acc=data["mean_acc"],
            std_acc=data["std_acc"],
            client_acc=list(data["client_acc"]),
            sampled=[int(c) for c in data["sampled"]],
            experts={int(k): [int(j) for j in v] for k, v in data["experts"].items()},
            client_attention=ints(data["client_attention"]),
            client_bytes_down=ints(data["client_bytes_down"]),
            client_bytes_up=ints(data["client_bytes_up"]),
            rejected_uploads=[(int(i["client"]), str(i["reason"])) for i in data["rejected_uploads"]],
            dropped=[int(c) for c in data["dropped"]],
            seconds=data["seconds"],
            phase_seconds=dict(data["phase_seconds"]),
            failed=reasons(data.get("failed", [])),
            eval_failed=reasons(data.get("eval_failed", [])),
            **{k: data[k] for k in DP_FIELDS if k in data},
            client_split_acc={
                n: list(data[f"client_{n}_acc"])
                for n in data.get("eval_sets", SPLITS)  # records written before the target protocols: base, novel
                if f"client_{n}_acc" in data
            },
        )

    def line(self, total: int) -> str:
        """The round's one-line summary for the log."""
        extra = ""
        if self.num_failed or self.num_rejected or self.num_eval_failed:
            extra = f"  failed {self.num_failed}  rejected {self.num_rejected}  eval-failed {self.num_eval_failed}"
        if self.client_split_acc:
            means = self.split_acc
            splits = "".join(f"  {n} {means[n]:5.2f}" for n in self.client_split_acc)
            summary = "".join(f"  {k} {means[k]:5.2f}" for k in ("hm", "mean", "global_mean") if k in means)
            extra = f"{splits}{summary}{extra}"
        return (
            f"round {self.round:>3}/{total}  acc {self.mean_acc:6.2f} ± {self.std_acc:5.2f}  "
            f"down {comm.format_bytes(self.bytes_down)}  up {comm.format_bytes(self.bytes_up)}  "
            f"{self.seconds:.1f} s{extra}"
        )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std over the finite values (NaN, NaN when there are none)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / len(vals)
    return mean, math.sqrt(var)


def summarize(rounds: list[RoundRecord]) -> dict[str, Any]:
    """Final, best and mean-of-last-5 mean client accuracy (SPEC §2 evaluation), with totals."""
    accs = [r.mean_acc for r in rounds]
    if not accs:
        return {}
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    last5 = accs[-5:]
    return {
        "final_mean_acc": accs[-1],
        "final_std_acc": rounds[-1].std_acc,
        "best_mean_acc": accs[best],
        "best_round": rounds[best].round,
        "last5_mean_acc": sum(last5) / len(last5),
        "rounds": len(rounds),
        "total_bytes_down": sum(r.bytes_down for r in rounds),
        "total_bytes_up": sum(r.bytes_up for r in rounds),
        "total_failed": sum(r.num_failed for r in rounds),
        "total_rejected": sum(r.num_rejected for r in rounds),
        "seconds": sum(r.seconds for r in rounds),
        **_split_summary(rounds),
    }


def _split_summary(rounds: list[RoundRecord]) -> dict[str, Any]:
    """The shared sets' columns of the summary: the final round's local accuracy and each set's; base-to-novel's
    final and best HM; the target protocols' final and best mean over the targets (and the global model's final
    mean). The final round is the headline (FedTPG and PMFLT test the last model); the best is FLiP's choice."""
    last = rounds[-1]
    if not last.client_split_acc:
        return {}
    key = "hm" if "hm" in last.split_acc else "mean"
    values = [r.split_acc.get(key, float("nan")) for r in rounds]
    best = max(range(len(values)), key=lambda i: (-math.inf if math.isnan(values[i]) else values[i], -i))
    out: dict[str, Any] = {"final_local_acc": last.mean_acc, "eval_sets": list(last.client_split_acc)}
    for k, v in last.split_acc.items():
        out[
            {"hm": "final_hm", "mean": "final_targets_mean_acc", "global_mean": "final_global_targets_mean_acc"}.get(
                k, f"final_{k}_acc"
            )
        ] = v
    if key == "hm":
        out.update(best_hm=values[best], best_hm_round=rounds[best].round)
    else:
        out.update(best_targets_mean_acc=values[best], best_targets_mean_round=rounds[best].round)
    return out


@dataclass
class History:
    """What a run returns: per-round records, the summary, the run directory, and the engine's objects.

    ``driver`` is the run's :class:`~pfedmoap.engine.rounds.RoundDriver` (the server side, every engine);
    ``federation`` the in-process engine's whole :class:`~pfedmoap.engine.federation.Federation` (clients included),
    None for a Flower run (its clients' state lives on their nodes). Held for inspection, typed loosely so that
    this record imports no engine.
    """

    config: Config
    rounds: list[RoundRecord]
    summary: dict[str, Any]
    run_dir: Path | None
    driver: Any = None
    federation: Any = None

    @property
    def server(self) -> Any:
        """The run's :class:`~pfedmoap.federated.server.Server` (pool, global prompt)."""
        return self.driver.server


def seed_stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1) over seeds; std 0 for one seed."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std
