"""pFedMoAP (SPEC §2): download P_g and K nearest experts; train prompt + private gate; upload the prompt."""

from __future__ import annotations

import torch

from ..client import Client, LocalObjective
from ..server import Server
from .base import EvalState, Method, Payload


class PFedMoAP(Method):
    name = "pfedmoap"

    def payload(self, server: Server, view: dict[int, torch.Tensor], client: Client) -> Payload:
        ids = server.select_experts(client.cid, view, self.cfg.experts)
        experts = torch.stack([view[j] for j in ids]) if ids else None
        return Payload(global_prompt=server.global_prompt, expert_ids=ids, expert_prompts=experts)

    def objective(self, payload: Payload) -> LocalObjective:
        # first participation (no experts): the prompt alone, l_loc only
        return LocalObjective(use_gate=bool(payload.expert_ids), lam=self.cfg.lam)

    def eval_state(self, server: Server, client: Client) -> EvalState:
        if client.prompt is None:  # never trained: the global prompt, no experts
            return EvalState(("global", server.global_version), server.global_prompt)
        return EvalState(
            ("own", client.cid, client.version),
            client.prompt,
            client.expert_prompts,
            use_gate=client.expert_prompts is not None and client.gate is not None,
        )
