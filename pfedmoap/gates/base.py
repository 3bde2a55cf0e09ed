"""What a mixture gate is: a module that turns the E = K+1 experts' text features into logits per (image, class).

Every gate has one call signature::

    logits, weights = gate(image, experts, gamma=gamma, local_logits=l_loc, lam=lam, need_weights=False)

``image`` [B, D] are the L2-normalised image features, ``experts`` [E, C, D] the experts' L2-normalised text
features with the local expert first; the gate reduces both from D to its width d itself. It returns the final
logits [B, C] (l_moe + lam * l_loc) and, when asked, its weight per expert [B, C, E] (or None). Any
``nn.Module`` with that signature plugs into :func:`pfedmoap_logits`; a registered :class:`Gate` subclass is
also selectable by name (``--gate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..base.errors import ConfigError
from ..config.settings import Setting
from ..ops import REFERENCE, OpTable

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.objective import Scorer


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


REDUCTIONS = ("strided", "avgpool")

# every gate's settings (pfedmoap.config.settings): a gate reads its own with e.g. D_GATE.of(cfg)
D_GATE = Setting("d_gate", 128, "gate width d (features reduced from D to d)", kind=int, low=1)
REDUCTION = Setting("reduction", "strided", "how features are reduced from D to d", kind=str, choices=REDUCTIONS)
LAM = Setting(
    "lam", 0.5, "weight of the local logits: logits = l_moe + lambda * l_loc", flag="--lambda", label="lambda"
)
LR_GATE = Setting("lr_gate", 0.01, "gate learning rate", low=0.0, strict=True)


class Gate(nn.Module):
    """Base of the registered gates: their name, help line, settings, config checks and construction from a
    config."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = (D_GATE, REDUCTION, LAM, LR_GATE)

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
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Config, ops: OpTable = REFERENCE) -> Gate:
        """A fresh gate with the config's settings, its fused ops (if any) taken from the run's ``ops``."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse settings this gate cannot run with (ConfigError, one line)."""

    @classmethod
    def valid_widths(cls, cfg: Config, embed_dim: int) -> list[int]:
        """Gate widths d that this gate can use on features of ``embed_dim`` with the config's other settings."""
        return [d for d in range(8, embed_dim + 1) if embed_dim % d == 0]

    @classmethod
    def check_features(cls, cfg: Config, embed_dim: int) -> None:
        """Refuse a ``d_gate`` that does not fit the model's feature dim (known once the model is loaded)."""
        d_gate = D_GATE.of(cfg)
        if d_gate > embed_dim or embed_dim % d_gate:
            valid = ", ".join(map(str, cls.valid_widths(cfg, embed_dim)))
            raise ConfigError(
                f"d_gate={d_gate} does not divide the feature dim {embed_dim} of {cfg.model} (valid: {valid})"
            )


def pfedmoap_logits(
    image: torch.Tensor,
    local_text: torch.Tensor,
    expert_text: torch.Tensor | None,
    gate: nn.Module | None,
    gamma: float,
    lam: float,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final logits = l_moe + lam * l_loc (SPEC §1); l_loc alone when there is no gate or no expert.

    image [B, D] and local_text [C, D] are L2-normalised; expert_text [K, C, D] are the frozen non-local
    experts (or None / K = 0 at a first participation). Returns (logits [B, C], weights [B, C, K+1] or None).
    """
    local_logits = gamma * image @ local_text.t()
    if gate is None or expert_text is None or expert_text.shape[0] == 0:
        return local_logits, None
    experts = torch.cat([local_text[None], expert_text.to(local_text.dtype)], dim=0)
    return gate(image, experts, gamma=gamma, local_logits=local_logits, lam=lam, need_weights=need_weights)


def mixture_scorer(
    local_text: torch.Tensor, expert_text: torch.Tensor | None, gate: nn.Module | None, gamma: float, lam: float
) -> Scorer:
    """A client's classifier with pFedMoAP's logits (:func:`pfedmoap_logits`; the local prompt's alone without a gate
    or experts), for :meth:`~pfedmoap.federated.client.Client.evaluate_with`."""

    def score(features: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return pfedmoap_logits(features, local_text, expert_text, gate, gamma, lam, need_weights)

    return score
