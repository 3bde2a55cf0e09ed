"""The server side of a round, once for every engine: the round driver, the round's record, a run's history.

One round (SPEC §2), as :class:`RoundDriver` runs it:

1. :meth:`~RoundDriver.begin`: sample the round's clients; take the pool as it is at the start of the round.
2. :meth:`~RoundDriver.dispatch`, per sampled client in sampled order: its payload (P_g and, for pFedMoAP, its
   K experts) cast to the wire dtype, the bytes counted; and whether it drops out (``--client-dropout``).
3. An engine delivers the payloads and brings back what each client sends: :meth:`~RoundDriver.upload` (checks,
   bytes, the pool), :meth:`~RoundDriver.refuse` (an upload that cannot be read) or :meth:`~RoundDriver.fail`
   (no reply, a node error).
4. :meth:`~RoundDriver.aggregate`: the method folds the accepted uploads into P_g (and its own extras).
5. An engine evaluates every client; :meth:`~RoundDriver.finish` makes the :class:`RoundRecord`.

The in-process engine (:mod:`pfedmoap.federation`) and the Flower strategy (:mod:`pfedmoap.flower.strategy`) are
two transports over this driver; neither keeps a copy of these steps.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import comm
from .methods import Method, Payload, Upload
from .ops import KnnFn
from .privacy import run_noise_multiplier
from .profiling import timed
from .seeding import Stream, stream
from .server import Server

if TYPE_CHECKING:
    from .config import Config
    from .federation import Federation


# ------------------------------------------------------------------------------------------ the record
DP_FIELDS = ("dp_noise_multiplier", "dp_epsilon_spent", "dp_max_uploads")
SPLITS = ("base", "novel")  # the shared evaluation sets of --eval-split base2novel


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
        """Mean over clients of each shared set's accuracy, and ``hm``: the harmonic mean of the mean local, base
        and novel accuracies (the 3-way HM that pFedMMA's tables fit; PMFLT's code averages a per-client HM of
        base and novel only). Empty without base2novel."""
        if not self.client_split_acc:
            return {}
        means = {name: mean_std(accs)[0] for name, accs in self.client_split_acc.items()}
        return {**means, "hm": harmonic_mean([self.mean_acc, *means.values()])}

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
        out: dict[str, Any] = {"local_acc": self.mean_acc}
        for name, accs in self.client_split_acc.items():
            out[f"{name}_acc"] = means[name]
            out[f"client_{name}_acc"] = list(accs)
        out["hm"] = means["hm"]
        out["client_hm"] = self.client_hm
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
            client_split_acc={n: list(data[f"client_{n}_acc"]) for n in SPLITS if f"client_{n}_acc" in data},
        )

    def line(self, total: int) -> str:
        """The round's one-line summary for the log."""
        extra = ""
        if self.num_failed or self.num_rejected or self.num_eval_failed:
            extra = f"  failed {self.num_failed}  rejected {self.num_rejected}  eval-failed {self.num_eval_failed}"
        if self.client_split_acc:
            means = self.split_acc
            splits = "".join(f"  {n} {means[n]:5.2f}" for n in self.client_split_acc)
            extra = f"{splits}  hm {means['hm']:5.2f}{extra}"
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
    """Base-to-novel columns of the summary: the final round's local / base / novel / HM and the best HM."""
    last = rounds[-1]
    if not last.client_split_acc:
        return {}
    hms = [r.split_acc.get("hm", float("nan")) for r in rounds]
    best = max(range(len(hms)), key=lambda i: (-math.inf if math.isnan(hms[i]) else hms[i], -i))
    return {
        "final_local_acc": last.mean_acc,
        **{f"final_{k}_acc" if k != "hm" else "final_hm": v for k, v in last.split_acc.items()},
        "best_hm": hms[best],
        "best_hm_round": rounds[best].round,
    }


@dataclass
class History:
    """What a run returns: per-round records, the summary, the run directory and the final state.

    ``federation`` is the in-process engine's whole federation (clients included); a Flower run has only the
    server side (``driver``), its clients' state lives on their nodes.
    """

    config: Config
    rounds: list[RoundRecord]
    summary: dict[str, Any]
    run_dir: Path | None
    driver: RoundDriver
    federation: Federation | None = None

    @property
    def server(self) -> Server:
        return self.driver.server


