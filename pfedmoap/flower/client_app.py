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


def make_client_app(node_defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp serving the three pFedMoAP message types. ``node_defaults`` are node-config values for nodes
    that do not set them (the simulation gives its nodes a ``state-dir`` on the run's disk)."""
    defaults = dict(node_defaults or {})

    def handle(msg: Message, context: Context) -> Message:
        """Answer one message (query, train or evaluate) with the node's state in ``context.state``."""
        kind = msg.metadata.message_type
        node_config = {**defaults, **context.node_config}
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


app = make_client_app()
