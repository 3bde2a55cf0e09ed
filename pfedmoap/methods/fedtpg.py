"""FedTPG (Qiu, Li et al., ICLR'24, "Text-driven Prompt Generation for Vision-Language Models in Federated
Learning"): one prompt generator shared by all clients (FedAvg'd, nothing private) that writes the prompt context
from the class names of whatever classifier it serves, so it carries over to classes and datasets never trained on.

The generator ("PromptTranslator", ``model/prompt_net.py:130-171``): learnable queries Q [n_ctx, W] (n_ctx = 4 in the
paper, N(0, 0.02^2)); T [C, D] the normalised CLIP text features of the bare class names of the classifier;

    A = MHA(LN(Q), LN(T), LN(T))            (4 heads, no residual)
    P = FF(LN(A)) + A,  FF = Linear(W -> 8W), GEGLU (-> 4W), Linear(4W -> W)

and class c's prompt is [SOS] P "classname." [EOS] for every class: one context per class set. The image path is
plain CLIP; the loss is cross-entropy. Q is this library's prompt (the server's P_g, P_g^0 its initial value: the
same N(0, 0.02^2) draw every method starts from); the other weights travel as extras, ``tpg.<name>``, from one
initial state drawn from the run seed. The server averages the accepted clients' generators, Q included, unweighted
(``federated/server.py:144-161``). Every client is evaluated with the global generator, on its own classes, and on
the base and novel classes with the contexts it writes for them. At ViT-B/16 (W = D = 512) the generator is
4,206,080 values, sent down and up per client per round. It uploads more than a prompt, so DP on uploads (which
covers prompts) is refused.

Published settings (``config/defaults.py:71-82``, kept here as documentation; the shared knobs are the run's): SGD lr
0.003, momentum 0.9, weight decay 1e-5, cosine over 500 rounds, batch 200, one pass per round, 8 shots, 20 classes
per client (30 clients over 9 datasets), no augmentation, ViT-B/16.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..config.settings import Setting
from ..federated.client import Client, Objective, Scorer
from ..federated.registry import register_method
from ..gates import mixture_scorer
from ..model.model_configs import open_clip_config, text_width
from .base import ClientContext, EvalState, GlobalState, Method, Payload, Upload, check_named_tensors

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from ..federated.server import Server

PREFIX = "tpg."  # wire names of the generator's weights besides Q
HEADS = Setting("fedtpg_heads", 4, "attention heads of the prompt generator's cross-attention", kind=int, low=1)


class PromptTranslator(nn.Module):
    """FedTPG's generator without its queries: (Q [n, W], class text features T [C, D]) -> the context [n, W]."""

    def __init__(self, width: int, dim: int, heads: int, mult: int = 4):
        super().__init__()
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(width, heads, kdim=dim, vdim=dim, batch_first=True)
        self.ln_ff = nn.LayerNorm(width)
        self.ff_in = nn.Linear(width, 2 * mult * width)  # GEGLU: half values, half gates
        self.ff_out = nn.Linear(mult * width, width)

    def forward(self, queries: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(text)[None]
        attended = self.attn(self.ln_q(queries)[None], kv, kv, need_weights=False)[0][0]  # no residual
        value, gate = self.ff_in(self.ln_ff(attended)).chunk(2, dim=-1)
        return self.ff_out(value * F.gelu(gate)) + attended


def model_dims(cfg: Config) -> tuple[int, int]:
    """(W, D) of ``cfg.model``: its text tower's width and its joint embedding's size, from its open_clip config
    (the server builds the generator without loading the model)."""
    config = open_clip_config(cfg.model)
    if config is None or "embed_dim" not in config:
        raise ConfigError(f"method=fedtpg needs an open_clip model config for model={cfg.model!r} (its widths)")
    return text_width(config), int(config["embed_dim"])


def class_text(encoder: PromptEncoder) -> torch.Tensor:
    """T: the normalised CLIP text features of ``encoder``'s bare class names [C, D] (no grad)."""
    clip = encoder.clip
    return clip.encode_text_tokens(clip.tokenize([name.replace("_", " ") for name in encoder.classnames]))


class GeneratorObjective(Objective):
    """Cross-entropy with the generated context; trains Q (``prompt``, uploaded) and the generator's weights."""

    def __init__(self, cfg: Config, encoder: PromptEncoder, generator: PromptTranslator, queries: torch.Tensor) -> None:
        device = encoder.clip.device
        self.cfg = cfg
        self.encoder = encoder
        self.gamma = encoder.clip.gamma
        self.generator = generator.to(device)
        self.prompt = nn.Parameter(queries.detach().to(device, torch.float32).clone())
        self.text = class_text(encoder)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.prompt, *self.generator.parameters()], "lr": self.cfg.lr_prompt}]

    def contexts(self) -> torch.Tensor:
        return self.generator(self.prompt, self.text)[None]

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with nvtx_range("step.gate"):
            return F.cross_entropy(self.gamma * features @ text[0].t(), labels)


