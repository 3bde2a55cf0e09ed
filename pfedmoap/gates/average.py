"""The simplest gate: a learned weighted average of the experts' text features, the same for every image.

What it computes, with E = K + 1 experts (local first) and their L2-normalised text features t_e^c:

    w     = softmax(a)                                 a in R^{K+1}, the gate's only parameters
    T^c   = sum_e w_e * t_e^c                          per class, full width D (no reduction, no renormalisation)
    logit = gamma * <i_b, T^c> + lam * l_loc[b, c]

K + 1 parameters (10 at K = 9), initialised to zero: a plain mean of the experts at the start. It answers the
capacity question: how much of the attention gate's gain a per-client choice of expert weights alone gives,
without looking at the image. Like the linear router it is order-sensitive (slot 0 is the local expert, then
the experts in the order sent); with fewer than K experts the missing slots are left out of the softmax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..federated.registry import register_gate
from ..ops import REFERENCE, OpTable
from .base import Gate

if TYPE_CHECKING:
    from ..config import Config


@register_gate
class AverageGate(Gate):
    """softmax(a)-weighted mean of the experts' text features per class; K + 1 parameters."""

    name = "average"
    help = "a learned softmax-weighted mean of the experts' text features (K+1 parameters)"

    def __init__(self, slots: int):
        super().__init__()
        self.slots = slots
        self.logits = nn.Parameter(torch.zeros(slots))

    @classmethod
    def from_config(cls, cfg: Config, ops: OpTable = REFERENCE) -> AverageGate:
        return cls(cfg.experts + 1)

    @classmethod
    def check_features(cls, cfg: Config, embed_dim: int) -> None:
        """Works on the full feature width: d_gate does not apply."""

    def forward(
        self,
        image: torch.Tensor,
        experts: torch.Tensor,
        *,
        gamma: float,
        local_logits: torch.Tensor | None = None,
        lam: float = 0.0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image [B, D], experts [E, C, D] (E <= K+1) -> logits [B, C] and weights [B, C, E] or None."""
        n_exp = experts.shape[0]
        if n_exp > self.slots:
            raise ValueError(f"the average gate has {self.slots} expert slots, got {n_exp} experts")
        weights = self.logits[:n_exp].softmax(dim=0)  # [E]
        mixed = torch.einsum("e,ecd->cd", weights, experts)  # [C, D]
        logits = gamma * image @ mixed.t()
        if local_logits is not None:
            logits = logits + lam * local_logits
        out = weights.expand(image.shape[0], experts.shape[1], n_exp) if need_weights else None
        return logits, out
