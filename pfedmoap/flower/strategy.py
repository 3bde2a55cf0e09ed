"""The pFedMoAP Strategy: the library's Server (pool, global prompt, sampling, expert selection, FedAvg) behind
Flower's Message API.

Unlike FedAvg, every node gets its own payload: P_g plus ITS K experts, in a fresh RecordDict per node. The
strategy never sees a gate. One round of :meth:`PFedMoAPStrategy.start` is exactly one round of the in-process
``Federation.run_round``: the same seeded sampler and selection RNG, indexed by partition id (Flower's node
ids are random per run, so nodes are mapped to partition ids by a handshake first), the same wire cast, the
same upload checks and aggregation, then an evaluation of every node.

A node that replies with an error, or not within the round timeout, is left out of the round (its partition
keeps its pool entry from before) and listed in ``failed``; an upload that fails the checks (shape, wire
dtype, finite values, the optional norm bound) never reaches the pool or P_g and is listed in
``rejected_uploads``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import __version__, comm
from ..config import Config
from ..errors import UserError
from ..methods import Payload, create_method
from ..metrics import RunDir, mean_std, summarize
from ..prompt import init_prompt
from ..server import Server
from .task import CONFIG, METRICS, PAYLOAD, UPLOAD, check_flower_config, config_json, decode_tensor, encode_tensor


def prompt_width(model_name: str) -> int:
    """Token width W of an open_clip architecture's text tower, from its config (no weights are loaded)."""
    import open_clip

    from ..model_configs import register_model_configs

    register_model_configs()
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise UserError(f"model={model_name!r} is not an open_clip architecture; see open_clip.list_models()")
    return int(model_cfg.get("text_cfg", {}).get("width", 512))


@dataclass(frozen=True)
class PartitionRef:
    """What the server knows of a client: its partition id (the methods' payload rules only read ``cid``)."""

    cid: int


@dataclass
class FlowerHistory:
    """What a Flower run returns: per-round metrics, the summary, the run directory and the server's state."""

    config: Config
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None
    server: Server


@dataclass
class _Round:
    index: int
    start: float
    sampled: list[int]
    sent: dict[int, int] = field(default_factory=dict)  # node id -> partition id, in sampled order
    experts: dict[int, list[int]] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    uploads: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    mark: float = 0.0


