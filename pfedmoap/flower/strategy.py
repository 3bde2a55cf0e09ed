"""The pFedMoAP Strategy: the library's round driver behind Flower's Message API.

The strategy is only a transport. The server side of every round (sampling, the pool snapshot, each client's
payload, upload checks, aggregation, DP accounting, the round's record) is
:class:`~pfedmoap.engine.rounds.RoundDriver`'s, the same object the in-process engine drives; the strategy turns its
payloads into messages, replies back into uploads, and keeps what only Flower has: node ids, the handshake, timeouts.

Unlike FedAvg, every node gets its own payload: P_g plus ITS K experts, in a fresh RecordDict per node. The
strategy never sees a gate. Flower's node ids are random per run, so nodes are mapped to partition ids by a
handshake first, and the driver works on partition ids only: the run is reproducible from its seed.

A node that replies with an error, or not within the round timeout, is left out of the round (its partition
keeps its pool entry from before) and listed in ``failed``; an upload that fails the checks never reaches the
pool or P_g and is listed in ``rejected_uploads``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .._version import __version__
from ..base.errors import UserError
from ..config import Config
from ..engine.recorder import RunRecorder
from ..engine.records import History, RoundRecord
from ..engine.rounds import RoundDriver
from ..engine.rundir import RunDir
from ..federated.plan import plugins, resolve_config
from ..federated.prompt import initial_prompt
from ..federated.server import Server
from ..methods import Payload, Upload
from ..ops import select_ops
from .messages import CONFIG, EVAL_SET_METRIC, METRICS, NOTES, PAYLOAD, UPLOAD, decode_tensors, encode_tensor
from .run_config import check_flower_config, config_json


def prompt_width(model_name: str) -> int:
    """Token width W of an open_clip architecture's text tower, from its config (no weights are loaded)."""
    from ..model.model_configs import open_clip_config, text_width

    model_cfg = open_clip_config(model_name)
    if model_cfg is None:
        raise UserError(f"model={model_name!r} is not an open_clip architecture; see open_clip.list_models()")
    return text_width(model_cfg)


