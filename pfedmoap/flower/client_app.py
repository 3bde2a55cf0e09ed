"""The pFedMoAP ClientApp: one Flower node holds one partition (its ``partition-id`` node config).

A deployment's SuperNode starts a fresh ``flwr-clientapp`` process for every message (flwr 1.42). This module
therefore imports no torch: with node config ``state-dir`` (a deployment node) it hands each message to the node's
long-lived worker process (:mod:`~pfedmoap.flower.node_worker`), which keeps the node's world (model, partition,
features) in memory; without it (the simulation, whose workers live across messages anyway), or with
``worker=false``, it answers in its own process. Either way :func:`pfedmoap.flower.node_handlers.answer` makes
the reply, so both paths give the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .node_worker import forward, uses_worker


def make_client_app() -> ClientApp:
    """A ClientApp serving the three pFedMoAP message types."""

    def handle(msg: Message, context: Context) -> Message:
        """Answer one message (query, train or evaluate) with the node's state in ``context.state``."""
        kind = msg.metadata.message_type
        node_config = node_settings(context.node_config, context.run_config)
        if uses_worker(node_config):
            content = forward(kind, msg.content, node_config, context.state)
        else:
            from .node_handlers import answer

            content = answer(kind, msg.content, node_config, context.state)
        return Message(content, reply_to=msg)

    app = ClientApp()
    app.query()(handle)
    app.train()(handle)
    app.evaluate()(handle)
    return app


def node_settings(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node's own config, plus the run config's ``node-state-dir`` for a node that names no ``state-dir`` of its
    own (the simulated nodes of ``--engine flower``, which share the run's disk): such a node answers in its own
    process (no worker), as Flower's simulation keeps that process across messages anyway."""
    settings = dict(node_config)
    shared = str(run_config.get("node-state-dir", "") or "")
    if shared and "state-dir" not in settings:
        settings = {"state-dir": shared, "worker": False, **settings}
    return settings


app = make_client_app()
