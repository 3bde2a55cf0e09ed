"""The pFedMoAP gate: one multi-head attention layer mixing K+1 prompt experts per (image, class).

SPEC §1: query = reduce(image feature), keys = values = the experts' reduced text features for that
class (local expert first). W_Q, W_K, W_V, W_O are d x d Linear layers with bias; scores are multiplied by
``scaling`` (10.0 in the reference code), softmax over experts, no residual / norm / dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops


def reduce_features(x: torch.Tensor, dim: int, mode: str = "strided") -> torch.Tensor:
    """Reduce the last axis from D to ``dim``: keep every r-th coordinate (strided) or average groups of r.

    Applied identically to image and text features; no renormalisation (as the reference code).
    """
    full = x.shape[-1]
    if full % dim:
        raise ValueError(f"d_gate={dim} does not divide the feature dim {full}")
    r = full // dim
    if r == 1:
        return x
    if mode == "strided":
        return x[..., ::r]
    if mode == "avgpool":
        return x.reshape(*x.shape[:-1], dim, r).mean(dim=-1)
    raise ValueError(f"reduction={mode!r} is not one of: strided, avgpool")


class AttentionGate(nn.Module):
    """Multi-head attention over experts, parameters shared across classes; 4(d^2 + d) parameters."""

    def __init__(self, dim: int = 128, heads: int = 8, scaling: float = 10.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_gate={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.scaling = dim, heads, float(scaling)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, experts: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [B, d], experts [E, C, d] -> T_MoE [B, C, d] and head-averaged weights [B, C, E] or None."""
        return ops.gate_attention(
            query, experts, *self.weights(), heads=self.heads, scaling=self.scaling, need_weights=need_weights
        )

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O): the argument order of the ops in ``pfedmoap.ops``."""
        return tuple(
            t for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj) for t in (lin.weight, lin.bias)
        )


def moe_logits(
    gate: AttentionGate,
    image_reduced: torch.Tensor,
    experts_reduced: torch.Tensor,
    gamma: float,
    need_weights: bool = False,
    local_logits: torch.Tensor | None = None,
    lam: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """l_moe[b, c] = gamma * <reduce(i_b), T_MoE[b, c]> (a raw dot product: T_MoE is not normalised).

    With ``local_logits`` the result is l_moe + lam * local_logits, computed inside the same (fused) op.
    """
    return ops.gate_score(
        image_reduced,
        experts_reduced,
        *gate.weights(),
        heads=gate.heads,
        scaling=gate.scaling,
        gamma=gamma,
        need_weights=need_weights,
        local=local_logits,
        lam=lam,
    )


def pfedmoap_logits(
    image: torch.Tensor,
    local_text: torch.Tensor,
    expert_text: torch.Tensor | None,
    gate: AttentionGate | None,
    gamma: float,
    lam: float,
    d_gate: int,
    reduction: str = "strided",
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final logits = l_moe + lam * l_loc (SPEC §1); l_loc alone when there are no experts.

    image [B, D] and local_text [C, D] are L2-normalised; expert_text [K, C, D] are the frozen non-local
    experts (or None / K = 0 at a first participation). Returns (logits [B, C], weights [B, C, K+1] or None).
    """
    local_logits = gamma * image @ local_text.t()
    if gate is None or expert_text is None or expert_text.shape[0] == 0:
        return local_logits, None
    experts = torch.cat([local_text[None], expert_text.to(local_text.dtype)], dim=0)
    query = reduce_features(image, d_gate, reduction)
    keys = reduce_features(experts, d_gate, reduction)
    return moe_logits(gate, query, keys, gamma, need_weights=need_weights, local_logits=local_logits, lam=lam)
