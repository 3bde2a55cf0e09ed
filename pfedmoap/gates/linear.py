"""The paper's linear-projection gate (pFedMoAP Sec. 3.3 and App. C.3, Table 7): a conventional MoE router.

What it computes, per image b (all features L2-normalised, then reduced from D to d like the attention gate's):

    w_b   = softmax(W q_b + b_r)                      in R^E, q_b = reduce(i_b), W in R^{(K+1) x d}, b_r in R^{K+1}
    T_b^c = sum_e w_b,e * reduce(t_e^c)               the experts' text features for class c, weighted
    logit = gamma * <q_b, T_b^c> + lam * l_loc[b, c]

(K+1)(d + 1) parameters: 330 at K = 9 and d = 32, 1,290 at d = 128. The router maps the image alone to one
weight per expert *slot*, so it needs a fixed number of experts and is order-sensitive, as the paper says: slot 0
is the local expert, slots 1..K the non-local ones in the order the server sent them (nearest first under KNN).
With fewer than K experts available (a small pool), the missing slots are left out of the softmax. The paper
leaves the layer's exact form open; the choices here are one linear layer on the reduced image feature and a
dense softmax (no top-k). The weights are the same for every class of an image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..federated.registry import register_gate
from ..ops import REFERENCE, OpTable
from .base import D_GATE, REDUCTION, Gate, reduce_features

if TYPE_CHECKING:
    from ..config import Config


@register_gate
class LinearGate(Gate):
    """Softmax router from the image feature to K+1 expert weights; (K+1)(d+1) parameters."""

    name = "linear"
    help = "linear projection of the image to one weight per expert (the paper's ablation)"

    def __init__(self, dim: int, slots: int, reduction: str = "strided"):
        super().__init__()
        self.dim, self.slots, self.reduction = dim, slots, reduction
        self.router = nn.Linear(dim, slots)

    @classmethod
    def from_config(cls, cfg: Config, ops: OpTable = REFERENCE) -> LinearGate:
        return cls(D_GATE.of(cfg), cfg.experts + 1, REDUCTION.of(cfg))

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
        n_exp, n_cls = experts.shape[0], experts.shape[1]
        if n_exp > self.slots:
            raise ValueError(f"the linear gate has {self.slots} expert slots, got {n_exp} experts")
        query = reduce_features(image, self.dim, self.reduction)  # [B, d]
        keys = reduce_features(experts, self.dim, self.reduction)  # [E, C, d]
        weights = self.router(query)[:, :n_exp].softmax(dim=-1)  # [B, E]: missing slots left out
        # <q_b, sum_e w_be k_ec> = sum_e w_be <q_b, k_ec>: T_b^c is never built
        scores = torch.einsum("bd,ecd->bec", query, keys)
        logits = gamma * torch.einsum("be,bec->bc", weights, scores)
        if local_logits is not None:
            logits = logits + lam * local_logits
        out_weights = weights[:, None, :].expand(-1, n_cls, -1) if need_weights else None
        return logits, out_weights
