"""The server side of a round, once for every engine: the round driver, the round's record, a run's history.

One round (SPEC §2), as :class:`RoundDriver` runs it:

1. :meth:`~RoundDriver.begin`: sample the round's clients; take the pool as it is at the start of the round.
2. :meth:`~RoundDriver.dispatch`, per sampled client in sampled order: its payload (P_g and, for pFedMoAP, its
   K experts) cast to the wire dtype, the bytes counted; and whether it drops out (``--client-dropout``).
3. An engine delivers the payloads and brings back what each client sends: :meth:`~RoundDriver.upload` (checks,
   bytes, the pool), :meth:`~RoundDriver.refuse` (an upload that cannot be read) or :meth:`~RoundDriver.fail`
   (no reply, a node error).
4. :meth:`~RoundDriver.aggregate`: the method folds the accepted uploads into P_g (and its own extras). A method
   that synchronises more than once per round (``Method.exchanges_per_round``; DP-FPL after every batch) has its
   engine call :meth:`~RoundDriver.next_exchange` and repeat 2-4 for the clients still in the round.
5. An engine evaluates every client; :meth:`~RoundDriver.finish` makes the :class:`RoundRecord`.

The records it makes are in :mod:`pfedmoap.engine.records`. The in-process engine
(:mod:`pfedmoap.engine.federation`) and the Flower strategy (:mod:`pfedmoap.flower.strategy`) are two transports over
this driver; neither keeps a copy of these steps, and :class:`~pfedmoap.engine.recorder.RunRecorder` keeps the run
directory for both.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..base.tracing import timed
from ..federated import wire as comm
from ..federated.privacy import run_noise_multiplier
from ..federated.seeding import Stream, stream
from ..federated.server import Server
from ..methods import Method, Payload, Upload
from ..ops import KnnFn
from .records import RoundRecord, mean_std, split_order, summarize

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.selection import ExpertSelection


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
    accepted: dict[int, Upload] = field(default_factory=dict)  # the current exchange's
    exchange: int = 0  # which of the round's exchanges is open (a method may exchange several times per round)
    earlier_down: dict[int, int] = field(default_factory=dict)  # bytes of the round's closed exchanges
    earlier_up: dict[int, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class RoundDriver:
    """Runs the server side of every round for any engine: sampling, payloads, upload checks, aggregation, DP
    accounting and the round's record. Owns the :class:`~pfedmoap.federated.server.Server` and the dropout stream."""

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
        cls,
        cfg: Config,
        method: Method,
        selection: ExpertSelection,
        init_prompt: torch.Tensor,
        train_sizes: list[int],
        knn: KnnFn,
    ) -> RoundDriver:
        """The driver of a run, with its server built from the config (the method and the expert-selection rule
        from the run's plug-ins; P_g^0, the clients' train sizes and the run's KNN op from the engine)."""
        server = Server(
            cfg.clients, init_prompt, train_sizes, cfg.frac, cfg.seed, selection, cfg.max_prompt_norm, knn=knn
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

    @property
    def phases(self) -> dict[str, float]:
        """The open round's seconds per phase, for an engine's own timers to add to (``timed(driver.phases, ...)``)."""
        return self.open_round.phases

    def add_phase(self, name: str, seconds: float) -> None:
        """Add ``seconds`` measured by the engine (e.g. a Flower phase's wall time) to the open round's phase."""
        self.open_round.phases[name] += seconds

    @property
    def exchanges(self) -> int:
        """How many exchanges (download, update, upload, aggregation) each round has (the method's rule)."""
        return self.method.exchanges_per_round(self.server)

    def next_exchange(self) -> list[int]:
        """Open the round's next exchange (after :meth:`aggregate` closed the last one): returns the clients still in
        the round, in sampled order (those that dropped out or failed are not sent anything more)."""
        rnd = self.open_round
        rnd.exchange += 1
        rnd.accepted = {}
        rnd.earlier_down, rnd.earlier_up = dict(rnd.bytes_down), dict(rnd.bytes_up)
        return [cid for cid in rnd.sampled if cid not in rnd.dropped and cid not in rnd.failed]

    def dispatch(self, cid: int) -> Payload | None:
        """Client ``cid``'s payload as it goes on the wire (cast to the wire dtype, bytes counted, summed over the
        round's exchanges), or None when the client drops out after downloading it (simulated,
        ``--client-dropout``, drawn at the round's first exchange). Call in sampled order."""
        rnd = self.open_round
        with self.phase("select"):
            payload = self.method.payload(self.server, rnd.view, cid)
            wire = payload.map(lambda t: comm.to_wire(t, self.cfg.comm_dtype))
        rnd.experts[cid] = list(payload.expert_ids)
        rnd.bytes_down[cid] = rnd.earlier_down.get(cid, 0) + comm.nbytes(wire.tensors().values())
        if rnd.exchange > 0:
            return wire
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
        sent = rnd.earlier_up.get(cid, 0)  # in the round's earlier exchanges
        if upload is None:
            rnd.bytes_up[cid] = sent
            return False
        tensors = upload.tensors()
        nbytes = comm.nbytes(tensors.values())
        rnd.bytes_up[cid] = sent + nbytes
        self.dp_releases[cid] += 1
        wire = comm.wire_dtype(self.cfg.comm_dtype)
        odd = next((t for t in tensors.values() if t.dtype != wire), None)
        if odd is not None:
            return self.refuse(cid, f"dtype {odd.dtype} != wire dtype {wire}", nbytes)
        shares_prompt = self.method.shares_prompt
        if (upload.prompt is None) == shares_prompt:
            what = "no prompt in the upload" if shares_prompt else f"a prompt, which {self.cfg.method} never sends"
            return self.refuse(cid, what, nbytes)
        reason = self.method.check_extras(upload.extras)
        if reason is not None:
            return self.refuse(cid, reason, nbytes)
        extras = upload.map(torch.Tensor.float).extras
        if not shares_prompt:  # extras only (e.g. pFedMMA's shared adapters): checked above, nothing for the pool
            rnd.accepted[cid] = Upload(None, extras)
            return True
        if not self.server.receive(cid, upload.prompt.float()):
            return False
        rnd.accepted[cid] = Upload(self.server.pool[cid], extras)
        return True

    def refuse(self, cid: int, reason: str, nbytes: int = 0) -> bool:
        """An upload from ``cid`` that cannot be used (unreadable, wrong dtype): listed, nothing changes; its
        ``nbytes`` are counted (added to the round's earlier exchanges')."""
        rnd = self.open_round
        rnd.bytes_up[cid] = rnd.earlier_up.get(cid, 0) + nbytes
        self.server.rejected.append((cid, reason))
        return False

    def fail(self, cid: int, reason: str, delivered: bool = True) -> None:
        """Client ``cid`` never sent its upload (no reply, a node error); ``delivered=False``: its payload never
        left the server either (no node holds it), so it counts no bytes down."""
        rnd = self.open_round
        rnd.failed[cid] = reason
        rnd.bytes_up[cid] = rnd.earlier_up.get(cid, 0)
        if not delivered:
            rnd.bytes_down[cid] = rnd.earlier_down.get(cid, 0)
            if cid in rnd.dropped:
                rnd.dropped.remove(cid)

    def aggregate(self) -> None:
        """Fold the exchange's accepted uploads into the server state (the method's rule, FedAvg by default)."""
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
        names = sorted({n for accs in split_acc.values() for n in accs}, key=split_order)
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
        from ..federated.privacy import epsilon

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
