"""What a federated prompt-learning method is: everything that differs between methods, in one class.

A method says, on the server side, what each sampled client downloads (:meth:`Method.payload`) and how the
round's accepted uploads are aggregated (:meth:`Method.aggregate`); on the client side, where the local prompt
starts (:meth:`Method.start_prompt`), what the local update optimises (:meth:`Method.objective`: parameter
groups with their learning rates and the loss of a batch), what goes back (:meth:`Method.upload`) and which
state a client is evaluated with (:meth:`Method.eval_state`). Its traits (``trains``, ``uploads``,
``uses_gate``) and its config rules (:meth:`Method.check_config`) live on the class too. The round driver, the
local training loop, accounting and evaluation are shared by all methods.

A new method is one file: a subclass decorated with :func:`~pfedmoap.federated.registry.register_method`, imported in
``pfedmoap/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..federated.client import Client, Objective, Scorer
from ..gates import mixture_scorer
from ..gates.base import LAM

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from ..federated.server import Server


class GlobalState(Protocol):
    """The server-held state a client side may read: the common init P_g^0, the global prompt and its version, and
    a method's other global tensors (``extras``, by wire name; what :meth:`Method.eval_extras` sends a Flower node
    for evaluation).

    The in-process :class:`~pfedmoap.federated.server.Server` is one; a Flower node builds one from its messages.
    """

    init_prompt: torch.Tensor
    global_prompt: torch.Tensor
    global_version: int
    extras: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientContext:
    """What a method's client side may use of the run (:meth:`Method.objective`, :meth:`Method.scorer`): the
    prompt encoder over the run's classes, CLIP's logit scale gamma, the device, and a fresh gate of the run's kind
    (with the run's fused ops). The engines' :class:`~pfedmoap.engine.runtime.ClientRuntime` builds it once per run."""

    encoder: PromptEncoder
    gamma: float
    device: torch.device
    make_gate: Callable[[], nn.Module]


@dataclass
class Payload:
    """What the server sends one client in one round (``None`` / empty = not sent). ``extras`` are a method's
    other named tensors (e.g. a shared gate's weights)."""

    global_prompt: torch.Tensor | None = None
    expert_ids: list[int] = field(default_factory=list)
    expert_prompts: torch.Tensor | None = None  # [K, n_ctx, W]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor sent, by its wire name."""
        named = {"global-prompt": self.global_prompt, "expert-prompts": self.expert_prompts}
        return {**{k: v for k, v in named.items() if v is not None}, **self.extras}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor]) -> Payload:
        """The same payload carrying ``tensors`` (by wire name) instead, e.g. after a cast for the wire."""
        extras = {k: v for k, v in tensors.items() if k not in ("global-prompt", "expert-prompts")}
        return Payload(tensors.get("global-prompt"), list(self.expert_ids), tensors.get("expert-prompts"), extras)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Payload:
        """The same payload with ``fn`` applied to every tensor (the wire cast, and back to float32 on receipt)."""
        return self.with_tensors({k: fn(t) for k, t in self.tensors().items()})