class PFedMoAPStrategy(Strategy):
    """Flower's transport for the :class:`~pfedmoap.engine.rounds.RoundDriver`: sends each sampled node its own payload,
    hands replies to the driver, evaluates every node each round.

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
        self.cfg = check_flower_config(resolve_config(cfg))
        self.plugins = plugins(self.cfg)
        self.log = log or logging.getLogger("flwr").info
        # metrics line, checkpoint (the server side only), TensorBoard and log line of every round, then the summary
        self.recorder = RunRecorder(self.cfg, run_dir, lambda line: self.log(line), self.state_dict)
        self.round_timeout = round_timeout
        self.connect_timeout = connect_timeout
        self.method = self.plugins.method(self.cfg)
        self.width = prompt_width(self.cfg.model)
        # the same P_g^0 as every node and the in-process run; train sizes arrive with the handshake (FedAvg only
        # ever weighs partitions that answered it)
        phrase = None
        if self.cfg.ctx_init is not None:  # CoOp's phrase init needs the text tower's token embeddings
            from ..federated.prompt import phrase_embedding
            from ..model.clip import load_clip

            clip = load_clip(self.cfg.model, self.cfg.pretrained, torch.device("cpu"), progress=False)
            phrase = phrase_embedding(clip, self.cfg.ctx_init)
        init = initial_prompt(self.cfg, self.width, phrase)
        sizes = [0] * self.cfg.clients
        selection = self.plugins.selection.from_config(self.cfg)
        knn = select_ops(self.cfg.fused).knn
        self.driver = RoundDriver.for_config(self.cfg, self.method, selection, init, sizes, knn)
        self.config_json = config_json(self.cfg)
        # names this run's node states on the nodes' disks (node config state-dir); a resumed run keeps it
        self.run_token = uuid.uuid4().hex
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.node_info: dict[int, dict[str, Any]] = {}  # partition id -> what its node said in the handshake
        self._sent: dict[int, int] = {}  # this round's train messages: node id -> partition id, in sampled order
        self._mark = 0.0  # when the round's current phase began waiting on the nodes
        self._grid: Grid | None = None  # the round's grid, for a method's further exchanges within the round
        self._asked: set[int] = set()  # node ids that were sent a handshake
        self._replied: set[int] = set()  # partitions whose node has replied to a train or evaluate message
        # evaluations that need no evaluate message (Method.eval_needs_global is False for the client's state):
        # this round's, which rode on train replies, and the last one of every partition, kept until it trains again
        self._rode: dict[int, Evaluation] = {}
        self._kept: dict[int, Evaluation] = {}

    @property
    def run_dir(self) -> RunDir | None:
        """Where the run is recorded (the ServerApp sets it once the run directory is made)."""
        return self.recorder.run_dir

    @run_dir.setter
    def run_dir(self, value: RunDir | None) -> None:
        self.recorder.run_dir = value

    @property
    def server(self) -> Server:
        return self.driver.server

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.driver.rounds

    # ------------------------------------------------------------------------------------ handshake
    def connect(self, grid: Grid) -> None:
        """Wait up to ``connect_timeout`` for ``clients`` nodes (then go on with those connected, and say so; none
        is a UserError), ask each for its partition id, and map node ids to partition ids.

        Node ids are random per run; sampling and expert selection work on partition ids only, so a run is
        reproducible from its seed. A node that fails the handshake or repeats a partition id is left out
        (logged); a partition without a node counts as failed whenever it is sampled, until a node for it connects
        (it is handshaken at the start of the next round).
        """
        cfg = self.cfg
        begin = time.monotonic()
        said = begin
        while len(nodes := sorted(grid.get_node_ids())) < cfg.clients:
            now = time.monotonic()
            if now - begin > self.connect_timeout:
                if not nodes:
                    raise UserError(
                        f"no node connected within {self.connect_timeout:g} s (one node per client: start the "
                        "SuperNodes, or set the simulation's num-supernodes)"
                    )
                # the run goes on with the nodes it has; a node that connects later joins at the next round
                self.log(
                    f"flower: only {len(nodes)} of {cfg.clients} nodes connected within {self.connect_timeout:g} s; "
                    "going on with them (a partition without a node counts as failed whenever sampled)"
                )
                break
            if now - said > 30:
                said = now
                self.log(f"flower: waiting for nodes, {len(nodes)} of {cfg.clients} connected")
            time.sleep(0.1)
        errors = self._handshake(grid, nodes, self.connect_timeout, replace=False)
        if not self.node_of:
            first = errors[0] if errors else "no node holds a valid partition"
            raise UserError(f"no node is ready for the run: {first}")
        missing = sorted(set(range(cfg.clients)) - set(self.node_of))
        if missing:
            self.log(f"flower: partitions {missing} have no node; they count as failed whenever sampled")

    def _handshake(self, grid: Grid, nodes: list[int], timeout: float, replace: bool) -> list[str]:
        """Ask ``nodes`` for their partition ids and map them; returns why nodes failed. With ``replace``, a node
        that holds a partition another node held before takes it over (a restarted SuperNode comes back with a new
        node id)."""
        messages = [
            Message(
                RecordDict({CONFIG: ConfigRecord({"config-json": self.config_json, "run-token": self.run_token})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="handshake",
            )
            for node in nodes
        ]
        replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages, timeout=timeout)}
        errors = []
        for node in nodes:
            self._asked.add(node)
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
                    f"node {node} runs a text tower of width {info['prompt-width']}, the server's {self.cfg.model} "
                    f"has {self.width}: every node must run the same model"
                )
            if not 0 <= pid < self.cfg.clients or (pid in self.node_of and not replace):
                self.log(f"flower: node {node} holds partition {pid}, which is out of range or taken: left out")
                continue
            if pid in self.node_of:
                old = self.node_of[pid]
                self.partition_of.pop(old, None)
                self._kept.pop(pid, None)  # a restarted node may have lost the state that evaluation was of
                self.log(f"flower: node {node} rejoins as partition {pid} (it replaces node {old})")
            self.node_of[pid], self.partition_of[node] = node, pid
            self.node_info[pid] = info
            self.server.train_sizes[pid] = int(info["num-examples"])
        return errors

    def admit_new_nodes(self, grid: Grid) -> None:
        """Handshake the nodes that connected since the last round (a SuperNode restarted mid-run, one that
        joined late), so that the next rounds use them."""
        new = sorted(set(grid.get_node_ids()) - self._asked)
        if new:
            self._handshake(grid, new, min(self.round_timeout, 120.0), replace=True)

    def _note(self, pid: int, reply: Message) -> None:
        """Log what a node says about its client state when it is news: restored from disk, or a file that
        did not load."""
        notes = reply.content.get(NOTES)
        if not isinstance(notes, ConfigRecord):
            return
        for problem in notes.get("problems", []):
            self.log(f"flower: partition {pid}: a saved node state was not used: {problem}")
        source = str(notes.get("state", ""))
        if source.startswith("disk"):
            self.log(f"flower: partition {pid} restored its client state from its node's {source}")
        elif source == "fresh" and pid in self._replied:
            self.log(f"flower: partition {pid} lost its client state (its node restarted without it): starts fresh")
        self._replied.add(pid)

    # ------------------------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Open the driver's next round and build one message per sampled node from its payload. ``arrays`` /
        ``config`` from ``Strategy.start`` are not used: the driver owns P_g."""
        if not self.node_of:
            self.connect(grid)
        else:
            self.admit_new_nodes(grid)
        driver = self.driver
        # rounds are counted here, so that repeated ``start`` calls keep numbering (zero-shot: one round 0)
        index = len(driver.rounds) + 1 if self.method.trains else 0
        sampled = driver.begin(index)
        self._grid, self._rode = grid, {}
        return self._train_messages(index, sampled)

    def _train_messages(self, index: int, pids: list[int]) -> list[Message]:
        """The open exchange's train messages, one per node of ``pids`` that holds its partition and did not drop
        out (the driver's payloads, in order); remembered in ``_sent``."""
        driver = self.driver
        self._sent = {}
        messages = []
        for pid in pids:
            wire = driver.dispatch(pid)
            node = self.node_of.get(pid)
            if node is None:
                driver.fail(pid, "no node holds this partition", delivered=False)
                continue
            if wire is None:  # dropped out after the download (simulated)
                continue
            content = self._train_content(index, pid, wire)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(index)))
            self._sent[node] = pid
        self._mark = time.perf_counter()
        return messages

    def _train_content(self, index: int, pid: int, payload: Payload) -> RecordDict:
        """A fresh RecordDict for one node (never shared between nodes) with its payload's wire tensors."""
        arrays = ArrayRecord({name: encode_tensor(t) for name, t in payload.tensors().items()})
        config = ConfigRecord(
            {
                "round": index,
                "partition-id": pid,
                "expert-ids": [int(j) for j in payload.expert_ids],
                "wire-dtype": self.cfg.comm_dtype,
                "global-version": self.server.global_version,
                "config-json": self.config_json,
                "run-token": self.run_token,
                "exchange": self.driver.open_round.exchange,
            }
        )
        return RecordDict({PAYLOAD: arrays, CONFIG: config})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand each node's reply to the driver (upload, unreadable upload or failure), then aggregate; a method that
        exchanges several times per round (DP-FPL) has its further exchanges sent and aggregated here. Returns P_g
        and counts."""
        driver = self.driver
        self._take_replies(replies)
        driver.aggregate()
        for _ in range(1, driver.exchanges):
            messages = self._train_messages(driver.open_round.index, driver.next_exchange())
            assert self._grid is not None  # set by configure_train
            self._take_replies(self._grid.send_and_receive(messages, timeout=self.round_timeout))
            driver.aggregate()
        rnd = driver.open_round
        metrics = MetricRecord(
            {"uploads": len(rnd.accepted), "failed": len(rnd.failed), "rejected": len(self.server.rejected)}
        )
        return ArrayRecord({"global-prompt": encode_tensor(self.server.global_prompt)}), metrics

    def _take_replies(self, replies: Iterable[Message]) -> None:
        """The open exchange's replies to the driver, in sampled order: upload, unreadable upload or failure."""
        driver = self.driver
        driver.add_phase("train", time.perf_counter() - self._mark)
        by_node: dict[int, Message] = {}
        for reply in replies:
            by_node.setdefault(reply.metadata.src_node_id, reply)
        for node, pid in self._sent.items():  # sampled order, as in-process
            reply = by_node.get(node)
            if reply is None:
                driver.fail(pid, f"no reply within the round timeout ({self.round_timeout:g} s)")
            elif reply.has_error():
                driver.fail(pid, f"node error: {_error_reason(reply.error.reason)}")
            else:
                self._receive(pid, reply)

    def _receive(self, pid: int, reply: Message) -> None:
        """A train reply's upload, decoded for the driver; what cannot be decoded is refused, never executed."""
        driver = self.driver
        try:
            content = reply.content
            content[METRICS]  # noqa: B018 - every reply carries its metrics; one without is malformed
        except (KeyError, TypeError, ValueError) as exc:
            driver.fail(pid, f"malformed reply ({type(exc).__name__})")
            return
        self._note(pid, reply)
        if "accuracy" in content[METRICS]:  # the client's evaluation rode on its train reply
            try:
                self._rode[pid] = Evaluation.from_metrics(content[METRICS])
            except (KeyError, TypeError, ValueError):
                pass  # unreadable: it gets an evaluate message like any other
        if not self.method.uploads:
            driver.upload(pid, None)
            return
        record = content.get(UPLOAD)
        if not isinstance(record, ArrayRecord) or ("prompt" not in record and self.method.shares_prompt):
            driver.refuse(pid, "no prompt in the reply")
            return
        try:
            tensors = decode_tensors(record, self.cfg.comm_dtype)
        except Exception as exc:  # anything numpy cannot load without pickle is refused, never executed
            driver.refuse(pid, f"unreadable array ({type(exc).__name__})", sum(len(a.data) for a in record.values()))
            return
        driver.upload(pid, Upload.from_tensors(tensors))

    # ------------------------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """P_g (float32, as the in-process evaluation uses it) and its version to every node whose evaluation this
        round is not known yet: not to a node whose client's evaluation rode on its train reply, nor to one whose client
        did not train this round and whose last evaluation did not read P_g (its state, so its accuracy, is as it was).
        pFedMoAP at full participation thus sends one message per node per round."""
        index = self.driver.open_round.index
        self._mark = time.perf_counter()
        messages = []
        for pid, node in sorted(self.node_of.items()):
            if self._known_evaluation(pid) is not None:
                continue
            content = RecordDict(
                {
                    PAYLOAD: ArrayRecord(
                        {
                            "global-prompt": encode_tensor(self.server.global_prompt),
                            **{k: encode_tensor(t.float()) for k, t in self.method.eval_extras(self.server).items()},
                        }
                    ),
                    CONFIG: ConfigRecord(
                        {
                            "round": index,
                            "partition-id": pid,
                            "global-version": self.server.global_version,
                            "config-json": self.config_json,
                            "run-token": self.run_token,
                        }
                    ),
                }
            )
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=str(index)))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect every node's accuracy, close the driver's round (its record goes to the run directory) and log
        its line."""
        driver = self.driver
        accs = [float("nan")] * self.cfg.clients
        attention: dict[int, list[float]] = {}
        split_acc: dict[int, dict[str, float]] = {}
        eval_failed: dict[int, str] = {pid: "no node holds this partition" for pid in range(self.cfg.clients)}
        by_node = {reply.metadata.src_node_id: reply for reply in replies}
        for pid, node in sorted(self.node_of.items()):
            evaluation = self._known_evaluation(pid)
            if evaluation is None:
                evaluation = self._evaluate_reply(pid, by_node.get(node))
            if isinstance(evaluation, str):  # why the node's evaluation is missing
                eval_failed[pid] = evaluation
                self._kept.pop(pid, None)
                continue
            del eval_failed[pid]
            accs[pid] = evaluation.accuracy
            if evaluation.attention is not None:
                attention[pid] = evaluation.attention
            if evaluation.split_acc:
                split_acc[pid] = evaluation.split_acc
            if evaluation.needs_global:
                self._kept.pop(pid, None)
            else:
                self._kept[pid] = evaluation
        driver.add_phase("eval", time.perf_counter() - self._mark)
        record = driver.finish(accs, attention, eval_failed, split_acc)
        # the checkpoint holds the server side only: the nodes' states stay on the nodes (node config state-dir)
        self.recorder.round(record, driver.round_indices[-1])
        return MetricRecord(
            {
                "mean-acc": record.mean_acc,
                "std-acc": record.std_acc,
                "failed": record.num_failed,
                "rejected": record.num_rejected,
                "eval-failed": record.num_eval_failed,
            }
        )

    def _known_evaluation(self, pid: int) -> Evaluation | None:
        """Partition ``pid``'s evaluation this round when no evaluate message is needed for it: it rode on its train
        reply, or the client sat the round out and its last evaluation did not read P_g."""
        if pid in self._rode:
            return self._rode[pid]
        return None if pid in self.driver.open_round.sampled else self._kept.get(pid)

    def _evaluate_reply(self, pid: int, reply: Message | None) -> Evaluation | str:
        """The evaluation an evaluate reply carries, or why there is none."""
        if reply is None:
            return f"no reply within the round timeout ({self.round_timeout:g} s)"
        if reply.has_error():
            return f"node error: {_error_reason(reply.error.reason)}"
        try:
            metrics = reply.content[METRICS]
            self._note(pid, reply)
            return Evaluation.from_metrics(metrics)
        except (KeyError, TypeError, ValueError) as exc:
            return f"malformed reply ({type(exc).__name__})"

    # ------------------------------------------------------------------------------------ whole run
    def summary(self) -> None:
        """Log the strategy's settings (Flower calls this when a run starts)."""
        cfg = self.cfg
        self.log(
            f"flower: {cfg.method} on {cfg.dataset}, {cfg.clients} clients ({len(self.node_of)} nodes mapped), "
            f"frac {cfg.frac}, K={cfg.experts} ({cfg.expert_selection}), seed {cfg.seed}, wire {cfg.comm_dtype}"
        )

    def initial_arrays(self) -> ArrayRecord:
        """P_g^0 as the ArrayRecord ``Strategy.start`` expects (the driver keeps its own copy)."""
        return ArrayRecord({"global-prompt": encode_tensor(self.server.global_prompt)})

    def state_dict(self) -> dict[str, Any]:
        """The server side of a Flower run's checkpoint: the round driver (pool, P_g, RNG streams, DP releases, the
        rounds so far) and the run token that names the nodes' saved states."""
        return {"engine": "flower", "run_token": self.run_token, "driver": self.driver.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of :meth:`state_dict` (``--engine flower --resume``)."""
        if state.get("engine") != "flower":
            raise UserError("this checkpoint was written by the in-process engine: resume it with --engine local")
        self.driver.load_state_dict(state["driver"])
        self.run_token = str(state["run_token"])

    def run(self, grid: Grid, resumed: bool = False) -> History:
        """Handshake, the remaining rounds (every round, or those after a restored checkpoint; one
        evaluation-only round 0 for zero-shot), summary. Writes the run directory when one was given (a resumed
        run keeps its config.json)."""
        if not self.node_of:
            self.connect(grid)
        if resumed:
            self.recorder.resumed(self.rounds)
        else:
            self.recorder.begin(self.meta())
        rounds = len(self.driver.remaining())
        with self.recorder.open():
            self.start(grid, self.initial_arrays(), num_rounds=rounds, timeout=self.round_timeout)
        return self.recorder.finish(self.driver.rounds, self.driver.summary(engine="flower"), self.driver)

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


@dataclass(frozen=True)
class Evaluation:
    """One client's evaluation as its node reported it (an evaluate reply, or a train reply it rode on)."""

    accuracy: float
    attention: list[float] | None
    split_acc: dict[str, float]
    needs_global: bool  # it read the round's P_g: not valid past this round

    @classmethod
    def from_metrics(cls, metrics: MetricRecord) -> Evaluation:
        attention = [float(w) for w in metrics["attention"]] if "attention" in metrics else None
        n = len(EVAL_SET_METRIC)
        split = {k[n:]: float(v) for k, v in metrics.items() if k.startswith(EVAL_SET_METRIC)}
        # a node that does not say (an older pfedmoap) is asked again every round
        return cls(float(metrics["accuracy"]), attention, split, bool(metrics.get("eval-needs-global", 1)))


class PromptGrid(Grid):
    """A grid that waits for replies by polling every ``poll`` seconds instead of Flower's fixed 3 s.

    flwr 1.42's deployment grid checks for replies every 3 seconds, which on a round of two phases costs up to 6 s
    of pure waiting against well under a second of work on the tiny model. Everything else goes to the wrapped
    grid; replies are pulled with its own ``pull_messages``.
    """

    def __init__(self, grid: Grid, poll: float = 0.05):
        self.grid = grid
        self.poll = poll

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll)
        return replies


def _error_reason(text: str | None) -> str:
    """The useful line of a node's error: the ClientApp's own message, not the runtime's traceback around it."""
    text = (text or "").strip()
    marker = "Message: "  # Flower's runtimes wrap the ClientApp's exception as "... Message: <its text>"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip().removesuffix("'>")[:500] if lines else "unknown"
