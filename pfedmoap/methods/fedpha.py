"""FedPHA (Fang et al., ICML'25, "FedPHA: Federated Prompt Learning for Heterogeneous Client Adaptation"): a global
prompt of a fixed length shared by all, and a private local prompt of each client's own length, kept apart by a
projection of the local prompt away from the global prompt's principal directions and an alignment term.

Client i holds the global prompt P_G [n_ctx, W] (downloaded as P_g, trained, uploaded, FedAvg'd weighted by train
size) and its local prompt P_L,i [L_i, W] (trained, never sent; L_i = ``fedpha_local_ctx``, the same as n_ctx by
default, or a list cycled over the clients: heterogeneous lengths in one federation). Each step:

- the thin SVD P_G = U S V^T (not detached), k = floor(n_ctx (1 - rho)) with rho = ``fedpha_rho`` = 0.8, V_2 = the
  right singular vectors after the first k, and the projected local prompt P^_L = P_L V_2 V_2^T;
- t_G, t_L and t_P^L, the normalised text features of P_G, P_L and P^_L for every class;
- the loss (``trainers/GL_SVDMSE.py:350-361``, all weights 1)

      L = CE(gamma f t_L^T) + CE(gamma f t_G^T) + MSE(t_L, t_P^L) + mean_c ReLU(alpha - ||t_L,c - t_G,c||_2)

  with alpha = ``fedpha_alpha`` = 1: the MSE keeps the local prompt's features where its projection puts them (away
  from the global prompt's top-k directions) and the hinge keeps every class's local feature at least alpha from its
  global one.

A client is evaluated with its local prompt alone (``GL_SVDMSE.py:259-281``); one that has not trained yet with the
common initial local prompt of its length. Only P_G travels: 8,192 values up and down per client per round at
ViT-B/16 (n_ctx 16, W 512), so DP on uploads covers everything sent. Published settings (used by its scripts, kept
here as documentation; the shared knobs are the run's): SGD lr 0.001 constant, batch 32, 1 local epoch, 50 rounds,
10 clients, n_ctx 16, 2 shots; lengths such as [16, 16, 16, 32, 32, 16] on Office and random 4..32 on CIFAR.

Where we follow the paper and not the released code: with heterogeneous lengths, the released ``GL_SVDMSE_HE.py``
takes every client's token positions from the longest prompt, so for a shorter prompt the feature is read past its
real end-of-text token (``GL_SVDMSE_HE.py:105-125,254-271``). Here each length has its own prompt encoder and every
class's feature is read at its own EOT. The projection is the released code's V_2 V_2^T of the thin SVD (the n_ctx - k
weaker directions inside P_G's row space; the complement I - V_1 V_1^T would also keep the rest of R^W); the paper's
method section was not available to us to say which it means.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..config.settings import Setting
from ..federated.client import Client, Objective, Scorer
from ..federated.prompt import PromptEncoder
from ..federated.registry import register_method
from .base import ClientContext, EvalState, GlobalState, Payload
from .global_local import GlobalLocalMethod, GlobalLocalObjective

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Config


def _check_lengths(value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"fedpha_local_ctx={value!r} must be a string: same, or lengths such as 8,16,32")
    if value == "same":
        return
    parts = value.split(",")
    if not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ConfigError(
            f"fedpha_local_ctx={value!r} is not 'same' or a comma-separated list of positive integers (e.g. 8,16,32)"
        )


RHO = Setting("fedpha_rho", 0.8, "share of the global prompt's length kept as projection directions", low=0.0, high=1.0)
ALPHA = Setting("fedpha_alpha", 1.0, "margin of the hinge between local and global text features", low=0.0)
LOCAL_CTX = Setting(
    "fedpha_local_ctx",
    "same",
    "local prompt lengths: same (n_ctx), or a comma-separated list cycled over the clients (e.g. 8,16,32)",
    kind=str,
    check=_check_lengths,
)


def local_lengths(cfg: Config) -> list[int] | None:
    """The cycled list of local prompt lengths, or None for "same" (n_ctx)."""
    value = LOCAL_CTX.of(cfg)
    return None if value == "same" else [int(p) for p in value.split(",")]


def projection_basis(global_prompt: torch.Tensor, rho: float) -> torch.Tensor:
    """V_2 [W, n - k]: the right singular vectors of the thin SVD of P_G [n, W] after the first k = floor(n (1 -
    rho)), differentiable (the SVD is not detached)."""
    n = global_prompt.shape[0]
    k = math.floor(n * (1.0 - rho) + 1e-9)
    _, _, vh = torch.linalg.svd(global_prompt, full_matrices=False)  # vh [n, W]
    return vh[k:].t()


def fedpha_loss(
    gamma: float,
    features: torch.Tensor,
    labels: torch.Tensor,
    global_text: torch.Tensor,
    local_text: torch.Tensor,
    projected_text: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """CE_L + CE_G + MSE(t_L, t_P^L) + mean_c ReLU(alpha - ||t_L,c - t_G,c||); text features [C, D] normalised."""
    ce_local = F.cross_entropy(gamma * features @ local_text.t(), labels)
    ce_global = F.cross_entropy(gamma * features @ global_text.t(), labels)
    mse = F.mse_loss(local_text, projected_text)
    hinge = F.relu(alpha - (local_text - global_text).norm(dim=-1)).mean()
    return ce_local + ce_global + mse + hinge


class ProjectionObjective(GlobalLocalObjective):
    """FedPHA's loss; trains the global prompt (``prompt``, uploaded) and the local one (``local_encoder``'s
    length)."""

    def __init__(
        self,
        cfg: Config,
        encoder: PromptEncoder,
        local_encoder: PromptEncoder,
        start_global: torch.Tensor,
        start_local: torch.Tensor,
    ) -> None:
        super().__init__(cfg, encoder, start_global, start_local)
        self.local_encoder = local_encoder
        self.rho, self.alpha = RHO.of(cfg), ALPHA.of(cfg)

    def projected(self) -> torch.Tensor:
        basis = projection_basis(self.prompt, self.rho)
        return self.local_prompt @ basis @ basis.t()

    @property
    def batchable(self) -> bool:
        return self.local_encoder is self.encoder  # one text pass for all three prompts needs one length

    def contexts(self) -> torch.Tensor:
        return torch.stack([self.prompt, self.local_prompt, self.projected()])

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.batchable:
            return super().loss(features, labels)
        with nvtx_range("step.text_encode"):
            global_text = self.encoder.encode(self.prompt)
            local_text, projected_text = self.local_encoder.encode(torch.stack([self.local_prompt, self.projected()]))
        with nvtx_range("step.gate"):
            return fedpha_loss(self.gamma, features, labels, global_text, local_text, projected_text, self.alpha)

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with nvtx_range("step.gate"):
            return fedpha_loss(self.gamma, features, labels, text[0], text[1], text[2], self.alpha)


@register_method
class FedPHA(GlobalLocalMethod):
    name = "fedpha"
    help = "FedPHA: FedAvg'd global prompt + private local prompt of each client's length, SVD projection + hinge"
    settings = (RHO, ALPHA, LOCAL_CTX)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._encoders: dict[tuple[int, int], PromptEncoder] = {}

    def local_length(self, client: Client) -> int:
        lengths = local_lengths(self.cfg)
        return self.cfg.n_ctx if lengths is None else lengths[client.cid % len(lengths)]

    def encoder_for(self, encoder: PromptEncoder, length: int) -> PromptEncoder:
        """A prompt encoder over ``encoder``'s classes for contexts of ``length`` (``encoder`` itself when it fits),
        built once: each length reads every class's feature at its own end-of-text token."""
        if length == encoder.n_ctx:
            return encoder
        key = (id(encoder), length)
        if key not in self._encoders:
            self._encoders[key] = PromptEncoder(
                encoder.clip, encoder.classnames, length, mode=encoder.mode, assemble=encoder.assemble_prompts
            )
        return self._encoders[key]

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        start = self.start_prompt(state, client, payload)
        local = self.local_prompt(client, start.shape[-1])
        local_encoder = self.encoder_for(ctx.encoder, self.local_length(client))
        return ProjectionObjective(self.cfg, ctx.encoder, local_encoder, start, local)

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        local = self.local_prompt(client, state.global_prompt.shape[-1]).float()
        return EvalState(("fedpha", *self.local_key(client)), local)

    def eval_needs_global(self, client: Client) -> bool:
        return False  # evaluated with its local prompt alone

    def scorer(
        self,
        ctx: ClientContext,
        client: Client,
        view: EvalState,
        encoder: PromptEncoder,
        text: Callable[[tuple, torch.Tensor], torch.Tensor],
    ) -> Scorer:
        gamma, prompt = ctx.gamma, view.prompt
        found: list[torch.Tensor] = []
        if prompt.shape[0] == encoder.n_ctx:
            found.append(text(view.key, prompt).t())
        own = self.encoder_for(encoder, prompt.shape[0])

        def score(features: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not found:  # another length: its own encoder (the shared text cache is for the run's n_ctx), on use
                found.append(own.encode(prompt.to(own.clip.device)).t())
            return gamma * features @ found[0], None

        return score