class PFedMoAPStrategy(Strategy):
    """Owns the pool, the global prompt and expert selection (a :class:`~pfedmoap.server.Server`); sends each
    sampled node its own payload; checks uploads; evaluates every node each round.

    Drive it with :meth:`run` (handshake, all rounds, summary) or with Flower's own ``Strategy.start``.
    ``run_dir`` gets ``config.json``, one ``metrics.jsonl`` line per round and ``summary.json``.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: RunDir | None = None,
        log: Callable[[str], None] | None = None,
        round_timeout: float = 3600.0,
        connect_timeout: float = 600.0,
    ):
        self.cfg = check_flower_config(cfg.validate())
        self.run_dir = run_dir
        self.log = log or logging.getLogger("flwr").info
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        self.method = create_method(self.cfg)
        self.width = prompt_width(self.cfg.model)
        # the same P_g^0 as the in-process run: the common init from the run seed
        prompt0 = init_prompt(
            self.cfg.n_ctx, self.width, self.cfg.ctx_init_std, torch.Generator().manual_seed(self.cfg.seed)
        )
        # train sizes arrive with the handshake; FedAvg only ever weighs partitions that answered it
        self.server = Server(
            self.cfg.clients,
            prompt0,
            [0] * self.cfg.clients,
            self.cfg.frac,
            self.cfg.seed,
            self.cfg.expert_selection,
            self.cfg.max_prompt_norm,
        )
        # simulated failures (--client-dropout) draw from their own stream, as in-process
        self.dropout_rng = np.random.default_rng([self.cfg.seed, 303])
        self.dp_noise_multiplier: float | None = None
        if self.cfg.dp_epsilon is not None:
            from ..privacy import noise_multiplier_for

            self.dp_noise_multiplier = noise_multiplier_for(self.cfg.dp_epsilon, self.cfg.dp_delta, self.cfg.rounds)
        self.dp_releases = [0] * self.cfg.clients
        self.config_json = config_json(self.cfg)
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.node_info: dict[int, dict[str, Any]] = {}  # partition id -> what its node said in the handshake
        self.rounds: list[dict[str, Any]] = []
        self._round: _Round | None = None

    # ------------------------------------------------------------------------------------ handshake
    def connect(self, grid: Grid) -> None:
        """Wait for ``clients`` nodes, ask each for its partition id, and map node ids to partition ids.

        Node ids are random per run; sampling and expert selection work on partition ids only, so a run is
        reproducible from its seed. A node that fails the handshake or repeats a partition id is left out
        (logged); a partition without a node counts as failed whenever it is sampled.
        """
        cfg = self.cfg
        begin = time.monotonic()
        said = begin
        while len(nodes := sorted(grid.get_node_ids())) < cfg.clients:
            now = time.monotonic()
            if now - begin > self.connect_timeout:
                raise UserError(
                    f"only {len(nodes)} of {cfg.clients} nodes connected within {self.connect_timeout:g} s "
                    "(one node per client: start more SuperNodes, or set the simulation's num-supernodes)"
                )
            if now - said > 30:
                said = now
                self.log(f"flower: waiting for nodes, {len(nodes)} of {cfg.clients} connected")
            time.sleep(0.1)
        messages = [
            Message(
                RecordDict({CONFIG: ConfigRecord({"config-json": self.config_json})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="handshake",
            )
            for node in nodes
        ]
        replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=self.connect_timeout)}
        errors = []
        for node in nodes:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                reason = "no reply" if reply is None else _error_reason(reply.error.reason)
                errors.append(reason)
                self.log(f"flower: node {node} failed the handshake: {reason}")
                continue
            info = dict(reply.content[METRICS])
            pid = int(info["partition-id"])
            if int(info["prompt-width"]) != self.width:
                raise UserError(
                    f"node {node} runs a text tower of width {info['prompt-width']}, the server's {cfg.model} "
                    f"has {self.width}: every node must run the same model"
                )
            if not 0 <= pid < cfg.clients or pid in self.node_of:
                self.log(f"flower: node {node} holds partition {pid}, which is out of range or taken: left out")
                continue
            self.node_of[pid], self.partition_of[node] = node, pid
            self.node_info[pid] = info
            self.server.train_sizes[pid] = int(info["num-examples"])
        if not self.node_of:
            first = errors[0] if errors else "no node holds a valid partition"
            raise UserError(f"no node is ready for the run: {first}")
        missing = sorted(set(range(cfg.clients)) - set(self.node_of))
        if missing:
            self.log(f"flower: partitions {missing} have no node; they count as failed whenever sampled")

    # ------------------------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample partitions, select each one's experts from the start-of-round pool, and build one message
        per node. ``arrays`` / ``config`` from ``Strategy.start`` are not used: the strategy owns P_g."""
        if not self.node_of:
            self.connect(grid)
        cfg, server = self.cfg, self.server
        t0 = time.perf_counter()
        server.rejected = []
        sampled = server.sample() if self.method.trains else []
        view = server.snapshot()  # the paper's view: experts come from the pool as at the start of the round
        # rounds are counted here, so that repeated ``start`` calls keep numbering (zero-shot: one round 0)
        index = len(self.rounds) + 1 if self.method.trains else 0
        rnd = _Round(index=index, start=t0, sampled=sampled)
        messages = []
        for pid in sampled:
            payload = self.method.payload(server, view, PartitionRef(pid))  # type: ignore[arg-type]
            rnd.experts[pid] = payload.expert_ids
            # a simulated failure after the download (--client-dropout), drawn for every sampled client as
            # in-process so the stream stays aligned
            drop = cfg.client_dropout > 0 and self.dropout_rng.random() < cfg.client_dropout
            node = self.node_of.get(pid)
            if node is None:
                rnd.failed[pid] = "no node holds this partition"
                rnd.bytes_down[pid] = rnd.bytes_up[pid] = 0
                continue
            content, rnd.bytes_down[pid] = self._train_content(index, pid, payload)
            if drop:
                rnd.dropped.append(pid)
                rnd.bytes_up[pid] = 0
                continue
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(index)))
            rnd.sent[node] = pid
        rnd.mark = time.perf_counter()
        rnd.phases["select"] = rnd.mark - t0
        self._round = rnd
        return messages

    def _train_content(self, server_round: int, pid: int, payload: Payload) -> tuple[RecordDict, int]:
        """A fresh RecordDict for one node (never shared between nodes) and the bytes of its tensors."""
        dtype = self.cfg.comm_dtype
        arrays = ArrayRecord()
        sent = []
        for name, tensor in (("global-prompt", payload.global_prompt), ("expert-prompts", payload.expert_prompts)):
            if tensor is not None:
                wire = comm.to_wire(tensor, dtype)
                arrays[name] = encode_tensor(wire)
                sent.append(wire)
        config = ConfigRecord(
            {
                "round": server_round,
                "partition-id": pid,
                "expert-ids": [int(j) for j in payload.expert_ids],
                "wire-dtype": dtype,
                "config-json": self.config_json,
            }
        )
        return RecordDict({PAYLOAD: arrays, CONFIG: config}), comm.nbytes(sent)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each upload, put the good ones into the pool, FedAvg them into P_g. Returns P_g and counts."""
        rnd = self._require_round()
        t0 = time.perf_counter()
        rnd.phases["train"] = t0 - rnd.mark
        by_node: dict[int, Message] = {}
        for reply in replies:
            by_node.setdefault(reply.metadata.src_node_id, reply)
        server, uploads = self.server, {}
        for node, pid in rnd.sent.items():  # sampled order, as in-process
            rnd.bytes_up[pid] = 0
            reply = by_node.get(node)
            if reply is None:
                rnd.failed[pid] = f"no reply within the round timeout ({self.round_timeout:g} s)"
                continue
            if reply.has_error():
                rnd.failed[pid] = f"node error: {_error_reason(reply.error.reason)}"
                continue
            upload = self._accept(pid, reply, rnd)
            if upload is not None and server.receive(pid, upload):
                uploads[pid] = server.pool[pid]
        self.method.aggregate(server, uploads)
        rnd.uploads = len(uploads)
        rnd.phases["aggregate"] = time.perf_counter() - t0
        metrics = MetricRecord({"uploads": len(uploads), "failed": len(rnd.failed), "rejected": len(server.rejected)})
        return ArrayRecord({"global-prompt": encode_tensor(server.global_prompt)}), metrics

    def _accept(self, pid: int, reply: Message, rnd: _Round) -> torch.Tensor | None:
        """The reply's upload as float32 if it passes the checks; otherwise record why and return None."""
        server = self.server
        try:
            content = reply.content
            metrics = content[METRICS]
            self.dp_releases[pid] = int(metrics.get("dp-releases", self.dp_releases[pid]))
        except (KeyError, TypeError, ValueError) as exc:
            rnd.failed[pid] = f"malformed reply ({type(exc).__name__})"
            return None
        if not self.method.uploads():
            return None
        record = content.get(UPLOAD)
        if not isinstance(record, ArrayRecord) or "prompt" not in record:
            server.rejected.append((pid, "no prompt in the reply"))
            return None
        array = record["prompt"]
        rnd.bytes_up[pid] = len(array.data)
        try:
            prompt = decode_tensor(array, self.cfg.comm_dtype)
        except Exception as exc:  # anything numpy cannot load without pickle is refused, never executed
            server.rejected.append((pid, f"unreadable array ({type(exc).__name__})"))
            return None
        rnd.bytes_up[pid] = comm.nbytes([prompt])
        wire = comm.wire_dtype(self.cfg.comm_dtype)
        if prompt.dtype != wire:
            server.rejected.append((pid, f"dtype {prompt.dtype} != wire dtype {wire}"))
            return None
        reason = server.check_upload(prompt)
        if reason is not None:
            server.rejected.append((pid, reason))
            return None
        return prompt.float()

    # ------------------------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node, every round: P_g (float32, as the in-process evaluation uses it) and its version."""
        rnd = self._require_round()
        rnd.mark = time.perf_counter()
        messages = []
        for pid, node in sorted(self.node_of.items()):
            content = RecordDict(
                {
                    PAYLOAD: ArrayRecord({"global-prompt": encode_tensor(self.server.global_prompt)}),
                    CONFIG: ConfigRecord(
                        {
                            "round": rnd.index,
                            "partition-id": pid,
                            "global-version": self.server.global_version,
                            "config-json": self.config_json,
                        }
                    ),
                }
            )
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=str(rnd.index))
            )
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect every node's accuracy, write the round's record (same keys as in-process, plus the failure
        counts) and log its line."""
        rnd = self._require_round()
        cfg = self.cfg
        accs = [float("nan")] * cfg.clients
        attention: dict[str, list[float]] = {}
        eval_failed: dict[int, str] = {pid: "no node holds this partition" for pid in range(cfg.clients)}
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        for pid, node in sorted(self.node_of.items()):
            reply = by_node.get(node)
            if reply is None:
                eval_failed[pid] = f"no reply within the round timeout ({self.round_timeout:g} s)"
            elif reply.has_error():
                eval_failed[pid] = f"node error: {_error_reason(reply.error.reason)}"
            else:
                try:
                    metrics = reply.content[METRICS]
                    accs[pid] = float(metrics["accuracy"])
                    if "attention" in metrics:
                        attention[str(pid)] = [float(w) for w in metrics["attention"]]
                    del eval_failed[pid]
                except (KeyError, TypeError, ValueError) as exc:
                    eval_failed[pid] = f"malformed reply ({type(exc).__name__})"
        rnd.phases["eval"] = time.perf_counter() - rnd.mark
        mean, std = mean_std(accs)
        rejected = [{"client": c, "reason": r} for c, r in self.server.rejected]
        record = {
            "round": rnd.index,
            "mean_acc": mean,
            "std_acc": std,
            "client_acc": accs,
            "sampled": rnd.sampled,
            "experts": {str(k): v for k, v in rnd.experts.items()},
            "client_attention": dict(sorted(attention.items(), key=lambda kv: int(kv[0]))),
            "bytes_down": sum(rnd.bytes_down.values()),
            "bytes_up": sum(rnd.bytes_up.values()),
            "client_bytes_down": {str(k): v for k, v in rnd.bytes_down.items()},
            "client_bytes_up": {str(k): rnd.bytes_up.get(k, 0) for k in rnd.bytes_down},
            "rejected_uploads": rejected,
            "dropped": rnd.dropped,
            "seconds": time.perf_counter() - rnd.start,
            **self._dp_record(),
            "phase_seconds": dict(rnd.phases),
            "failed": [{"client": c, "reason": r} for c, r in sorted(rnd.failed.items())],
            "eval_failed": [{"client": c, "reason": r} for c, r in sorted(eval_failed.items())],
            "num_failed": len(rnd.failed),
            "num_rejected": len(rejected),
            "num_eval_failed": len(eval_failed),
        }
        self.rounds.append(record)
        if self.run_dir is not None:
            self.run_dir.append_round(record)
        self.log(_round_line(record, cfg.rounds if self.method.trains else 0))
        return MetricRecord(
            {
                "mean-acc": mean,
                "std-acc": std,
                "failed": len(rnd.failed),
                "rejected": len(rejected),
                "eval-failed": len(eval_failed),
            }
        )

    def _dp_record(self) -> dict[str, Any]:
        if self.dp_noise_multiplier is None:
            return {}
        from ..privacy import epsilon

        most = max(self.dp_releases)
        spent = epsilon(self.dp_noise_multiplier, most, self.cfg.dp_delta)
        return {"dp_noise_multiplier": self.dp_noise_multiplier, "dp_epsilon_spent": spent, "dp_max_uploads": most}

    def _require_round(self) -> _Round:
        if self._round is None:
            raise RuntimeError("configure_train must run before the round's other steps")
        return self._round

    # ------------------------------------------------------------------------------------ whole run
    def summary(self) -> None:
        """Log the strategy's settings (Flower calls this when a run starts)."""
        cfg = self.cfg
        self.log(
            f"flower: {cfg.method} on {cfg.dataset}, {cfg.clients} clients ({len(self.node_of)} nodes mapped), "
            f"frac {cfg.frac}, K={cfg.experts} ({cfg.expert_selection}), seed {cfg.seed}, wire {cfg.comm_dtype}"
        )

    def initial_arrays(self) -> ArrayRecord:
        """P_g^0 as the ArrayRecord ``Strategy.start`` expects (the strategy keeps its own copy)."""
        return ArrayRecord({"global-prompt": encode_tensor(self.server.global_prompt)})

    def run(self, grid: Grid) -> FlowerHistory:
        """Handshake, every round (one evaluation-only round 0 for zero-shot), summary. Writes the run
        directory when one was given."""
        cfg = self.cfg
        if not self.node_of:
            self.connect(grid)
        if self.run_dir is not None:
            self.run_dir.write_config({**cfg.to_dict(), "_meta": self.meta()})
        rounds = cfg.rounds if self.method.trains else 1
        self.start(grid, self.initial_arrays(), num_rounds=rounds, timeout=self.round_timeout)
        summary = summarize(self.rounds)
        summary.update(
            {
                "method": cfg.method,
                "dataset": cfg.dataset,
                "seed": cfg.seed,
                "engine": "flower",
                "total_failed": sum(r["num_failed"] for r in self.rounds),
                "total_rejected": sum(r["num_rejected"] for r in self.rounds),
            }
        )
        if self.run_dir is not None:
            self.run_dir.write_summary(summary)
        path = self.run_dir.path if self.run_dir is not None else None
        return FlowerHistory(cfg, self.rounds, summary, path, self.server)

    def meta(self) -> dict[str, Any]:
        """``config.json``'s ``_meta``: versions, engine, and what the nodes reported in the handshake."""
        import flwr

        info = [self.node_info.get(pid) for pid in range(self.cfg.clients)]
        known = next((i for i in info if i is not None), {})
        return {
            "pfedmoap_version": __version__,
            "torch_version": torch.__version__,
            "flwr_version": getattr(flwr, "__version__", "unknown"),
            "engine": "flower",
            "nodes": len(self.node_of),
            "num_classes": int(known.get("num-classes", 0)),
            "client_train_sizes": [None if i is None else int(i["num-examples"]) for i in info],
            "client_test_sizes": [None if i is None else int(i["num-test"]) for i in info],
        }


def _error_reason(text: str | None) -> str:
    """The useful line of a node's error: the ClientApp's own message, not the runtime's traceback around it."""
    text = (text or "").strip()
    marker = "Message: "  # Flower's runtimes wrap the ClientApp's exception as "... Message: <its text>"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip().removesuffix("'>")[:500] if lines else "unknown"


def _round_line(r: dict[str, Any], total: int) -> str:
    extra = ""
    if r["num_failed"] or r["num_rejected"] or r["num_eval_failed"]:
        extra = f"  failed {r['num_failed']}  rejected {r['num_rejected']}  eval-failed {r['num_eval_failed']}"
    return (
        f"round {r['round']:>3}/{total}  acc {r['mean_acc']:6.2f} ± {r['std_acc']:5.2f}  "
        f"down {comm.format_bytes(r['bytes_down'])}  up {comm.format_bytes(r['bytes_up'])}  {r['seconds']:.1f} s{extra}"
    )
