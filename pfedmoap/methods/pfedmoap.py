"""pFedMoAP (SPEC §2): download P_g and the K nearest experts; train the prompt and a private gate; upload the
prompt only. The gate never leaves its client."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from ..base.tracing import nvtx_range
from ..federated.client import Client, Objective
from ..federated.registry import method_class, register_method
from ..gates import pfedmoap_logits
from ..gates.base import LAM, LR_GATE
from .base import ClientContext, EvalState, GlobalState, Method, Payload, PromptObjective

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder
    from ..federated.server import Server


class MixtureObjective(PromptObjective):
    """logits = l_moe + lam * l_loc with ``gate`` over [local; K frozen experts' ``expert_text``]; trains the
    prompt (lr ``lr_prompt``) and the gate (lr ``lr_gate``). Gradients reach the prompt through both terms; the
    experts' features are constants (encoded once, without grad)."""

    def __init__(
        self,
        encoder: PromptEncoder,
        start_prompt: torch.Tensor,
        lr_prompt: float,
        gate: nn.Module,
        expert_text: torch.Tensor,
        lam: float,
        lr_gate: float,
    ):
        super().__init__(encoder, start_prompt, lr_prompt)
        self.gate = gate
        self.expert_text = expert_text
        self.lam = lam
        self.lr_gate = lr_gate

    def param_groups(self) -> list[dict[str, Any]]:
        return [*super().param_groups(), {"params": list(self.gate.parameters()), "lr": self.lr_gate}]

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return pfedmoap_logits(features, text, self.expert_text, self.gate, self.gamma, self.lam)[0]

    def _fused_gate(self) -> bool:
        """Whether the gate scores through a fused backend that has a client axis (no vmap rule)."""
        ops = getattr(self.gate, "ops", None)
        fused = ops is not None and ops.backends.get("gate_score", "reference") != "reference"
        return fused and hasattr(self.gate, "forward_clients")

    def vector_state(self) -> dict[str, torch.Tensor] | None:
        ops = getattr(self.gate, "ops", None)
        if ops is not None and ops.backends.get("gate_score", "reference") != "reference" and not self._fused_gate():
            return None  # a fused gate without a client axis (no vmap rule either): one by one
        state = {f"gate.{name}": p for name, p in self.gate.named_parameters()}
        state.update({f"gate_buffer.{name}": b for name, b in self.gate.named_buffers()})
        return {**state, "expert_text": self.expert_text}

    def vector_loss(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        # pfedmoap_logits with the gate's tensors from ``state`` (torch.func.functional_call)
        local_text = text[0]
        gate_state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(("gate.", "gate_buffer."))}
        experts = torch.cat([local_text[None], state["expert_text"].to(local_text.dtype)], dim=0)
        local_logits = self.gamma * features @ local_text.t()
        kwargs = {"gamma": self.gamma, "local_logits": local_logits, "lam": self.lam}
        logits, _ = torch.func.functional_call(self.gate, gate_state, (features, experts), kwargs)
        return F.cross_entropy(logits, labels)

    def stacked_loss(
        self, states: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor | None:
        """With a fused gate: every client's logits in one ``gate_score_clients`` call (one kernel launch forward,
        one backward), then each client's mean cross-entropy. With the reference gate: None (vmap)."""
        if not self._fused_gate():
            return None
        local_text = text[:, 0]  # [M, C, D]
        experts = torch.cat([local_text[:, None], states["expert_text"].to(local_text.dtype)], dim=1)
        local_logits = self.gamma * features @ local_text.transpose(1, 2)
        params = {k.split(".", 1)[1]: v for k, v in states.items() if k.startswith("gate.")}
        logits = self.gate.forward_clients(
            params, features, experts, gamma=self.gamma, local_logits=local_logits, lam=self.lam
        )
        clients, batch, classes = logits.shape
        flat = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), reduction="none")
        return flat.view(clients, batch).mean(1)

    def begin(self) -> None:
        self.gate.train()

    def end(self) -> None:
        self.gate.eval()


@register_method
class PFedMoAP(Method):
    name = "pfedmoap"
    help = "pFedMoAP: own prompt + K nearest experts mixed by a private gate (the paper)"
    uses_gate = True

    @classmethod
    def resolve(cls, cfg: Config) -> type[Method]:
        if cfg.gate_sharing == "aggregated":  # its shared-gate variant (methods/shared_gate.py, a subclass of this)
            return method_class("pfedmoap-shared-gate")
        return cls

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.experts >= cfg.clients:
            raise ConfigError(
                f"experts={cfg.experts} must be smaller than clients={cfg.clients} "
                f"(K counts the other clients' prompts; valid: 0..{cfg.clients - 1})"
            )

    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        ids = server.select_experts(cid, view, self.cfg.experts)
        experts = torch.stack([view[j] for j in ids]) if ids else None
        return Payload(global_prompt=server.global_prompt, expert_ids=ids, expert_prompts=experts)

    def encode_experts(self, ctx: ClientContext, payload: Payload) -> torch.Tensor:
        """The K frozen experts' text features: encoded once per round, in one batched pass, without grad."""
        with nvtx_range("encode_experts"), torch.no_grad():
            return ctx.encoder.encode(payload.expert_prompts)

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        cfg = self.cfg
        start = self.start_prompt(state, client, payload)
        if not payload.expert_ids:  # first participation: the prompt alone, l_loc only
            return PromptObjective(ctx.encoder, start, cfg.lr_prompt)
        gate = client.ensure_gate(ctx.make_gate, ctx.device)  # the client's own, created at first use
        expert_text = self.encode_experts(ctx, payload)
        return MixtureObjective(ctx.encoder, start, cfg.lr_prompt, gate, expert_text, LAM.of(cfg), LR_GATE.of(cfg))

    def eval_needs_global(self, client: Client) -> bool:
        # a trained client: its own prompt, its experts and its gate (the shared-gate ablation too: the gate it
        # trained last); only a client that never trained is evaluated with P_g
        return client.prompt is None

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        if client.prompt is None:  # never trained: the global prompt, no experts
            return EvalState(("global", state.global_version), state.global_prompt)
        return EvalState(
            ("own", client.cid, client.version),
            client.prompt,
            client.expert_prompts,
            use_gate=client.expert_prompts is not None and client.gate is not None,
        )
