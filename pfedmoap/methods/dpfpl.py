"""DP-FPL (Tran et al., ICLR'25, "Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large
Language Models"): a global prompt synchronised after every batch through clipped, noised gradients, and a private
local prompt trained through a low-rank factorisation plus a residual, with its own clipped, noised gradients.

Client i holds the global prompt p_G [n_ctx, W] (the server's; every client has the same) and its local prompt
p_L [n_ctx, W] (private, from N(0, 0.02^2), the same draw on every client). Before each forward (``factorize``):

    v0 ~ N(0, 1) [W, r];  u = GS(p_L v0) [n_ctx, r];  v = GS(p_L^T u)^T [r, W]  (GS: Gram-Schmidt on the columns)
    residual = p_L - u v    (no gradient)
    context  = p_G + u v + residual    (= p_G + p_L in value)

and the loss is CLIP's cross-entropy over the client's classes with that context. Per batch (one *exchange*: this
library's round driver runs ``exchanges_per_round`` of them per round, then evaluates):

1. each client computes its gradients on its next batch; the global prompt's, g_G, is clipped to norm
   ``dpfpl_clip`` = 10 and uploaded (n_ctx x W values, 8,192 at ViT-B/16, per client per batch);
2. the server averages the uploads, adds N(0, (s / N)^2) noise (N the clients averaged) and takes one SGD step with
   momentum on p_G (the clients download it for their next batch);
3. each client clips g_u = g_ctx v^T and g_v = u^T g_ctx to ``dpfpl_clip`` and adds N(0, s^2) noise to each; p_L's
   gradient is (g_u v + u g_v + u u^T g_u v) / 10 (``trainers/DP_FPL.py:68-76``), and p_L takes an SGD step with
   momentum whose state the client keeps across batches and rounds.

The noise level s = sqrt(T ln(1/delta)) / epsilon * clip / B, with T = the number of rounds, delta =
``dpfpl_delta`` = 1e-5, epsilon = ``dpfpl_epsilon`` and B the batch size, as the released code computes it
(``trainers/DP_FPL.py:252-262``; its accounting counts rounds although noise is added at every batch, and treats the
batch-mean gradient's clip as per-example: we reproduce the noise it adds, we do not certify its epsilon).
``dpfpl_epsilon`` = 0 (the default) is its non-private setting: no clipping and no noise, as in its code; the paper's
private settings are 0.1, 0.2 and 0.4. r = ``dpfpl_rank`` = 8.

A round is ``local_epochs`` x ceil(n_max / batch_size) exchanges, n_max the largest client's train set: one pass of
the largest client's data (the released code takes the last client's loader; its clients are equal). Each client
draws its batches from its own permutation and starts a new one when it runs out, so a smaller client cycles.
A client is evaluated with p_G + p_L (the server's p_G after the round's last exchange).

Published settings (kept here as documentation; the shared knobs are the run's, as for every method here): SGD lr
0.001 constant, momentum 0.9, weight decay 5e-4, batch 32, 100 rounds, 10 clients, n_ctx 16, full training sets,
seeds 1-3. Where we differ from the released code, as its paper describes the method: the server holds p_G and its
momentum (the code applies the averaged gradient on each client through one optimiser shared by all clients, so
momentum leaks between them); in the first round the code restarts every batch from the initial weights
(``federated_main.py:147-150``), we train through it; the code draws v0 from the global RNG, we from the client's
own generator. The released code's clipping of u and v discards nothing: u and v are re-derived from p_L before each
forward, so their own SGD updates in the code are overwritten; here they are never parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..config.settings import Setting
from ..federated.client import Client, Objective, Scorer
from ..federated.registry import register_method
from ..federated.seeding import Stream, counter_generator
from ..gates import mixture_scorer
from .base import ClientContext, EvalState, GlobalState, Payload, Upload
from .global_local import GlobalLocalMethod, GlobalLocalObjective

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from ..federated.server import Server

RANK = Setting("dpfpl_rank", 8, "rank r of the local prompt's factorisation u v", kind=int, low=1)
EPSILON = Setting("dpfpl_epsilon", 0.0, "privacy budget epsilon of DP-FPL's noise (0: no clipping, no noise)", low=0.0)
DELTA = Setting("dpfpl_delta", 1e-5, "delta of DP-FPL's noise level", low=0.0, high=1.0, strict=True)
CLIP = Setting("dpfpl_clip", 10.0, "norm the gradients are clipped to (with dpfpl_epsilon > 0)", low=0.0, strict=True)

GRAD = "dpfpl.grad"  # the upload: the clipped gradient of the global prompt
MOMENTUM = "dpfpl_momentum"  # in Client.private: the local prompt's SGD momentum
ORDER = "dpfpl_order"  # in Client.private: the client's current permutation of its train set
CURSOR = "dpfpl_cursor"  # in Client.private: where in it the next batch starts
SERVER_MOMENTUM = "dpfpl.momentum"  # in Server.extras: the global prompt's SGD momentum
LOCAL_GRAD_SCALE = 0.1  # the code divides g_u and g_v by 10 before forming p_L's gradient (DP_FPL.py:69-70)


def noise_std(cfg: Config) -> float:
    """s = sqrt(T ln(1/delta)) / epsilon * clip / B (0 without DP), the released code's noise level."""
    eps = EPSILON.of(cfg)
    if eps == 0:
        return 0.0
    return math.sqrt(cfg.rounds * math.log(1.0 / DELTA.of(cfg))) / eps * CLIP.of(cfg) / cfg.batch_size


