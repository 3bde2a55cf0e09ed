"""FedPGP (Cui et al., ICML'24, "Harmonizing Generalization and Personalization in Federated Prompt Learning"):
a personalised prompt made of the shared global prompt plus a private low-rank part, kept near the hand-written
prompt by a contrastive term.

Client i's context is ``sigma + U_i V_i``: sigma [n_ctx, W] is the global prompt (downloaded as P_g, trained,
uploaded, averaged by the server weighted by train size); U_i [n_ctx, r] and V_i [r, W] stay on the client
(r = ``fedpgp_bottleneck``, 4 by default). The logits are CoOp's, with the personalised prompt's text features.
The loss adds ``fedpgp_mu`` (0.5) times a contrastive term over the three text features of every class c:

    L_con = mean_c CE([cos(t0_c, ts_c), cos(ts_c, t_c)] / tau, target 0)

with t0 the hand-written prompt "a photo of a {class}." (frozen), ts the global prompt's and t the personalised
prompt's features, tau = ``fedpgp_temperature`` (0.5). It pulls the global prompt towards the hand-written one
(keeping what CLIP knows, for generalisation) and pushes it away from the personalised one (leaving the
personal part something of its own to learn). FedPGP's figure names the anchor "a photo of a <class>"; its
released code embeds a placeholder context ("X X ... X <class>.") instead; we follow the paper.

U and V start from N(0, 0.02^2), the same on every client (drawn once from the run seed). A client is evaluated
with the server's current global prompt plus its own U V (FedPGP's personal model); a client that has not
trained yet with the initial U V. Only sigma travels, so DP on uploads covers everything sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..config.settings import Setting
from ..federated.client import Client, Objective
from ..federated.registry import register_method
from ..federated.seeding import Stream, init_generator
from .base import ClientContext, EvalState, GlobalState, Method, Payload

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder


BOTTLENECK = Setting("fedpgp_bottleneck", 4, "rank r of the client's low-rank prompt part U V", kind=int, low=1)
MU = Setting("fedpgp_mu", 0.5, "weight of the contrastive term", low=0.0)
TEMPERATURE = Setting("fedpgp_temperature", 0.5, "temperature of the contrastive term", low=0.0, strict=True)


def contrastive_term(anchor: torch.Tensor, global_text: torch.Tensor, personal_text: torch.Tensor, tau: float):
    """FedPGP's L_con over classes: positive pair (hand-written, global), negative pair (global, personalised);
    all [C, D] and L2-normalised."""
    positive = (anchor * global_text).sum(-1)
    negative = (global_text * personal_text).sum(-1)
    logits = torch.stack([positive, negative], dim=-1) / tau  # [C, 2]
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class LowRankObjective(Objective):
    """CE of the personalised prompt's logits + mu * L_con; trains sigma (``prompt``, uploaded), U and V."""

    def __init__(self, cfg: Config, encoder: PromptEncoder, sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
        device = encoder.clip.device
        self.cfg = cfg
        self.encoder = encoder
        self.gamma = encoder.clip.gamma
        self.prompt = nn.Parameter(sigma.detach().to(device, torch.float32).clone())
        self.u = nn.Parameter(u.detach().to(device, torch.float32).clone())
        self.v = nn.Parameter(v.detach().to(device, torch.float32).clone())
        self.anchor = encoder.zero_shot()

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.prompt, self.u, self.v], "lr": self.cfg.lr_prompt}]

    @property
    def graphable(self) -> bool:
        return True  # fixed shapes, no host sync (the contrastive term's labels are a fill)

    def contexts(self) -> torch.Tensor:
        return torch.stack([self.prompt + self.u @ self.v, self.prompt])  # personalised and global: one pass

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        personal, global_text = text
        with nvtx_range("step.gate"):
            ce = F.cross_entropy(self.gamma * features @ personal.t(), labels)
            mu = MU.of(cfg)
            if mu <= 0:
                return ce
            con = contrastive_term(self.anchor, global_text, personal, TEMPERATURE.of(cfg))
            return ce + mu * con

    def private_state(self) -> dict[str, torch.Tensor]:
        return {"u": self.u.detach(), "v": self.v.detach()}


@register_method
class FedPGP(Method):
    name = "fedpgp"
    help = "FedPGP: FedAvg'd global prompt + a private low-rank part, with a contrastive term to the hand prompt"
    settings = (BOTTLENECK, MU, TEMPERATURE)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._initial: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        rank = BOTTLENECK.of(cfg)
        if rank > cfg.n_ctx:  # U [n_ctx, r] @ V [r, W] has rank n_ctx at most
            raise ConfigError(
                f"fedpgp_bottleneck={rank} is above n_ctx={cfg.n_ctx}: the low-rank part's rank "
                f"cannot exceed the prompt's length (valid: 1..{cfg.n_ctx})"
            )

    def initial_factors(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The common initial U [n_ctx, r] and V [r, W] (from the run seed, their own stream)."""
        if self._initial is None or self._initial[1].shape[-1] != width:
            cfg, gen = self.cfg, init_generator(self.cfg.seed, Stream.LOW_RANK)
            rank = BOTTLENECK.of(cfg)
            u = torch.randn(cfg.n_ctx, rank, generator=gen) * cfg.ctx_init_std
            v = torch.randn(rank, width, generator=gen) * cfg.ctx_init_std
            self._initial = (u, v)
        return self._initial

    def factors(self, client: Client, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "u" in client.private:
            return client.private["u"], client.private["v"]
        return self.initial_factors(width)

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        sigma = self.start_prompt(state, client, payload)
        u, v = self.factors(client, sigma.shape[-1])
        return LowRankObjective(self.cfg, ctx.encoder, sigma, u, v)

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        u, v = self.factors(client, state.global_prompt.shape[-1])
        own = ("init",) if "u" not in client.private else (client.cid, client.version)
        personal = state.global_prompt.float() + u.float() @ v.float()
        return EvalState(("fedpgp", state.global_version, *own), personal)