def _split_order(name: str) -> int:
    return SPLITS.index(name) if name in SPLITS else len(SPLITS)


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class _OpenRound:
    index: int
    start: float
    sampled: list[int]
    view: Mapping[int, torch.Tensor]
    experts: dict[int, list[int]] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    accepted: dict[int, Upload] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class RoundDriver:
    """Runs the server side of every round for any engine: sampling, payloads, upload checks, aggregation, DP
    accounting and the round's record. Owns the :class:`~pfedmoap.server.Server` and the dropout stream."""

    def __init__(self, cfg: Config, method: Method, server: Server):
        self.cfg = cfg
        self.method = method
        self.server = server
        # simulated client failures draw from their own stream, so turning them on changes nothing else
        self.dropout_rng = stream(cfg.seed, Stream.DROPOUT)
        self.dp_noise_multiplier = run_noise_multiplier(cfg)
        self.dp_releases = [0] * cfg.clients  # uploads each client has made (Gaussian releases, for the accountant)
        self.rounds: list[RoundRecord] = []
        self._open: _OpenRound | None = None

    @classmethod
    def for_config(
        cls, cfg: Config, method: Method, init_prompt: torch.Tensor, train_sizes: list[int], knn: KnnFn
    ) -> RoundDriver:
        """The driver of a run, with its server built from the config (P_g^0, the clients' train sizes and the
        run's KNN op come from the engine)."""
        server = Server(
            cfg.clients,
            init_prompt,
            train_sizes,
            cfg.frac,
            cfg.seed,
            cfg.expert_selection,
            cfg.max_prompt_norm,
            knn=knn,
            expert_distance=cfg.expert_distance,
        )
        return cls(cfg, method, server)

    # ------------------------------------------------------------------------------------ which rounds
    @property
    def round_indices(self) -> list[int]:
        """1..R; a method that does not train (zero-shot) has one evaluation-only round 0."""
        return list(range(1, self.cfg.rounds + 1)) if self.method.trains else [0]

    def remaining(self) -> list[int]:
        """The round indices not yet recorded."""
        done = {r.round for r in self.rounds}
        return [t for t in self.round_indices if t not in done]

    # ------------------------------------------------------------------------------------ one round
    def begin(self, index: int) -> list[int]:
        """Open round ``index``: sample its clients (nobody, for a method that does not train) and fix the pool
        view their experts come from. Returns the sampled client ids, in order."""
        if self._open is not None:
            raise RuntimeError(f"round {self._open.index} is still open")
        server = self.server
        server.rejected = []
        start = time.perf_counter()
        sampled = server.sample() if self.method.trains else []
        # the paper uses the pool as it was at the start of the round; "live" is the reference code's view
        view = server.snapshot() if self.cfg.pool_view == "snapshot" else server.pool
        self._open = _OpenRound(index, start, sampled, view)
        return sampled

    @property
    def open_round(self) -> _OpenRound:
        if self._open is None:
            raise RuntimeError("no round is open: call begin() first")
        return self._open

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Time a phase of the open round into its ``phase_seconds``."""
        return timed(self.open_round.phases, name)

    def dispatch(self, cid: int) -> Payload | None:
        """Client ``cid``'s payload as it goes on the wire (cast to the wire dtype, bytes counted), or None when
        the client drops out after downloading it (simulated, ``--client-dropout``). Call in sampled order."""
        rnd = self.open_round
        with self.phase("select"):
            payload = self.method.payload(self.server, rnd.view, cid)
            wire = payload.map(lambda t: comm.to_wire(t, self.cfg.comm_dtype))
        rnd.experts[cid] = list(payload.expert_ids)
        rnd.bytes_down[cid] = comm.nbytes(wire.tensors().values())
        # drawn for every sampled client, whatever the engine, so the stream stays aligned
        if self.cfg.client_dropout > 0 and self.dropout_rng.random() < self.cfg.client_dropout:
            # the client fails after downloading: no training, no upload, its state stays as it was
            rnd.dropped.append(cid)
            rnd.bytes_up[cid] = 0
            return None
        return wire

    def upload(self, cid: int, upload: Upload | None) -> bool:
        """What client ``cid`` sent back, in the wire dtype (None: the method uploads nothing). The upload is
        checked (wire dtype, shape, finite values, norm bound, the method's extras) and an accepted prompt goes
        into the pool; a refused one changes nothing and is listed. Returns whether it was accepted."""
        rnd = self.open_round
        if upload is None:
            rnd.bytes_up[cid] = 0
            return False
        tensors = upload.tensors()
        rnd.bytes_up[cid] = comm.nbytes(tensors.values())
        self.dp_releases[cid] += 1
        wire = comm.wire_dtype(self.cfg.comm_dtype)
        odd = next((t for t in tensors.values() if t.dtype != wire), None)
        if odd is not None:
            return self.refuse(cid, f"dtype {odd.dtype} != wire dtype {wire}", rnd.bytes_up[cid])
        if upload.prompt is None:
            return self.refuse(cid, "no prompt in the upload", rnd.bytes_up[cid])
        reason = self.method.check_extras(upload.extras)
        if reason is not None:
            return self.refuse(cid, reason, rnd.bytes_up[cid])
        if not self.server.receive(cid, upload.prompt.float()):
            return False
        rnd.accepted[cid] = Upload(self.server.pool[cid], upload.map(torch.Tensor.float).extras)
        return True

    def refuse(self, cid: int, reason: str, nbytes: int = 0) -> bool:
        """An upload from ``cid`` that cannot be used (unreadable, wrong dtype): listed, nothing changes."""
        self.open_round.bytes_up[cid] = nbytes
        self.server.rejected.append((cid, reason))
        return False

    def fail(self, cid: int, reason: str, delivered: bool = True) -> None:
        """Client ``cid`` never sent its upload (no reply, a node error); ``delivered=False``: its payload never
        left the server either (no node holds it), so it counts no bytes down."""
        rnd = self.open_round
        rnd.failed[cid] = reason
        rnd.bytes_up[cid] = 0
        if not delivered:
            rnd.bytes_down[cid] = 0
            if cid in rnd.dropped:
                rnd.dropped.remove(cid)

    def aggregate(self) -> None:
        """Fold the round's accepted uploads into the server state (the method's rule, FedAvg by default)."""
        with self.phase("aggregate"):
            self.method.aggregate(self.server, self.open_round.accepted)

    def finish(
        self,
        client_acc: list[float],
        attention: Mapping[int, list[float]] | None = None,
        eval_failed: Mapping[int, str] | None = None,
        split_acc: Mapping[int, Mapping[str, float]] | None = None,
    ) -> RoundRecord:
        """Close the open round with every client's accuracy (NaN where unknown) and return its record;
        ``split_acc``: each client's accuracy on the shared evaluation sets (base2novel), by set name."""
        rnd = self.open_round
        split_acc = split_acc or {}
        names = sorted({n for accs in split_acc.values() for n in accs}, key=_split_order)
        nan = float("nan")
        columns = {n: [float(split_acc.get(c, {}).get(n, nan)) for c in range(len(client_acc))] for n in names}
        mean, std = mean_std(client_acc)
        record = RoundRecord(
            round=rnd.index,
            mean_acc=mean,
            std_acc=std,
            client_acc=list(client_acc),
            sampled=list(rnd.sampled),
            experts=dict(rnd.experts),
            client_attention=dict(sorted((attention or {}).items())),
            client_bytes_down=dict(rnd.bytes_down),
            client_bytes_up={cid: rnd.bytes_up.get(cid, 0) for cid in rnd.bytes_down},
            rejected_uploads=list(self.server.rejected),
            dropped=list(rnd.dropped),
            seconds=time.perf_counter() - rnd.start,
            phase_seconds=dict(rnd.phases),
            failed=dict(sorted(rnd.failed.items())),
            eval_failed=dict(sorted((eval_failed or {}).items())),
            **self._dp_record(),
            client_split_acc=columns,
        )
        self.rounds.append(record)
        self._open = None
        return record

    def _dp_record(self) -> dict[str, Any]:
        """Noise level and the largest epsilon any client has spent so far (its uploads so far)."""
        if self.dp_noise_multiplier is None:
            return {}
        from .privacy import epsilon

        most = max(self.dp_releases)
        spent = epsilon(self.dp_noise_multiplier, most, self.cfg.dp_delta)
        return {"dp_noise_multiplier": self.dp_noise_multiplier, "dp_epsilon_spent": spent, "dp_max_uploads": most}

    # ------------------------------------------------------------------------------------ whole run
    def summary(self, **extra: Any) -> dict[str, Any]:
        """The run's summary (``summary.json``): :func:`summarize` plus what identifies the run."""
        cfg = self.cfg
        return {**summarize(self.rounds), "method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, **extra}

    def state_dict(self) -> dict[str, Any]:
        """The server side of a checkpoint: the server, the dropout stream, the DP releases, the rounds so far."""
        return {
            "server": self.server.state_dict(),
            "dropout_rng": self.dropout_rng.bit_generator.state,
            "dp_releases": list(self.dp_releases),
            "rounds": [r.to_json() for r in self.rounds],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict(state["server"])
        self.dropout_rng.bit_generator.state = state["dropout_rng"]
        self.dp_releases = [int(n) for n in state["dp_releases"]]
        self.rounds = [RoundRecord.from_json(r) for r in state["rounds"]]
