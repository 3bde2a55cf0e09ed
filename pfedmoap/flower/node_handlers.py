"""What a pFedMoAP node answers: one Flower node holds one partition (its ``partition-id`` node config).

:func:`answer` turns a message's content into the reply's content and updates the node's state. It runs in the
ClientApp's own process (the simulation, ``worker=false``) or in the node's long-lived worker process
(:mod:`~pfedmoap.flower.node_worker`), which keeps the node's world in memory across Flower's per-message
ClientApp processes. Three message types:

- ``query``: the handshake. The node builds its world (its own partition only) from the config the server sends
  and answers with its partition id, train / test sizes and prompt width, so the server can map node ids (random
  per run) to partition ids before it samples anything.
- ``train``: the download (P_g, the K experts and any method extras, in the wire dtype); the node trains its
  prompt and its private gate with the library's ``ClientRuntime`` and replies with the upload (the prompt).
- ``evaluate``: the round's P_g and its version; the node replies with its accuracy on its own test split (and,
  with ``--eval-split base2novel``, on the shared base and novel test sets, which every node builds itself).

The client's private state (prompt, gate, RNG, last experts, evaluation cache) lives in ``context.state``
between messages, and with node config ``state-dir`` also on the node's disk (:mod:`~pfedmoap.flower.node_state`);
the gate is never put in a reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..federated.client import Client
from ..federated.wire import wire_dtype
from ..methods import Payload
from .messages import (
    CONFIG,
    EVAL_SET_METRIC,
    METRICS,
    NOTES,
    PAYLOAD,
    STATE_RUN,
    STATE_TAG,
    UPLOAD,
    decode_tensors,
    encode_tensor,
)
from .node import Node, node_for, partition_id, save_client_state
from .node_state import NodeStateStore, message_tag, replace_client_records, state_tag

_log = logging.getLogger("pfedmoap")


def _node(
    content: RecordDict, node_config: Mapping[str, Any], state: RecordDict | None = None
) -> tuple[ConfigRecord, Node, int]:
    conf = content[CONFIG]
    node = node_for(str(conf["config-json"]), node_config)
    pid = partition_id(node_config, node.cfg.clients)
    if "partition-id" in conf and int(conf["partition-id"]) != pid:
        raise ValueError(f"message for partition {conf['partition-id']} reached the node of partition {pid}")
    run = state.get(STATE_RUN) if state is not None else None
    if isinstance(run, ConfigRecord) and str(conf.get("run-token", "")) != str(run["token"]):
        _refuse(pid, "it carries another run token than the run this node joined")
    return conf, node, pid


class DownloadRefused(ValueError):
    """A message whose download is not what this run's method sends: the node does not train or evaluate on it."""


def _refuse(pid: int, reason: str) -> None:
    """Say in one log line why partition ``pid``'s node refuses a message, and reply with an error instead."""
    message = f"partition {pid} refused a message: {reason}"
    _log.warning(message)
    raise DownloadRefused(message)


def check_download(node: Node, conf: ConfigRecord, pid: int, wire: Mapping[str, torch.Tensor]) -> None:
    """Refuse (:class:`DownloadRefused`) a train message whose tensors are not what the server of this run sends:
    another wire dtype, a prompt of another shape, experts that do not match their ids, non-finite values, tensors
    the method does not send. The node checks what it receives as the server checks what it uploads."""
    cfg = node.cfg
    if str(conf.get("wire-dtype")) != cfg.comm_dtype:
        _refuse(pid, f"wire dtype {conf.get('wire-dtype')!r}, this run's is {cfg.comm_dtype}")
    dtype, shape = wire_dtype(cfg.comm_dtype), tuple(node.world.init_prompt.shape)
    ids = [int(j) for j in conf.get("expert-ids", [])]
    if len(ids) > cfg.experts or len(set(ids)) != len(ids) or any(not 0 <= j < cfg.clients or j == pid for j in ids):
        _refuse(pid, f"expert ids {ids} are not up to {cfg.experts} other clients of {cfg.clients}")
    expected = {"global-prompt": shape, "expert-prompts": (len(ids), *shape)}
    for name, tensor in wire.items():
        if tensor.dtype != dtype:
            _refuse(pid, f"{name} is {tensor.dtype}, the wire's is {dtype}")
        if name in expected and tuple(tensor.shape) != expected[name]:
            _refuse(pid, f"{name} has shape {tuple(tensor.shape)}, not {expected[name]}")
        if not bool(torch.isfinite(tensor.float()).all()):
            _refuse(pid, f"{name} has non-finite values")
    if ids and "expert-prompts" not in wire:
        _refuse(pid, f"expert ids {ids} came without their prompts")
    extras = {name: t for name, t in wire.items() if name not in expected}
    if (why := node.runtime.method.check_download_extras(extras)) is not None:
        _refuse(pid, why)


