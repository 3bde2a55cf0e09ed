"""FedProx on PromptFL: the local objective adds mu / 2 * ||P - P_g||^2 to every step's loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config.settings import Setting
from ..federated.client import Client, Objective
from ..federated.registry import register_method
from .base import ClientContext, GlobalState, Payload, PromptObjective
from .promptfl import PromptFL

if TYPE_CHECKING:
    from ..federated.prompt import PromptEncoder


class ProximalObjective(PromptObjective):
    """CoOp's loss + mu / 2 * ||ctx - anchor||^2 (no term when mu is 0)."""

    def __init__(
        self, encoder: PromptEncoder, start_prompt: torch.Tensor, lr_prompt: float, anchor: torch.Tensor, mu: float
    ):
        super().__init__(encoder, start_prompt, lr_prompt)
        self.anchor = anchor.to(encoder.clip.device)
        self.mu = mu

    def extra_loss(self) -> torch.Tensor | None:
        if self.mu <= 0:
            return None
        return 0.5 * self.mu * (self.prompt - self.anchor).pow(2).sum()

    def vector_state(self) -> dict[str, torch.Tensor] | None:
        return {"prompt": self.prompt, "anchor": self.anchor}

    def vector_loss(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        loss = super().vector_loss(state, features, labels, text)
        if self.mu <= 0:
            return loss
        return loss + 0.5 * self.mu * (state["prompt"] - state["anchor"]).pow(2).sum()


MU = Setting("fedprox_mu", 0.01, "weight mu of the proximal term mu / 2 * ||P - P_g||^2", low=0.0)


@register_method
class FedProx(PromptFL):
    name = "fedprox"
    help = "PromptFL + FedProx's proximal term (--fedprox-mu)"
    settings = (MU,)

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        start = self.start_prompt(state, client, payload)
        return ProximalObjective(ctx.encoder, start, self.cfg.lr_prompt, payload.global_prompt, MU.of(self.cfg))
