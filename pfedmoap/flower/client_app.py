"""The pFedMoAP ClientApp: one Flower node holds one partition (its ``partition-id`` node config).

Three message types:

- ``query``: the handshake. The node builds its world (its own partition only) from the config the server sends
  and answers with its partition id, train / test sizes and prompt width, so the server can map node ids (random
  per run) to partition ids before it samples anything.
- ``train``: the download (P_g, the K experts and any method extras, in the wire dtype); the node trains its
  prompt and its private gate with the library's ``ClientRuntime`` and replies with the upload (the prompt).
- ``evaluate``: the round's P_g and its version; the node replies with its accuracy on its own test split (and,
  with ``--eval-split base2novel``, on the shared base and novel test sets, which every node builds itself).

The client's private state (prompt, gate, RNG, last experts, evaluation cache) lives in ``context.state``
between messages; the gate is never put in a reply.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..methods import Payload
from .task import (
    CONFIG,
    METRICS,
    PAYLOAD,
    UPLOAD,
    Node,
    decode_tensors,
    encode_tensor,
    node_for,
    partition_id,
    save_client_state,
)


def _node(msg: Message, context: Context) -> tuple[ConfigRecord, Node, int]:
    conf = msg.content[CONFIG]
    node = node_for(str(conf["config-json"]), context.node_config)
    # a node is one of many processes on its machine: one torch thread unless the config or node config says more
    torch.set_num_threads(node.cfg.threads or 1)
    pid = partition_id(context.node_config, node.cfg.clients)
    if "partition-id" in conf and int(conf["partition-id"]) != pid:
        raise ValueError(f"message for partition {conf['partition-id']} reached the node of partition {pid}")
    return conf, node, pid


def handle_query(msg: Message, context: Context) -> Message:
    """Handshake: build this node's world (its partition only) and say which partition it holds."""
    _, node, pid = _node(msg, context)
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
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Local update on the downloaded payload; reply with the upload (in the wire dtype) and counts."""
    start = time.perf_counter()
    conf, node, pid = _node(msg, context)
    client = node.load_client(pid, context.state)
    wire = decode_tensors(msg.content[PAYLOAD], str(conf["wire-dtype"]))
    payload = Payload(expert_ids=[int(j) for j in conf["expert-ids"]]).with_tensors(wire).map(torch.Tensor.float)
    upload = node.runtime.local_update(client, payload, node.view(conf, payload.global_prompt))
    save_client_state(client, context.state)
    content = RecordDict(
        {
            METRICS: MetricRecord(
                {
                    "partition-id": pid,
                    "num-examples": client.data.num_train,
                    "train-seconds": time.perf_counter() - start,
                }
            )
        }
    )
    if upload is not None:
        content[UPLOAD] = ArrayRecord({name: encode_tensor(t) for name, t in upload.tensors().items()})
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Accuracy on the node's own test split with the state the method evaluates it with."""
    conf, node, pid = _node(msg, context)
    client = node.load_client(pid, context.state)
    global_prompt = decode_tensors(msg.content[PAYLOAD])["global-prompt"].float()
    acc = node.runtime.evaluate_client(client, node.view(conf, global_prompt))
    save_client_state(client, context.state)
    metrics = MetricRecord({"partition-id": pid, "accuracy": float(acc), "num-examples": client.data.num_test})
    if client.attention is not None:
        metrics["attention"] = [float(w) for w in client.attention]
    for name, value in client.split_acc.items():  # --eval-split base2novel: the shared base and novel sets
        metrics[f"{name}-accuracy"] = float(value)
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp serving the three pFedMoAP message types."""
    app = ClientApp()
    app.query()(handle_query)
    app.train()(handle_train)
    app.evaluate()(handle_evaluate)
    return app


app = make_client_app()
