"""CoOp, local only: every client trains its own prompt from the common initialisation; nothing moves."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..federated.client import Client
from ..federated.registry import register_method
from ..federated.server import Server
from .base import EvalState, GlobalState, Method, Payload, Upload


@register_method
class LocalOnly(Method):
    name = "local"
    help = "CoOp, local only: each client's own prompt, no communication"
    uploads = False

    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        return Payload()

    def start_prompt(self, state: GlobalState, client: Client, payload: Payload) -> torch.Tensor:
        # the common init P_g^0 is generated from the shared seed, not sent
        return client.prompt if client.prompt is not None else state.init_prompt

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        return None

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        if client.prompt is None:
            return EvalState(("init",), state.init_prompt)
        return EvalState(("own", client.cid, client.version), client.prompt)

    def eval_needs_global(self, client: Client) -> bool:
        return False  # its own prompt, or the common P_g^0 before it trains: never the aggregate