def _store(node_config: Mapping[str, Any], conf: ConfigRecord, pid: int) -> NodeStateStore | None:
    """The node's on-disk state store for this run (node config ``state-dir``; None without it)."""
    root = node_config.get("state-dir")
    token = conf.get("run-token")
    if not root or not token:
        return None
    return NodeStateStore(str(root), str(token), pid)


class _Session:
    """One message's client: loaded from the newest state made before the message (in ``context.state`` or on the
    node's disk), saved back to both afterwards. ``notes`` tells the server where the state came from."""

    def __init__(
        self, kind: str, node_config: Mapping[str, Any], state: RecordDict, conf: ConfigRecord, node: Node, pid: int
    ):
        self.state = state
        self.tag = message_tag(int(conf.get("round", 0)), kind, int(conf.get("exchange", 0)))
        self.store = _store(node_config, conf, pid)
        current = state_tag(state)
        source = "memory" if current is not None else "fresh"
        if current is not None and current >= self.tag:  # a resumed server redoes a round: not from its future
            replace_client_records(state)
            current, source = None, "fresh"
        problems: list[str] = []
        if self.store is not None:
            loaded = self.store.load_before(self.tag)
            problems = loaded.problems
            if loaded.state is not None and (current is None or loaded.tag > current):
                replace_client_records(state, loaded.state)
                source = f"disk (round {loaded.tag[0]})"
        self.notes = ConfigRecord({"state": source, "problems": problems})
        self.client: Client = node.load_client(pid, state)

    def save(self) -> None:
        save_client_state(self.client, self.state)
        tag = {"round": self.tag[0], "phase": self.tag[1], **({"exchange": self.tag[2]} if len(self.tag) > 2 else {})}
        self.state[STATE_TAG] = ConfigRecord(tag)
        if self.store is not None:
            self.store.save(self.state, self.tag)


def answer_query(content: RecordDict, node_config: Mapping[str, Any], state: RecordDict) -> RecordDict:
    """Handshake: build this node's world (its partition only) and say which partition it holds."""
    conf, node, pid = _node(content, node_config)
    if "run-token" in conf:  # the run this node joined: a train or evaluate message of another is refused
        state[STATE_RUN] = ConfigRecord({"token": str(conf["run-token"])})
    data = node.world.client_data(pid)
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "num-examples": data.num_train,
            "num-test": data.num_test,
            "prompt-width": node.world.clip.width,
            "num-classes": node.world.dataset.num_classes,
        }
    )
    return RecordDict({METRICS: metrics})


