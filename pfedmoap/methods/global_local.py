"""What the global-plus-local prompt methods share (FedOTP, PromptFolio, FedPHA): a global prompt that travels (P_g,
downloaded, trained, uploaded, FedAvg'd weighted by train size) and a local prompt that never leaves its client.

Every client's local prompt starts from one common draw (from the run seed, its own stream, as P_g^0 is: every engine
and node derives it alike, and the published codes initialise every client's prompts alike). A client is evaluated
with the server's current global prompt and its own local prompt; one that has not trained yet with the initial
local prompt. Only the global prompt is sent, so DP on uploads covers everything sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..federated.client import Client, Objective
from ..federated.prompt import init_prompt
from ..federated.seeding import Stream, init_generator
from .base import ClientContext, EvalState, GlobalState, Method, Payload

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.prompt import PromptEncoder

LOCAL = "local_prompt"  # the name of the local prompt in Client.private


class GlobalLocalObjective(Objective):
    """Base of their objectives: trains the global prompt (``prompt``, uploaded) and the local one (kept as
    :data:`LOCAL`) at ``lr_prompt``, both text features from one pass (``contexts``: global, then local). A subclass
    says what its loss makes of them (:meth:`loss_from_text`)."""

    def __init__(
        self, cfg: Config, encoder: PromptEncoder, start_global: torch.Tensor, start_local: torch.Tensor
    ) -> None:
        device = encoder.clip.device
        self.cfg = cfg
        self.encoder = encoder
        self.gamma = encoder.clip.gamma
        self.prompt = nn.Parameter(start_global.detach().to(device, torch.float32).clone())
        self.local_prompt = nn.Parameter(start_local.detach().to(device, torch.float32).clone())

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.prompt, self.local_prompt], "lr": self.cfg.lr_prompt}]

    def contexts(self) -> torch.Tensor:
        return torch.stack([self.prompt, self.local_prompt])  # one text pass for both

    def private_state(self) -> dict[str, torch.Tensor]:
        return {LOCAL: self.local_prompt.detach()}


class GlobalLocalMethod(Method):
    """Base of the methods with a FedAvg'd global prompt and a private local one (:data:`LOCAL` in
    ``Client.private``). By default a client trains ``objective_class`` from the downloaded global prompt and its
    local prompt, and is evaluated with both stacked [2, n_ctx, W] (the server's current global prompt first)."""

    objective_class: ClassVar[type[GlobalLocalObjective]]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._initial_local: dict[tuple[int, int], torch.Tensor] = {}

    def local_length(self, client: Client) -> int:
        """How many context vectors ``client``'s local prompt has (default: n_ctx, as the global one)."""
        return self.cfg.n_ctx

    def initial_local(self, width: int, length: int | None = None) -> torch.Tensor:
        """The common initial local prompt [length, width] (default length n_ctx), drawn from the run seed's
        local-prompt stream: clients of one length start alike."""
        length = self.cfg.n_ctx if length is None else length
        if (length, width) not in self._initial_local:
            gen = init_generator(self.cfg.seed, Stream.LOCAL_PROMPT)
            self._initial_local[length, width] = init_prompt(length, width, self.cfg.ctx_init_std, gen)
        return self._initial_local[length, width]

    def local_prompt(self, client: Client, width: int) -> torch.Tensor:
        """``client``'s local prompt: its own once trained, else the common initial one."""
        if LOCAL in client.private:
            return client.private[LOCAL]
        return self.initial_local(width, self.local_length(client))

    def local_key(self, client: Client) -> tuple:
        """What identifies ``client``'s local prompt in an evaluation key (untrained clients share the initial one,
        so they share text features too)."""
        if LOCAL in client.private:
            return (client.cid, client.version)
        length = self.local_length(client)
        return ("init",) if length == self.cfg.n_ctx else ("init", length)

    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        start = self.start_prompt(state, client, payload)
        return self.objective_class(self.cfg, ctx.encoder, start, self.local_prompt(client, start.shape[-1]))

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        local = self.local_prompt(client, state.global_prompt.shape[-1])
        stacked = torch.stack([state.global_prompt.float(), local.float()])
        return EvalState((self.name, state.global_version, *self.local_key(client)), stacked)
