"""pFedMMA (Ghiasvand et al., ICLR'26, "Personalized Federated Fine-Tuning with Multi-Modal Adapters"): no prompt is
learned; small adapters sit inside the upper blocks of both CLIP towers, each made of a private down- and
up-projection per tower and one projection shared by the two towers of that block, which is all that travels.

For each adapted block j (the top two thirds of each tower: blocks 5-12 of ViT-B/16's 12, as its
``configs/trainers/pFedMMA/vit_b16.yaml``) and each tower, with x the block's input:

    y = alpha * W_u,j ReLU(W_s,j ReLU(W_d,j LN1(x)))          (biases included; alpha = ``pfedmma_scale`` = 0.001)
    out = h + MLP(LN2(h)) + y,   h = x + Attn(LN1(x))

W_d, W_u are the tower's own and private (text: W -> d -> W; image: W_v -> d -> W_v; d = ``pfedmma_dim`` = 32),
W_s,j [d, d] is shared by the text and image adapters of block j and FedAvg'd (weighted by train size) across
clients. The code's gradient-scale ops (``clip/gsl.py``) multiply the gradient by alpha at the adapter's input and by
1 / alpha after the alpha multiply, so the adapters' parameters get 1 / alpha times their plain gradient while the
gradient reaching x is the plain one (:class:`GradScale`). Weights start from ``kaiming_normal_(fan_out, relu)``,
biases from zero, the same on every client (from the run seed). The text input is the fixed "a photo of a
{class}."; the logits are CLIP's (the image's CLS feature through ``ln_post`` and ``proj``, the text's EOT feature),
the loss cross-entropy.

The towers are frozen below the first adapted block, so each image's token states entering it are computed once and
cached with the client's features (``image_features = "states"``), and each class's text states likewise; a step
runs only the adapted blocks (:mod:`pfedmoap.model.towers`). Published settings (``vit_b16.yaml``,
``scripts/base2new*.sh``): SGD lr 0.001 constant (``pfedmma_lr``, used for the adapters here), adapter dim 32,
random-resized-crop and flip, 10 clients, 50 rounds of 2 local epochs or 100 of 1, batch 16 or 32, 16 shots; the
other shared knobs are the run's. Per client per round at ViT-B/16: 8,448 values each way (8 blocks x (32 x 32 +
32)); 666,112 private. It uploads adapters, not prompts, so DP on prompt uploads is refused.

Where we follow the paper and not the released code: the code caches the text features at its first evaluation
and never resets them (``trainers/pFedMMA.py:173,206-211``), so every later evaluation uses the first-evaluated
client's text adapters. Here every client is evaluated with its own adapters (text and image) and the current
shared ones. The tiny models' towers are shallower than 12 blocks; ``pfedmma_blocks`` adapted blocks (default: two
thirds of the shallower tower, rounded up) are the top ones of each tower, block k of one paired with block k of the
other through W_s,k.
"""

from __future__ import annotations

import math
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
from ..model import towers
from ..model.model_configs import open_clip_config
from .base import ClientContext, EvalState, GlobalState, Method, Payload, Upload, check_named_tensors

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from ..federated.server import Server
    from ..model.clip import FrozenCLIP

BLOCKS = Setting(
    "pfedmma_blocks", 0, "adapted blocks at the top of each tower (0: two thirds of the shallower)", kind=int, low=0
)
DIM = Setting("pfedmma_dim", 32, "the adapters' bottleneck width", kind=int, low=1)
SCALE = Setting("pfedmma_scale", 0.001, "alpha, the adapters' output scale", low=0.0, strict=True)
LR = Setting("pfedmma_lr", 0.001, "SGD learning rate of the adapters", low=0.0, strict=True)

SHARED = "pfedmma.shared."  # wire names of the shared projections: "pfedmma.shared.0.weight", ...
PRIVATE = "pfedmma.private."  # Client.private names of the private projections: "pfedmma.private.text_down.0.weight"
TEMPLATE = "a photo of a {}."


class GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale`` (pFedMMA's gradient-scale op)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class MultiModalAdapters(nn.Module):
    """Every adapted block's private text and image projections and its shared projection."""

    def __init__(self, blocks: int, text_width: int, image_width: int, dim: int, alpha: float):
        super().__init__()
        self.alpha = alpha

        def stack(n_in: int, n_out: int) -> nn.ModuleList:
            return nn.ModuleList(nn.Linear(n_in, n_out) for _ in range(blocks))

        self.text_down, self.text_up = stack(text_width, dim), stack(dim, text_width)
        self.image_down, self.image_up = stack(image_width, dim), stack(dim, image_width)
        self.shared = stack(dim, dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @property
    def blocks(self) -> int:
        return len(self.shared)

    def adapter(self, tower: str, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Block k's adapter of ``tower`` ("text" or "image"): z = LN1(x) -> alpha W_u ReLU(W_s ReLU(W_d z))."""
        down = (self.text_down if tower == "text" else self.image_down)[k]
        up = (self.text_up if tower == "text" else self.image_up)[k]
        shared, alpha = self.shared[k], self.alpha

        def apply(z: torch.Tensor) -> torch.Tensor:
            z = GradScale.apply(z, alpha)  # the gradient into the adapter's input is alpha times its own ...
            y = alpha * up(F.relu(shared(F.relu(down(z)))))
            return GradScale.apply(y, 1.0 / alpha)  # ... and its parameters see 1 / alpha times theirs

        return apply

    def adapters(self, tower: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [self.adapter(tower, k) for k in range(self.blocks)]

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {SHARED + k: v.detach().cpu().float().clone() for k, v in self.shared.state_dict().items()}

    def private_state(self) -> dict[str, torch.Tensor]:
        return {
            PRIVATE + k: v.detach().cpu().float().clone()
            for k, v in self.state_dict().items()
            if not k.startswith("shared.")
        }

    def load(self, private: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor]) -> MultiModalAdapters:
        state = {k[len(PRIVATE) :]: v for k, v in private.items() if k.startswith(PRIVATE)}
        state.update({"shared." + k[len(SHARED) :]: v for k, v in shared.items()})
        self.load_state_dict({k: v.float() for k, v in state.items()})
        return self


def depths(clip: FrozenCLIP) -> tuple[int, int]:
    """(text blocks, image blocks) of ``clip``; refuses a tower that cannot be adapted."""
    return len(towers.text_blocks(clip)), len(towers.vision_blocks(clip))


def config_depths(cfg: Config) -> tuple[int, int]:
    """(text blocks, image blocks) of ``cfg.model`` from its open_clip config (the server builds the shared
    adapters without loading the model); a ConfigError line when its image tower is not a ViT."""
    config = open_clip_config(cfg.model) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    layers = vision.get("layers")
    if not isinstance(layers, int) or vision.get("timm_model_name") or "hf_model_name" in text:
        raise ConfigError(
            f"method=pfedmma puts adapters in the image tower's blocks, which needs a ViT, and model={cfg.model}'s "
            "is not one (e.g. --preset synthetic-vit, --model pfedmoap-tiny-vit, or ViT-B-16)"
        )
    return int(text.get("layers", 12)), layers


def adapted_blocks(cfg: Config) -> int:
    """How many top blocks of each tower carry adapters (``pfedmma_blocks``; 0: two thirds of the shallower)."""
    text, image = config_depths(cfg)
    wanted = BLOCKS.of(cfg)
    n = math.ceil(2 * min(text, image) / 3) if wanted == 0 else wanted
    if n > min(text, image):
        raise ConfigError(
            f"pfedmma_blocks={n} is more than model={cfg.model} has (text {text}, image {image} blocks; "
            f"valid: 1..{min(text, image)}, or 0 for two thirds)"
        )
    return n


def initial_shared(cfg: Config) -> dict[str, torch.Tensor]:
    """The shared projections' first weights, by wire name: from the run seed and their shapes alone, so the server
    (which loads no model) and every client derive the same ones."""
    n, dim = adapted_blocks(cfg), DIM.of(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        layers = [nn.Linear(dim, dim) for _ in range(n)]
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return {
        f"{SHARED}{k}.{name}": value.detach().float().clone()
        for k, layer in enumerate(layers)
        for name, value in layer.state_dict().items()
    }


class AdapterObjective(Objective):
    """Cross-entropy of CLIP's logits through the adapted blocks; trains every adapter (private and shared)."""

    prompt = None  # no prompt is learned

    def __init__(self, cfg: Config, clip: FrozenCLIP, encoder: PromptEncoder, adapters: MultiModalAdapters, text):
        self.cfg = cfg
        self.clip = clip
        self.encoder = encoder
        self.gamma = clip.gamma
        self.adapters = adapters.to(clip.device)
        self.text_states, self.eot, self.text_start, self.image_start = text

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.adapters.parameters()), "lr": LR.of(self.cfg)}]

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        clip, adapters = self.clip, self.adapters
        text = towers.text_from_states(clip, self.text_states, self.eot, self.text_start, adapters.adapters("text"))
        image = towers.vision_from_states(clip, states, self.image_start, adapters.adapters("image"))
        return self.gamma * image @ text.t()

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with nvtx_range("step.adapted_blocks"):
            return F.cross_entropy(self.logits(features), labels)

    def private_state(self) -> dict[str, torch.Tensor]:
        return self.adapters.private_state()


@register_method
class PFedMMA(Method):
    name = "pfedmma"
    help = "pFedMMA: adapters in both towers' upper blocks, private projections + one shared projection FedAvg'd"
    settings = (BLOCKS, DIM, SCALE, LR)
    image_features = "states"
    shares_prompt = False
    dp_refusal = "uploads its shared adapters, which DP on prompt uploads does not cover"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._initial: dict[str, torch.Tensor] | None = None
        self._text: dict[int, tuple] = {}  # per class set (its encoder's id): cached text states

    @classmethod
    def supports_dp(cls) -> bool:
        return False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        adapted_blocks(cfg)  # a ViT, and enough blocks

    @classmethod
    def states_block(cls, cfg: Config, clip: FrozenCLIP) -> int:
        if depths(clip) != config_depths(cfg):
            raise ConfigError(f"model={cfg.model}: its loaded towers' depths {depths(clip)} are not its config's")
        return depths(clip)[1] - adapted_blocks(cfg)

    def fresh(self, clip: FrozenCLIP) -> MultiModalAdapters:
        """The common initial adapters: private ones from the run seed (the same on every client), shared ones
        :func:`initial_shared`."""
        n = adapted_blocks(self.cfg)
        image_width = int(clip.model.visual.class_embedding.shape[-1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)  # another draw than the shared projections'
            module = MultiModalAdapters(n, clip.width, image_width, DIM.of(self.cfg), SCALE.of(self.cfg))
        return module.load(module.private_state(), self.initial_shared())

    def initial_shared(self) -> dict[str, torch.Tensor]:
        if self._initial is None:
            self._initial = initial_shared(self.cfg)
        return self._initial

    def text_for(self, clip: FrozenCLIP, encoder: PromptEncoder) -> tuple:
        """(text states entering the first adapted text block, EOT positions, text start, image start) for
        ``encoder``'s classes, computed once per class set."""
        key = id(encoder)
        if key not in self._text:
            n = adapted_blocks(self.cfg)
            text_depth, image_depth = depths(clip)
            sentences = [TEMPLATE.format(c.replace("_", " ")) for c in encoder.classnames]
            states, eot = towers.text_states(clip, sentences, text_depth - n)
            self._text[key] = (states, eot, text_depth - n, image_depth - n)
        return self._text[key]

    def client_adapters(
        self, clip: FrozenCLIP, client: Client, shared: Mapping[str, torch.Tensor]
    ) -> MultiModalAdapters:
        """``client``'s adapters: its private projections (the common initial ones before it trains) and ``shared``."""
        module = self.fresh(clip)
        private = {k: v for k, v in client.private.items() if k.startswith(PRIVATE)}
        return module.load(private or module.private_state(), shared)

    # ------------------------------------------------------------------------------------ server side
    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        return Payload(extras=self.eval_extras(server))

    def eval_extras(self, server: Server) -> dict[str, torch.Tensor]:
        return dict(server.extras or self.initial_shared())

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        return check_named_tensors(extras, self.initial_shared(), "shared adapters")

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        """FedAvg (weighted by train size) of the shared projections; nothing else is sent."""
        shared = {cid: up.extras for cid, up in uploads.items() if up.extras}
        if not shared:
            return
        names = sorted(next(iter(shared.values())))
        server.extras = {n: server.fedavg({cid: ex[n] for cid, ex in shared.items()}) for n in names}
        server.global_version += 1

    # ------------------------------------------------------------------------------------ client side
    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        clip = ctx.encoder.clip
        shared = payload.extras or dict(state.extras) or self.initial_shared()
        adapters = self.client_adapters(clip, client, shared)
        return AdapterObjective(self.cfg, clip, ctx.encoder, adapters, self.text_for(clip, ctx.encoder))

    def upload(self, client: Client, objective: Objective) -> Upload | None:
        assert isinstance(objective, AdapterObjective)
        return Upload(extras=objective.adapters.shared_state())

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        own = ("init",) if not any(k.startswith(PRIVATE) for k in client.private) else (client.cid, client.version)
        return EvalState(("pfedmma", state.global_version, *own), None, extras=dict(state.extras))

    def scorer(
        self,
        ctx: ClientContext,
        client: Client,
        view: EvalState,
        encoder: PromptEncoder,
        text: Callable[[tuple, torch.Tensor], torch.Tensor],
    ) -> Scorer:
        clip = encoder.clip
        adapters = self.client_adapters(clip, client, view.extras or self.initial_shared()).to(clip.device)
        text_states, eot, text_start, image_start = self.text_for(clip, encoder)
        found: list[torch.Tensor] = []
        gamma = ctx.gamma

        def score(features: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not found:  # on use (a prefetch pass asks every scorer and scores nothing)
                found.append(towers.text_from_states(clip, text_states, eot, text_start, adapters.adapters("text")))
            image = towers.vision_from_states(clip, features, image_start, adapters.adapters("image"))
            return gamma * image @ found[0].t(), None

        return score