def orthonormalize(matrix: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``matrix`` [n, r], each normalised and then removed from the columns after it
    (the released code's order); returns a new tensor."""
    cols = [c.clone() for c in matrix.t()]
    for i in range(len(cols)):
        cols[i] = cols[i] / cols[i].norm()
        for j in range(i + 1, len(cols)):
            cols[j] = cols[j] - (cols[i] * cols[j]).sum() * cols[i]
    return torch.stack(cols, dim=1)


def factorize(local: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(u [n, r], v [r, W], residual [n, W]) of ``local`` [n, W], v0 ~ N(0, 1) drawn from ``generator`` (on the CPU)."""
    with torch.no_grad():
        v0 = torch.randn(local.shape[1], rank, generator=generator).to(local)
        u = orthonormalize(local @ v0)
        v = orthonormalize(local.t() @ u).t()
        return u, v, local - u @ v


def clip_norm(grad: torch.Tensor, bound: float) -> torch.Tensor:
    """``grad`` scaled to norm ``bound`` when it is longer, else unchanged."""
    norm = grad.norm()
    return grad * (bound / norm) if norm > bound else grad


class _LowRankContext(torch.autograd.Function):
    """u v + residual (= p_L in value) whose backward gives p_L DP-FPL's gradient: from the context's gradient g,
    g_u = g v^T and g_v = u^T g, clipped and noised when ``clip`` is set, then (g_u v + u g_v + u u^T g_u v) / 10."""

    @staticmethod
    def forward(ctx, local, u, v, residual, noise_u, noise_v, clip):  # type: ignore[override]
        ctx.save_for_backward(u, v, noise_u, noise_v)
        ctx.clip = clip
        with torch.autocast(local.device.type, enabled=False):  # p_L's value in its own dtype (under --precision bf16)
            return u @ v + residual

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        u, v, noise_u, noise_v = ctx.saved_tensors
        grad = grad.to(u.dtype)  # the context's gradient may come back in the autocast dtype
        g_u, g_v = grad @ v.t(), u.t() @ grad
        if ctx.clip is not None:
            g_u = clip_norm(g_u, ctx.clip) + noise_u
            g_v = clip_norm(g_v, ctx.clip) + noise_v
        g_u, g_v = g_u * LOCAL_GRAD_SCALE, g_v * LOCAL_GRAD_SCALE
        g_u_v = g_u @ v
        return g_u_v + u @ g_v + u @ (u.t() @ g_u_v), None, None, None, None, None, None


def local_prompt_gradient(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p_L's gradient without DP from the context's gradient ``grad`` (the statement the autograd function follows)."""
    g_u, g_v = grad @ v.t() * LOCAL_GRAD_SCALE, u.t() @ grad * LOCAL_GRAD_SCALE
    return g_u @ v + u @ g_v + u @ u.t() @ g_u @ v


class DPFPLObjective(GlobalLocalObjective):
    """One batch of DP-FPL on one client: the context p_G + u v + residual, CLIP's cross-entropy; the optimiser steps
    p_L only (p_G's gradient is uploaded), with the momentum the client kept from its last batch."""

    def __init__(
        self,
        cfg: Config,
        encoder: PromptEncoder,
        start_global: torch.Tensor,
        start_local: torch.Tensor,
        client: Client,
        batch: torch.Tensor,
        order: torch.Tensor,
        cursor: int,
    ) -> None:
        super().__init__(cfg, encoder, start_global, start_local)
        self.client = client
        self.batch = batch  # this exchange's train indices
        self.order, self.cursor = order, cursor  # the client's permutation, and where its next batch starts
        self.rank = RANK.of(cfg)
        self.std = noise_std(cfg)
        self.clip = CLIP.of(cfg) if self.std > 0 else None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def batchable(self) -> bool:
        return False  # its own batch and optimiser state: one client at a time

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.local_prompt], "lr": self.cfg.lr_prompt}]

    def batches(self, client: Any, settings: Any) -> Iterator[torch.Tensor]:
        return iter([self.batch])

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        kept = self.client.private.get(MOMENTUM)
        if kept is not None:
            optimizer.state[self.local_prompt]["momentum_buffer"] = kept.to(self.local_prompt).clone()

    def context(self) -> torch.Tensor:
        """p_G + u v + residual [n_ctx, W], u and v drawn afresh (and the local noise, with DP)."""
        u, v, residual = factorize(self.local_prompt.detach(), self.rank, self.client.generator)
        noise_u = noise_v = None
        if self.clip is not None:
            gen = self.client.generator
            noise_u = (torch.randn(u.shape, generator=gen) * self.std).to(u)
            noise_v = (torch.randn(v.shape, generator=gen) * self.std).to(v)
        local = _LowRankContext.apply(self.local_prompt, u, v, residual, noise_u, noise_v, self.clip)
        return self.prompt + local

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.prompt.grad = None  # p_G is not the optimiser's: its gradient is this batch's alone
        with nvtx_range("step.text_encode"):
            text = self.encoder.encode(self.context()[None])[0]
        with nvtx_range("step.gate"):
            return F.cross_entropy(self.gamma * features @ text.t(), labels)

    def global_gradient(self) -> torch.Tensor:
        """The upload: p_G's gradient of the batch, clipped with DP."""
        grad = self.prompt.grad if self.prompt.grad is not None else torch.zeros_like(self.prompt)
        return clip_norm(grad.detach(), self.clip) if self.clip is not None else grad.detach()

    def private_state(self) -> dict[str, torch.Tensor]:
        state = {**super().private_state(), ORDER: self.order, CURSOR: torch.tensor(self.cursor)}
        buf = None if self.optimizer is None else self.optimizer.state[self.local_prompt].get("momentum_buffer")
        if buf is not None:
            state[MOMENTUM] = buf.detach()
        return state


