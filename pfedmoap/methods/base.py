"""What a federated prompt-learning method is, as far as the shared round loop is concerned.

The loop (``federation.py``) asks the method, per sampled client: what to download, where the local
prompt starts, what to optimise, what to upload; then how to aggregate; and, for evaluation, which state
each client is judged with. Everything else (sampling, training, accounting, evaluation) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..client import Client, LocalObjective
from ..config import Config
from ..server import Server


@dataclass
class Payload:
    """What the server sends one client in one round (``None`` / empty = not sent)."""

    global_prompt: torch.Tensor | None = None
    expert_ids: list[int] = field(default_factory=list)
    expert_prompts: torch.Tensor | None = None  # [K, n_ctx, W]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.global_prompt, self.expert_prompts) if t is not None]


@dataclass
class EvalState:
    """The state a client is evaluated with. ``key`` identifies it: equal keys give equal accuracy."""

    key: tuple
    prompt: torch.Tensor | None  # None: use the handcrafted zero-shot text features
    expert_prompts: torch.Tensor | None = None
    use_gate: bool = False


class Method:
    """Base: a prompt-only method that neither downloads nor uploads (CoOp-style local training)."""

    name = "base"
    trains = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def payload(self, server: Server, view: dict[int, torch.Tensor], client: Client) -> Payload:
        return Payload()

    def start_prompt(self, server: Server, client: Client, payload: Payload) -> torch.Tensor:
        return payload.global_prompt if payload.global_prompt is not None else server.global_prompt

    def objective(self, payload: Payload) -> LocalObjective:
        return LocalObjective()

    def uploads(self) -> bool:
        return True

    def aggregate(self, server: Server, uploads: dict[int, torch.Tensor]) -> None:
        server.aggregate(uploads)

    def eval_state(self, server: Server, client: Client) -> EvalState:
        return EvalState(("global", server.global_version), server.global_prompt)
