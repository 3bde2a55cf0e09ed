"""PromptFolio (Pan, Huang, Shi, NeurIPS'24, "Federated Learning from Vision-Language Foundation Models: Theoretical
Analysis and Method"): a global prompt and a local prompt whose text features are mixed with a fixed weight, like a
portfolio of a shared and a personal asset.

Client i holds the global prompt (downloaded as P_g, trained, uploaded, FedAvg'd weighted by train size) and its own
local prompt (trained, never sent), both [n_ctx, W] and from N(0, 0.02^2). For class c, with t_G,c and t_L,c the
L2-normalised text features of the two prompts,

    t_c = (1 - theta) t_G,c + theta t_L,c        (not re-normalised)
    logit_c = gamma <f_img, t_c>

and the loss is plain cross-entropy. theta = ``promptfolio_theta`` = 0.4, the released code's ``--frac_p`` default
(``federated_main.py:399``); the paper derives an optimal mixing weight from its portfolio analysis, the code uses
the fixed flag. Its other published settings (``vit_b16.yaml``, README): lr 0.002, 5 local epochs, batch 16, n_ctx
8, 10 clients (Dirichlet beta 0.3), 10 rounds, 16 shots; the shared knobs (``--lr-prompt``, ``--local-epochs``,
``--n-ctx``, ...) are the run's, as for every method here. A client is evaluated with the server's current global
prompt and its own local prompt (the model PromptFolio reports).

Where we differ from the released code: its Dirichlet split pools each dataset's train and test images, trains a
client on ``num_shots`` items of its pool and tests it on the whole pool, so a client's training images are in its
own test set (``Dassl/dassl/data/datasets/base_dataset.py:526,583,588``). Here clients are tested on held-out
images only, as the paper's evaluation intends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..base.tracing import nvtx_range
from ..config.settings import Setting
from ..federated.client import Client, Scorer
from ..federated.registry import register_method
from ..gates import mixture_scorer
from .base import ClientContext, EvalState
from .global_local import GlobalLocalMethod, GlobalLocalObjective

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..federated.prompt import PromptEncoder

THETA = Setting("promptfolio_theta", 0.4, "weight of the local prompt's text features in the mix", low=0.0, high=1.0)


def mixed_text(global_text: torch.Tensor, local_text: torch.Tensor, theta: float) -> torch.Tensor:
    """PromptFolio's class text features: (1 - theta) t_G + theta t_L, both [..., C, D] normalised; not
    re-normalised."""
    return (1.0 - theta) * global_text + theta * local_text


class PortfolioObjective(GlobalLocalObjective):
    """Cross-entropy of gamma <f, (1 - theta) t_G + theta t_L>; trains the global prompt (``prompt``, uploaded) and
    the local one."""

    @property
    def graphable(self) -> bool:
        return True  # fixed shapes, no host sync

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with nvtx_range("step.gate"):
            theta = THETA.of(self.cfg)
            return F.cross_entropy(self.gamma * features @ mixed_text(text[0], text[1], theta).t(), labels)

    def vector_state(self) -> dict[str, torch.Tensor] | None:
        return {}  # the loss reads nothing of the client's but the text: lock-step clients share one call

    def vector_loss(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return self.loss_from_text(features, labels, text)


@register_method
class PromptFolio(GlobalLocalMethod):
    name = "promptfolio"
    help = "PromptFolio: FedAvg'd global + private local prompt, text features mixed with a fixed weight theta"
    settings = (THETA,)
    objective_class = PortfolioObjective

    def scorer(
        self,
        ctx: ClientContext,
        client: Client,
        view: EvalState,
        encoder: PromptEncoder,
        text: Callable[[tuple, torch.Tensor], torch.Tensor],
    ) -> Scorer:
        both = text(view.key, view.prompt)  # [2, C, D]
        return mixture_scorer(mixed_text(both[0], both[1], THETA.of(self.cfg)), None, None, ctx.gamma, 0.0)
