"""The pFedMoAP gate: one multi-head attention layer mixing K+1 prompt experts per (image, class).

SPEC §1: query = reduce(image feature), keys = values = the experts' reduced text features for that class (local
expert first). W_Q, W_K, W_V, W_O are d x d Linear layers with bias; scores are multiplied by ``scaling`` (10.0
in the reference code), softmax over experts, no residual / norm / dropout; l_moe = gamma * <query, T_MoE>.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..base.errors import ConfigError
from ..config.settings import Setting
from ..federated.registry import register_gate
from ..ops import REFERENCE, OpTable, reference
from .base import D_GATE, REDUCTION, Gate, reduce_features

if TYPE_CHECKING:
    from ..config import Config


def _parse_scale(text: str) -> float | str:
    if text == "sqrt":
        return "sqrt"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number or 'sqrt'") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number or 'sqrt'")
    return value


def _check_scale(value: object) -> None:
    if value == "sqrt":
        return
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"attn_scale={value!r}: use a positive number or 'sqrt'") from None
    if not (scale > 0 and math.isfinite(scale)):
        raise ConfigError(f"attn_scale={value!r}: use a positive number or 'sqrt'")


# the gate's parameters in the argument order of the gate_score ops: (W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O)
WEIGHT_NAMES = tuple(f"{lin}.{w}" for lin in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias"))

HEADS = Setting("heads", 8, "gate attention heads", kind=int, low=1)
ATTN_SCALE: Setting[float | str] = Setting(
    "attn_scale", 10.0, "score scaling: a number (reference: 10) or sqrt", parse=_parse_scale, check=_check_scale
)


def attn_scaling(cfg: Config) -> float:
    """The numeric factor the gate multiplies attention scores by: the number, or 1 / sqrt(head width)."""
    scale = ATTN_SCALE.of(cfg)
    if scale == "sqrt":
        return 1.0 / math.sqrt(D_GATE.of(cfg) // HEADS.of(cfg))
    return float(scale)


@register_gate
class AttentionGate(Gate):
    """Multi-head attention over experts, parameters shared across classes; 4(d^2 + d) parameters.

    The logits come from the run's fused ``gate_score`` op (``ops``): the Triton kernel on CUDA, the factored
    algebra on CPU with ``--fused``, the plain-torch reference otherwise; all give the same numbers.
    """

    name = "attention"
    help = "multi-head attention over the experts (the paper's gate)"
    settings = (*Gate.settings, HEADS, ATTN_SCALE)

    def __init__(
        self,
        dim: int = 128,
        heads: int = 8,
        scaling: float = 10.0,
        reduction: str = "strided",
        ops: OpTable = REFERENCE,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_gate={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.scaling, self.reduction = dim, heads, float(scaling), reduction
        self.ops = ops
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    @classmethod
    def from_config(cls, cfg: Config, ops: OpTable = REFERENCE) -> AttentionGate:
        return cls(D_GATE.of(cfg), HEADS.of(cfg), attn_scaling(cfg), REDUCTION.of(cfg), ops)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        d_gate, heads = D_GATE.of(cfg), HEADS.of(cfg)
        if d_gate % heads:
            raise ConfigError(f"d_gate={d_gate} is not divisible by heads={heads}")

    @classmethod
    def valid_widths(cls, cfg: Config, embed_dim: int) -> list[int]:
        return [d for d in super().valid_widths(cfg, embed_dim) if d % HEADS.of(cfg) == 0]

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
        """image [B, D], experts [E, C, D] -> logits [B, C] (+ lam * local_logits) and weights [B, C, E] or None."""
        query = reduce_features(image, self.dim, self.reduction)
        keys = reduce_features(experts, self.dim, self.reduction)
        return self.ops.gate_score(
            query,
            keys,
            *self.weights(),
            gamma=gamma,
            heads=self.heads,
            scaling=self.scaling,
            need_weights=need_weights,
            local=local_logits,
            lam=lam,
        )

    def forward_clients(
        self,
        params: dict[str, torch.Tensor],
        image: torch.Tensor,
        experts: torch.Tensor,
        *,
        gamma: float,
        local_logits: torch.Tensor | None = None,
        lam: float = 0.0,
    ) -> torch.Tensor:
        """:meth:`forward`'s logits for M clients at once: each client's own gate parameters stacked in ``params``
        (this module's parameter names, each [M, ...]), image [M, B, D], experts [M, E, C, D], local_logits
        [M, B, C] -> logits [M, B, C], through the run's ``gate_score_clients`` (one launch for all M with the
        fused kernels). This module supplies the shapes and settings only; its own parameters are not read."""
        query = reduce_features(image, self.dim, self.reduction)
        keys = reduce_features(experts, self.dim, self.reduction)
        logits, _ = self.ops.gate_score_clients(
            query,
            keys,
            *(params[n] for n in WEIGHT_NAMES),
            gamma=gamma,
            heads=self.heads,
            scaling=self.scaling,
            local=local_logits,
            lam=lam,
        )
        return logits

    def mix(
        self, query: torch.Tensor, experts: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mixed expert feature itself: reduced query [B, d], reduced experts [E, C, d] -> T_MoE [B, C, d]
        and head-averaged weights [B, C, E] or None (plain torch; the logits path never builds T_MoE)."""
        return reference.gate_attention(
            query, experts, *self.weights(), heads=self.heads, scaling=self.scaling, need_weights=need_weights
        )

    def weights(self) -> tuple[torch.Tensor, ...]:
        """(W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O): the argument order of the ``gate_score`` ops."""
        # read through the modules' attributes, which torch.func.functional_call swaps (the lock step's vmap)
        return tuple(
            t for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj) for t in (lin.weight, lin.bias)
        )