@register_method
class DPFPL(GlobalLocalMethod):
    name = "dpfpl"
    help = "DP-FPL: global prompt synchronised every batch by clipped, noised gradients + private low-rank local prompt"
    settings = (RANK, EPSILON, DELTA, CLIP)
    dp_refusal = "adds its own noise (--dpfpl-epsilon)"
    shares_prompt = False  # it uploads gradients, not prompts

    @classmethod
    def supports_dp(cls) -> bool:
        return False  # the run's upload DP would noise the gradient twice: DP-FPL's own noise is dpfpl_epsilon

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if RANK.of(cfg) > cfg.n_ctx:
            raise ConfigError(f"dpfpl_rank={RANK.of(cfg)} must be at most n_ctx={cfg.n_ctx} (u is n_ctx x rank)")

    # ------------------------------------------------------------------------------------ server side
    def exchanges_per_round(self, server: Server) -> int:
        largest = max(int(n) for n in server.train_sizes)
        return self.cfg.local_epochs * max(1, math.ceil(largest / self.cfg.batch_size))

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        if set(extras) != {GRAD}:
            return f"tensors {sorted(extras)} are not DP-FPL's upload ['{GRAD}']"
        grad = extras[GRAD]
        if grad.dim() != 2 or grad.shape[0] != self.cfg.n_ctx:
            return f"{GRAD} has shape {tuple(grad.shape)}, not (n_ctx={self.cfg.n_ctx}, width)"
        if not grad.is_floating_point() or not bool(torch.isfinite(grad).all()):
            return f"{GRAD} is not finite floating point"
        return None

    def check_download_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        if extras:
            return f"unexpected tensors {', '.join(sorted(extras))} (DP-FPL sends only the global prompt)"
        return None

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        """The mean of the accepted gradients plus N(0, (s / N)^2), then one SGD step with momentum on p_G."""
        if not uploads:
            return
        ids = sorted(uploads)
        grad = torch.stack([uploads[i].extras[GRAD].double() for i in ids]).mean(0).float()
        std = noise_std(self.cfg)
        if std > 0:
            gen = counter_generator(self.cfg.seed, Stream.SERVER_NOISE, server.global_version)
            grad = grad + torch.randn(grad.shape, generator=gen) * (std / len(ids))
        prompt = server.global_prompt.float()
        step = grad + self.cfg.weight_decay * prompt  # torch SGD: weight decay, then momentum
        kept = server.extras.get(SERVER_MOMENTUM)
        buf = step.clone() if kept is None else self.cfg.momentum * kept + step
        server.global_prompt = prompt - self.cfg.lr_prompt * buf
        server.extras = {**server.extras, SERVER_MOMENTUM: buf}
        server.global_version += 1

    # ------------------------------------------------------------------------------------ client side
    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        order, cursor = client.private.get(ORDER), int(client.private.get(CURSOR, torch.tensor(0)))
        n = client.data.num_train
        if order is None or cursor >= n:  # a new pass over the client's data, in its own order
            order, cursor = torch.randperm(n, generator=client.generator), 0
        batch = order[cursor : cursor + self.cfg.batch_size]
        start = self.start_prompt(state, client, payload)
        local = self.local_prompt(client, start.shape[-1])
        return DPFPLObjective(self.cfg, ctx.encoder, start, local, client, batch, order, cursor + len(batch))

    def upload(self, client: Client, objective: Objective) -> Upload | None:
        return Upload(None, {GRAD: cast(DPFPLObjective, objective).global_gradient()})

    def global_scorer(
        self, ctx: ClientContext, state: GlobalState, text: Callable[[tuple, torch.Tensor], torch.Tensor]
    ) -> Scorer | None:
        """The server's p_G as a plain prompt (it shares gradients, not prompts, but p_G is its global model)."""
        return mixture_scorer(text(("global", state.global_version), state.global_prompt), None, None, ctx.gamma, 0.0)

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        local = self.local_prompt(client, state.global_prompt.shape[-1])
        context = state.global_prompt.float() + local.float()
        return EvalState((self.name, state.global_version, *self.local_key(client)), context)
