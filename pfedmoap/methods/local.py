"""CoOp, local only: every client trains its own prompt from the common initialisation; nothing moves."""

from __future__ import annotations

import torch

from ..client import Client
from ..server import Server
from .base import EvalState, Method, Payload


class LocalOnly(Method):
    name = "local"

    def start_prompt(self, server: Server, client: Client, payload: Payload) -> torch.Tensor:
        # the common init P_g^0 is generated from the shared seed, not sent
        return client.prompt if client.prompt is not None else server.init_prompt

    def uploads(self) -> bool:
        return False

    def aggregate(self, server: Server, uploads: dict[int, torch.Tensor]) -> None:
        return None

    def eval_state(self, server: Server, client: Client) -> EvalState:
        if client.prompt is None:
            return EvalState(("init",), server.init_prompt)
        return EvalState(("own", client.cid, client.version), client.prompt)