@dataclass
class Upload:
    """What a client sends back: its prompt (for the pool) and a method's other named tensors."""

    prompt: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor sent, by its wire name."""
        return {**({"prompt": self.prompt} if self.prompt is not None else {}), **self.extras}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Upload:
        return cls(tensors.get("prompt"), {k: v for k, v in tensors.items() if k != "prompt"})

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Upload:
        """The same upload with ``fn`` applied to every tensor."""
        return Upload.from_tensors({k: fn(t) for k, t in self.tensors().items()})


@dataclass
class EvalState:
    """The state a client is evaluated with. ``key`` identifies it: equal keys give equal accuracy."""

    key: tuple
    prompt: torch.Tensor | None  # None: use the handcrafted zero-shot text features
    expert_prompts: torch.Tensor | None = None
    use_gate: bool = False
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # a method's other global tensors it reads


def check_named_tensors(
    extras: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], what: str
) -> str | None:
    """Why ``extras`` are not exactly ``reference``'s names with their shapes, finite and floating point (an upload's
    or a download's extra tensors, e.g. a shared gate's, checked against the run's own), or None. ``what`` names
    them in the message ("this run's {what}")."""
    if set(extras) != set(reference):
        return f"tensors {sorted(extras)} are not this run's {what} {sorted(reference)}"
    for name, tensor in extras.items():
        if tuple(tensor.shape) != tuple(reference[name].shape):
            return f"{name} has shape {tuple(tensor.shape)}, not {tuple(reference[name].shape)}"
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            return f"{name} is not finite floating point"
    return None


class PromptObjective(Objective):
    """CoOp's objective: cross-entropy of gamma * <i_b, t_c(ctx)> over all classes; trains the context only,
    starting from a float32 copy of ``start_prompt`` on the encoder's device, with learning rate ``lr_prompt``."""

    def __init__(self, encoder: PromptEncoder, start_prompt: torch.Tensor, lr_prompt: float):
        self.encoder = encoder
        self.gamma = encoder.clip.gamma
        self.lr_prompt = lr_prompt
        self.prompt = nn.Parameter(start_prompt.detach().to(encoder.clip.device, torch.float32).clone())

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.prompt], "lr": self.lr_prompt}]

    @property
    def graphable(self) -> bool:
        return True  # the text pass, the gate and the loss have fixed shapes and never sync

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.gamma * features @ text.t()

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the cross-entropy (a regulariser), or None."""
        return None

    def contexts(self) -> torch.Tensor:
        return self.prompt[None]

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with nvtx_range("step.gate"):
            loss = F.cross_entropy(self.logits(features, text[0]), labels)
            extra = self.extra_loss()
            return loss if extra is None else loss + extra

    def vector_state(self) -> dict[str, torch.Tensor] | None:
        # CoOp's loss reads nothing of the client's but the text; a subclass with its own logits or extra term
        # must say what it reads
        plain = type(self).logits is PromptObjective.logits and type(self).extra_loss is PromptObjective.extra_loss
        return {} if plain else None

    def vector_loss(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        return F.cross_entropy(self.gamma * features @ text[0].t(), labels)


class Method:
    """Base: a prompt-only method that trains CoOp's objective from P_g and uploads its prompt (FedAvg'd)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # one line for the CLI's --method help
    trains: ClassVar[bool] = True  # False: no client is sampled; the run is one evaluation (round 0)
    uploads: ClassVar[bool] = True  # whether clients send anything back (and so whether DP applies)
    uses_gate: ClassVar[bool] = False  # whether clients hold a gate (its d_gate must fit the model)
    dp_refusal: ClassVar[str] = "uploads nothing"  # why DP cannot apply, when it cannot
    # what its logits read: "pooled" [n, D] or "local" [n, M, D] features, or "states" [n, T, W] (a ViT's token
    # states entering block states_block(), for a method that runs the upper blocks itself)
    image_features: ClassVar[str] = "pooled"
    shares_prompt: ClassVar[bool] = True  # False: its uploads carry no prompt (only extras), and the pool stays empty

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ------------------------------------------------------------------------------------ config
    @classmethod
    def supports_dp(cls) -> bool:
        """Whether differential privacy on uploads covers everything this method uploads."""
        return cls.uploads

    @classmethod
    def resolve(cls, cfg: Config) -> type[Method]:
        """The class that runs this method under ``cfg`` (e.g. pFedMoAP with ``gate_sharing=aggregated`` is its
        shared-gate variant). Default: the class itself."""
        return cls

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse settings this method cannot run with (ConfigError, one line naming the value)."""
        if cfg.gate_sharing == "aggregated" and not cls.uses_gate:
            from ..federated.registry import methods

            gated = ", ".join(name for name, m in methods().items() if m.uses_gate)
            raise ConfigError(
                f"gate_sharing=aggregated needs a method with a gate, and method={cfg.method} has none "
                f"(methods with a gate: {gated})"
            )
        if cfg.dp_epsilon is not None and not cls.supports_dp():
            from ..federated.registry import methods

            able = ", ".join(name for name, m in methods().items() if m.supports_dp())
            raise ConfigError(f"dp_epsilon is set but method={cfg.method} {cls.dp_refusal} (DP applies to {able})")

    @classmethod
    def states_block(cls, cfg: Config, clip: Any) -> int:
        """For ``image_features = "states"``: the image block (0-based) whose entering token states are cached."""
        raise NotImplementedError(f"method {cls.name} reads {cls.image_features} image features, not states")

    # ------------------------------------------------------------------------------------ server side
    def exchanges_per_round(self, server: Server) -> int:
        """How many times a round's clients download, update, upload and are aggregated before the round is
        evaluated (default 1; DP-FPL synchronises its global prompt after every batch). Every exchange after the
        first goes to the round's clients that are still in it (not dropped out, not failed)."""
        return 1

    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        """What client ``cid`` downloads this round; ``view`` is the pool it may take experts from."""
        return Payload(global_prompt=server.global_prompt)

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        """Why an upload's extra tensors are unacceptable, or None (the prompt is checked by the server)."""
        return f"unexpected tensors {', '.join(sorted(extras))}" if extras else None

    def check_download_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        """Why a payload's extra tensors are not what this method's server sends, or None (a Flower node checks its
        downloads with it). Default: the same rule as for uploads (a method whose extras go both ways)."""
        return self.check_extras(extras)

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        """Fold the round's accepted uploads into the server state: FedAvg of the prompts into P_g."""
        server.aggregate({cid: up.prompt for cid, up in uploads.items() if up.prompt is not None})

    # ------------------------------------------------------------------------------------ client side
    def start_prompt(self, state: GlobalState, client: Client, payload: Payload) -> torch.Tensor:
        """Where the local prompt starts: the downloaded P_g (SPEC §2), else the server's."""
        return payload.global_prompt if payload.global_prompt is not None else state.global_prompt

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        """What this client's local update optimises."""
        return PromptObjective(ctx.encoder, self.start_prompt(state, client, payload), self.cfg.lr_prompt)

    def upload(self, client: Client, objective: Objective) -> Upload | None:
        """What goes back after training (before DP noise and the wire cast), or None."""
        return Upload(prompt=objective.prompt.detach()) if self.uploads else None

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        """The state ``client`` is evaluated with (default: the global prompt)."""
        return EvalState(("global", state.global_version), state.global_prompt)

    def eval_extras(self, server: Server) -> dict[str, torch.Tensor]:
        """The global tensors besides P_g that a client's evaluation reads (``GlobalState.extras``; a Flower evaluate
        message carries them, float32). Default: none."""
        return {}

    def eval_needs_global(self, client: Client) -> bool:
        """Whether ``client``'s evaluation reads the server's state after the round's aggregation (P_g, its version).
        When it does not, a client trained this round can be evaluated right after its local update (on Flower the
        accuracy rides on the train reply: one message per round), and a client that did not train keeps its last
        accuracy. It must agree with :meth:`eval_state`: the key changes with the global version exactly when this is
        True (tests/test_methods.py checks every registered method). Default: True (evaluated with P_g)."""
        return True

    def global_scorer(
        self, ctx: ClientContext, state: GlobalState, text: Callable[[tuple, torch.Tensor], torch.Tensor]
    ) -> Scorer | None:
        """The federation's global model as a classifier over ``text``'s classes, scored besides every client under
        the target protocols (``--eval-split cross-dataset / cross-domain / leave-one-domain-out``: what FedTPG and
        PMFLT report). Default: P_g as a plain prompt (CoOp's logits) for a method that trains and shares a prompt
        over pooled image features; None (not scored) otherwise."""
        if not (self.trains and self.uploads and self.shares_prompt) or self.image_features != "pooled":
            return None
        return mixture_scorer(text(("global", state.global_version), state.global_prompt), None, None, ctx.gamma, 0.0)

    def scorer(
        self,
        ctx: ClientContext,
        client: Client,
        view: EvalState,
        encoder: PromptEncoder,
        text: Callable[[tuple, torch.Tensor], torch.Tensor],
    ) -> Scorer:
        """The classifier ``client`` is evaluated with, in ``view``'s state, over ``encoder``'s classes.

        ``text(key, prompts)`` encodes prompts over those classes (cached by ``key`` for the evaluation). Default:
        pFedMoAP's logits (the local prompt's alone without a gate); the handcrafted prompt when ``view`` has none.
        """
        gamma, lam = ctx.gamma, LAM.of(self.cfg)
        local_text = encoder.zero_shot() if view.prompt is None else text(view.key, view.prompt)
        expert_text, gate = None, None
        if view.use_gate:
            expert_text = text(("experts", *view.key), view.expert_prompts)
            gate = client.gate
        return mixture_scorer(local_text, expert_text, gate, gamma, lam)