@register_method
class FedTPG(Method):
    name = "fedtpg"
    help = "FedTPG: one FedAvg'd prompt generator writing the context from the classifier's class names"
    settings = (HEADS,)
    dp_refusal = "uploads its prompt generator's weights, which DP on prompt uploads does not cover"

    @classmethod
    def supports_dp(cls) -> bool:
        return False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.ctx_init is not None:
            raise ConfigError("ctx_init is for a learned context; method=fedtpg generates its context (drop ctx_init)")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.width, self.dim = model_dims(cfg)
        # the generator's first weights (besides Q), by wire name: from the run seed, the same on every engine
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = self.generator()
        self.initial = {PREFIX + k: v.detach().float().clone() for k, v in module.state_dict().items()}

    def generator(self, weights: Mapping[str, torch.Tensor] | None = None) -> PromptTranslator:
        """A generator of this run's shape, with ``weights`` (by wire name) when given."""
        module = PromptTranslator(self.width, self.dim, HEADS.of(self.cfg))
        if weights is not None:
            module.load_state_dict({k[len(PREFIX) :]: v.float() for k, v in weights.items()})
        return module

    # ------------------------------------------------------------------------------------ server side
    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        return Payload(global_prompt=server.global_prompt, extras=self.eval_extras(server))

    def eval_extras(self, server: Server) -> dict[str, torch.Tensor]:
        return dict(server.extras or self.initial)

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        return check_named_tensors(extras, self.initial, "prompt generator's")

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        """The unweighted mean of the accepted clients' generators, Q included (FedTPG's server)."""
        if not uploads:
            return
        ids = sorted(uploads)
        server.global_prompt = torch.stack([uploads[i].prompt.double() for i in ids]).mean(0).float()
        names = sorted(uploads[ids[0]].extras)
        server.extras = {n: torch.stack([uploads[i].extras[n].double() for i in ids]).mean(0).float() for n in names}
        server.global_version += 1

    # ------------------------------------------------------------------------------------ client side
    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        weights = payload.extras or state.extras or self.initial
        queries = self.start_prompt(state, client, payload)
        return GeneratorObjective(self.cfg, ctx.encoder, self.generator(weights), queries)

    def upload(self, client: Client, objective: Objective) -> Upload | None:
        assert isinstance(objective, GeneratorObjective)
        state = objective.generator.state_dict()
        extras = {PREFIX + k: v.detach().cpu().float().clone() for k, v in state.items()}
        return Upload(prompt=objective.prompt.detach(), extras=extras)

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        return EvalState(("fedtpg", state.global_version), state.global_prompt, extras=dict(state.extras))

    def global_scorer(
        self, ctx: ClientContext, state: GlobalState, text: Callable[[tuple, torch.Tensor], torch.Tensor]
    ) -> Scorer | None:
        """None: every client is evaluated with the global generator already (its P_g alone is no classifier)."""
        return None

    def scorer(
        self,
        ctx: ClientContext,
        client: Client,
        view: EvalState,
        encoder: PromptEncoder,
        text: Callable[[tuple, torch.Tensor], torch.Tensor],
    ) -> Scorer:
        module = self.generator(view.extras or self.initial).to(encoder.clip.device)
        with torch.no_grad():
            context = module(view.prompt.to(encoder.clip.device, torch.float32), class_text(encoder))
        # CLIP's logits with the generated context's text (the text source's cache is per class set already)
        return mixture_scorer(text(view.key, context), None, None, ctx.gamma, 0.0)
