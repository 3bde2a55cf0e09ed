"""The client side of a round, shared by every engine: one client's local update and one client's evaluation.

:class:`ClientRuntime` holds what all clients of a run share read-only (the frozen CLIP and prompt encoder, the
method, the loop's settings, the gate factory, the DP noise level); the state it works on is the client's own.
The in-process engine calls it for each sampled client, a Flower node for its one client.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import comm
from .client import Client, TrainSettings
from .gates import create_gate
from .methods import GlobalState, Method, Payload, Upload
from .ops import REFERENCE, OpTable
from .privacy import run_noise_multiplier
from .profiling import timed

if TYPE_CHECKING:
    from .config import Config
    from .world import World


class ClientRuntime:
    """Runs clients' local updates and evaluations for one run (the engines' shared client half)."""

    def __init__(self, cfg: Config, world: World, method: Method, ops: OpTable = REFERENCE):
        self.cfg = cfg
        self.world = world
        self.method = method
        self.ops = ops
        self.clip = world.clip
        self.encoder = world.encoder
        self.device = world.device
        self.settings = TrainSettings.from_config(cfg)
        self.dp_noise_multiplier = run_noise_multiplier(cfg)

    def make_gate(self) -> nn.Module:
        """A fresh gate of the run's kind, with the run's fused ops (clients call it under their own seed)."""
        return create_gate(self.cfg, self.ops)

    def local_update(
        self, client: Client, payload: Payload, state: GlobalState, phases: dict[str, float] | None = None
    ) -> Upload | None:
        """One sampled client's work after its download (``payload`` in float32): build the method's objective
        (pFedMoAP encodes its K frozen experts here, once), train, keep the new local state, and return the
        upload as it goes on the wire (DP noise added when on), or None when the method uploads nothing."""
        cfg, method = self.cfg, self.method
        phases = phases if phases is not None else defaultdict(float)
        with timed(phases, "prepare"):
            objective = method.objective(self, state, client, payload)
        with timed(phases, "train"):
            client.train(objective, self.settings, self.clip)
        client.prompt = objective.prompt.detach().cpu()
        client.expert_ids = list(payload.expert_ids)
        client.expert_prompts = payload.expert_prompts
        text = objective.expert_text
        client.expert_text = None if text is None else (client.version, text)
        upload = method.upload(client, objective)
        if upload is None:
            return None
        if self.dp_noise_multiplier is not None and upload.prompt is not None:
            from .privacy import privatize_update

            start = payload.global_prompt.to(upload.prompt.device)
            noisy = privatize_update(upload.prompt - start, cfg.dp_clip, self.dp_noise_multiplier, client.generator)
            upload.prompt = start + noisy  # the client keeps its clean prompt; only the upload is noised
        return upload.map(lambda t: comm.to_wire(t, cfg.comm_dtype))

    @torch.no_grad()
    def evaluate_client(
        self, client: Client, state: GlobalState, shared_text: dict[tuple, torch.Tensor] | None = None
    ) -> float:
        """Accuracy (%) of one client with the state its method evaluates it with; an unchanged state keeps its
        accuracy (exact: same state, same data). ``shared_text`` shares text features between clients evaluated
        with the same prompt (e.g. every never-trained client with P_g)."""
        shared_text = {} if shared_text is None else shared_text
        view = self.method.eval_state(state, client)
        if client.eval_key == view.key and client.accuracy is not None:
            return client.accuracy
        if view.prompt is None:
            local_text = self.world.zero_shot_text()
        else:
            if view.key not in shared_text:
                shared_text[view.key] = self.encoder.encode(view.prompt)
            local_text = shared_text[view.key]
        expert_text, gate = None, None
        if view.use_gate:
            cached = client.expert_text
            if cached is not None and cached[0] == client.version:
                expert_text = cached[1]
            else:
                expert_text = self.encoder.encode(view.expert_prompts)
            gate = client.gate
        acc = client.evaluate(self.clip.gamma, local_text, expert_text, gate, self.cfg.lam, self.cfg.eval_batch_size)
        client.eval_key, client.accuracy = view.key, acc
        return acc
