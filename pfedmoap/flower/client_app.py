"""The pFedMoAP ClientApp: one Flower node holds one partition (its ``partition-id`` node config).

Three message types:

- ``query``: the handshake. The node builds its world from the config the server sends and answers with its
  partition id, train / test sizes and prompt width, so the server can map node ids (random per run) to
  partition ids before it samples anything.
- ``train``: the download (P_g and the K experts, in the wire dtype); the node trains its prompt and its private
  gate with the library's ``Client`` and replies with the prompt only.
- ``evaluate``: the round's P_g and its version; the node replies with its accuracy on its own test split.

The client's private state (prompt, gate, RNG, last experts, evaluation cache) lives in ``context.state``
between messages; the gate is never put in a reply.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..methods import Payload
from .task import (
    CONFIG,
    METRICS,
    PAYLOAD,
    UPLOAD,
    decode_tensor,
    encode_tensor,
    evaluate_client,
    load_client,
    local_update,
    node_federation,
    partition_id,
    save_client_state,
)


def _world(msg: Message, context: Context):
    conf = msg.content[CONFIG]
    fed = node_federation(str(conf["config-json"]), context.node_config)
    # a node is one of many processes on its machine: one torch thread unless the config or node config says more
    torch.set_num_threads(fed.cfg.threads or 1)
    pid = partition_id(context.node_config, len(fed.clients))
    if "partition-id" in conf and int(conf["partition-id"]) != pid:
        raise ValueError(f"message for partition {conf['partition-id']} reached the node of partition {pid}")
    return conf, fed, pid


def handle_query(msg: Message, context: Context) -> Message:
    """Handshake: build the world once and say which partition this node holds."""
    _, fed, pid = _world(msg, context)
    client = fed.clients[pid]
    metrics = MetricRecord(
        {
            "partition-id": pid,
            "num-examples": client.data.num_train,
            "num-test": int(client.data.test_labels.numel()),
            "prompt-width": fed.clip.width,
            "num-classes": fed.dataset.num_classes,
        }
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """Local update on the downloaded payload; reply with the prompt (in the wire dtype) and counts."""
    start = time.perf_counter()
    conf, fed, pid = _world(msg, context)
    client = load_client(fed, pid, context.state)
    arrays = msg.content[PAYLOAD]
    wire = str(conf["wire-dtype"])
    payload = Payload(
        global_prompt=decode_tensor(arrays["global-prompt"], wire).float() if "global-prompt" in arrays else None,
        expert_ids=[int(j) for j in conf["expert-ids"]],
        expert_prompts=decode_tensor(arrays["expert-prompts"], wire).float() if "expert-prompts" in arrays else None,
    )
    upload = local_update(fed, client, payload)
    save_client_state(client, context.state)
    content = RecordDict(
        {
            METRICS: MetricRecord(
                {
                    "partition-id": pid,
                    "num-examples": client.data.num_train,
                    "dp-releases": client.dp_releases,
                    "train-seconds": time.perf_counter() - start,
                }
            )
        }
    )
    if upload is not None:
        content[UPLOAD] = ArrayRecord({"prompt": encode_tensor(upload)})
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Accuracy on the node's own test split with the state the method evaluates it with."""
    conf, fed, pid = _world(msg, context)
    client = load_client(fed, pid, context.state)
    fed.server.global_prompt = decode_tensor(msg.content[PAYLOAD]["global-prompt"]).float()
    fed.server.global_version = int(conf["global-version"])
    acc = evaluate_client(fed, client)
    save_client_state(client, context.state)
    metrics = MetricRecord(
        {"partition-id": pid, "accuracy": float(acc), "num-examples": int(client.data.test_labels.numel())}
    )
    if client.attention is not None:
        metrics["attention"] = [float(w) for w in client.attention]
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp serving the three pFedMoAP message types."""
    app = ClientApp()
    app.query()(handle_query)
    app.train()(handle_train)
    app.evaluate()(handle_evaluate)
    return app


app = make_client_app()
