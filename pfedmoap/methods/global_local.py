"""What the global-plus-local prompt methods share (FedOTP, PromptFolio, FedPHA): a global prompt that travels (P_g,
downloaded, trained, uploaded, FedAvg'd weighted by train size) and a local prompt that never leaves its client.

Every client's local prompt starts from one common draw (from the run seed, its own stream, as P_g^0 is: every engine
and node derives it alike, and the published codes initialise every client's prompts alike). A client is evaluated
with the server's current global prompt and its own local prompt; one that has not trained yet with the initial
local prompt. Only the global prompt is sent, so DP on uploads covers everything sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..federated.client import Client
from ..federated.prompt import init_prompt
from ..federated.seeding import Stream, init_generator
from .base import GlobalState, Method

if TYPE_CHECKING:
    from ..config import Config

LOCAL = "local_prompt"  # the name of the local prompt in Client.private


class GlobalLocalMethod(Method):
    """Base of the methods with a FedAvg'd global prompt and a private local one (:data:`LOCAL` in
    ``Client.private``)."""

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

    def eval_global_local(self, state: GlobalState, client: Client) -> tuple[torch.Tensor, torch.Tensor]:
        """(the server's global prompt, ``client``'s local prompt), float32."""
        local = self.local_prompt(client, state.global_prompt.shape[-1])
        return state.global_prompt.float(), local.float()
