"""PromptFL: one global prompt, trained locally and averaged (FedAvg); evaluated with the global prompt."""

from __future__ import annotations

import torch

from ..client import Client, LocalObjective
from ..server import Server
from .base import Method, Payload


class PromptFL(Method):
    name = "promptfl"

    def payload(self, server: Server, view: dict[int, torch.Tensor], client: Client) -> Payload:
        return Payload(global_prompt=server.global_prompt)


class FedProx(PromptFL):
    """PromptFL plus the proximal term mu / 2 * ||P - P_g||^2 in every local step."""

    name = "fedprox"

    def objective(self, payload: Payload) -> LocalObjective:
        return LocalObjective(prox_mu=self.cfg.fedprox_mu, anchor=payload.global_prompt)