def answer_train(content: RecordDict, node_config: Mapping[str, Any], state: RecordDict) -> RecordDict:
    """Local update on the downloaded payload; reply with the upload (in the wire dtype) and counts."""
    start = time.perf_counter()
    conf, node, pid = _node(content, node_config, state)
    wire = decode_tensors(content[PAYLOAD], str(conf["wire-dtype"]))
    check_download(node, conf, pid, wire)  # before the client's state is touched
    session = _Session("train", node_config, state, conf, node, pid)
    client = session.client
    payload = Payload(expert_ids=[int(j) for j in conf["expert-ids"]]).with_tensors(wire).map(torch.Tensor.float)
    view = node.view(conf, payload.global_prompt)
    upload = node.runtime.local_update(client, payload, view)
    metrics = MetricRecord({"partition-id": pid, "num-examples": client.data.num_train})
    if not node.runtime.eval_needs_global(client):
        # its evaluation does not wait for the aggregate: evaluate now, and the accuracy rides on this reply (the
        # same state, so the same numbers as an evaluate message after the aggregation would give)
        metrics.update(_evaluation(client, node.runtime.evaluate_client(client, view), needs_global=False))
    session.save()
    metrics["train-seconds"] = time.perf_counter() - start
    reply = RecordDict({METRICS: metrics, NOTES: session.notes})
    if upload is not None:
        reply[UPLOAD] = ArrayRecord({name: encode_tensor(t) for name, t in upload.tensors().items()})
    return reply


def answer_evaluate(content: RecordDict, node_config: Mapping[str, Any], state: RecordDict) -> RecordDict:
    """Accuracy on the node's own test split with the state the method evaluates it with."""
    conf, node, pid = _node(content, node_config, state)
    sent = decode_tensors(content[PAYLOAD])
    prompt = sent.pop("global-prompt", None)
    shape = tuple(node.world.init_prompt.shape)
    if prompt is None or prompt.dtype != torch.float32 or tuple(prompt.shape) != shape:
        got = sorted([*sent, *(["global-prompt"] if prompt is not None else [])])
        _refuse(pid, f"an evaluate message carries {got}, not this run's float32 global prompt of {shape}")
    if not bool(torch.isfinite(prompt).all()):
        _refuse(pid, "global-prompt has non-finite values")
    # a method's other global tensors (Method.eval_extras): float32, and what its uploads may hold
    odd = next((name for name, t in sent.items() if t.dtype != torch.float32), None)
    if odd is not None:
        _refuse(pid, f"{odd} in an evaluate message is {sent[odd].dtype}, not float32")
    if sent and (why := node.runtime.method.check_extras(sent)) is not None:
        _refuse(pid, why)
    session = _Session("evaluate", node_config, state, conf, node, pid)
    client = session.client
    global_prompt = prompt.float()
    acc = node.runtime.evaluate_client(client, node.view(conf, global_prompt, sent))
    session.save()
    needs_global = node.runtime.eval_needs_global(client)
    metrics = MetricRecord(
        {"partition-id": pid, "num-examples": client.data.num_test, **_evaluation(client, acc, needs_global)}
    )
    return RecordDict({METRICS: metrics, NOTES: session.notes})


def _evaluation(client: Client, acc: float, needs_global: bool) -> dict[str, Any]:
    """What a reply says of a client's evaluation: its accuracy, its gate's attention, the base / novel accuracies
    (``--eval-split base2novel``), and whether it reads the round's aggregate (``eval-needs-global``; when it does
    not, the server keeps these numbers until the client trains again)."""
    out: dict[str, Any] = {"accuracy": float(acc)}
    if client.attention is not None:
        out["attention"] = [float(w) for w in client.attention]
    for name, value in client.split_acc.items():  # the shared evaluation sets of --eval-split (by set name)
        out[f"{EVAL_SET_METRIC}{name}"] = float(value)
    out["eval-needs-global"] = int(needs_global)  # a MetricRecord holds numbers
    return out


ANSWERS = {"query": answer_query, "train": answer_train, "evaluate": answer_evaluate}


def answer(kind: str, content: RecordDict, node_config: Mapping[str, Any], state: RecordDict) -> RecordDict:
    """The reply content to a message of type ``kind`` (``state`` is the node's ``context.state``, updated)."""
    if kind not in ANSWERS:
        raise ValueError(f"message type {kind!r} is not one of {sorted(ANSWERS)}")
    return ANSWERS[kind](content, node_config, state)
