"""One simulated client: its data, its private gate, its RNG, its local update and its evaluation.

Nothing here is shared between clients: each owns its gate (created at first use, never uploaded), its
generator (batch order, augmentation) and a fresh optimiser per local update. The frozen CLIP and the
prompt encoder are read-only and shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .clip import FrozenCLIP
from .data.features import encode_images, random_crop_flip
from .gate import AttentionGate, pfedmoap_logits
from .profiling import nvtx_range
from .prompt import PromptEncoder


@dataclass
class ClientData:
    train_labels: torch.Tensor  # [n] long
    test_labels: torch.Tensor  # [m] long
    test_features: torch.Tensor  # [m, D] normalised, on the device
    train_features: torch.Tensor | None = None  # [n, D]; None when augmentation recomputes them
    train_images: torch.Tensor | None = None  # uint8 [n, 3, H, W]; kept only with augmentation

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())


@dataclass
class LocalObjective:
    """What one local update optimises; methods differ only in these fields."""

    use_gate: bool = False  # pFedMoAP with experts: logits = l_moe + lam * l_loc
    lam: float = 0.5
    prox_mu: float = 0.0  # FedProx: + mu / 2 * ||ctx - anchor||^2
    anchor: torch.Tensor | None = None


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr_prompt: float
    lr_gate: float
    momentum: float
    weight_decay: float
    d_gate: int
    heads: int
    attn_scaling: float
    reduction: str


def client_seed(run_seed: int, cid: int) -> int:
    """A per-client seed derived from the run seed (independent streams for every client)."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(run_seed * 1_000_003 + cid)))


class Client:
    def __init__(self, cid: int, data: ClientData, seed: int):
        self.cid = cid
        self.data = data
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt: torch.Tensor | None = None  # the last prompt this client trained (kept locally)
        self.gate: AttentionGate | None = None  # private: persists across this client's rounds
        self.expert_ids: list[int] = []  # the experts it received in its last round
        self.expert_prompts: torch.Tensor | None = None  # [K, n_ctx, W] as received
        self.rounds_trained = 0
        self.dp_releases = 0  # differentially private uploads made so far (for the accountant)
        self.version = 0  # bumped whenever the state that evaluation depends on changes
        self.eval_key: object = None  # what the cached accuracy was computed from
        self.accuracy: float | None = None
        self.attention: list[float] | None = None  # gate weight per expert at the last evaluation

    # ----------------------------------------------------------------------------------- gate
    def ensure_gate(self, settings: TrainSettings, device: torch.device) -> AttentionGate:
        if self.gate is None:
            # initialise from the client's own seed, without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.gate = AttentionGate(settings.d_gate, settings.heads, settings.attn_scaling)
        return self.gate.to(device)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The private state later rounds depend on (prompt, gate, RNG, last experts, evaluation cache), as
        plain tensors and Python values. Checkpoints and Flower nodes both keep exactly this."""
        return {
            "prompt": self.prompt,
            "gate": None if self.gate is None else {k: v.cpu() for k, v in self.gate.state_dict().items()},
            "generator": self.generator.get_state(),
            "expert_ids": list(self.expert_ids),
            "expert_prompts": self.expert_prompts,
            "rounds_trained": self.rounds_trained,
            "dp_releases": self.dp_releases,
            "version": self.version,
            "eval_key": None if self.eval_key is None else list(self.eval_key),
            "accuracy": self.accuracy,
            "attention": self.attention,
        }

    def load_state_dict(self, state: dict[str, Any], settings: TrainSettings, device: torch.device) -> None:
        """Restore what :meth:`state_dict` returned; the gate is rebuilt on ``device`` when there was one."""
        self.prompt = state["prompt"]
        self.gate = None
        if state["gate"] is not None:
            self.ensure_gate(settings, device).load_state_dict(state["gate"])
        self.generator.set_state(state["generator"])
        self.expert_ids = [int(j) for j in state["expert_ids"]]
        self.expert_prompts = state["expert_prompts"]
        self.rounds_trained = int(state["rounds_trained"])
        self.dp_releases = int(state["dp_releases"])
        self.version = int(state["version"])
        self.eval_key = None if state["eval_key"] is None else tuple(state["eval_key"])
        self.accuracy = state["accuracy"]
        self.attention = state["attention"]

    # ----------------------------------------------------------------------------------- training
    def _batch_features(self, clip: FrozenCLIP, idx: torch.Tensor) -> torch.Tensor:
        if self.data.train_features is not None:
            return self.data.train_features[idx]
        images = random_crop_flip(self.data.train_images[idx], self.generator)
        return encode_images(clip, images)

    @nvtx_range("local_train")
    def train(
        self,
        encoder: PromptEncoder,
        start_prompt: torch.Tensor,
        expert_text: torch.Tensor | None,
        objective: LocalObjective,
        settings: TrainSettings,
    ) -> torch.Tensor:
        """Local update: ``settings.epochs`` epochs of SGD on the prompt (and the gate when used).

        ``expert_text`` [K, C, D] are the frozen non-local experts' text features, encoded once per round.
        Returns the trained prompt (detached). A fresh optimiser every call: no state leaks between rounds
        or clients.
        """
        clip = encoder.clip
        device = clip.device
        ctx = nn.Parameter(start_prompt.detach().to(device, torch.float32).clone())
        groups = [{"params": [ctx], "lr": settings.lr_prompt}]
        gate = None
        if objective.use_gate and expert_text is not None and expert_text.shape[0] > 0:
            gate = self.ensure_gate(settings, device)
            gate.train()
            groups.append({"params": list(gate.parameters()), "lr": settings.lr_gate})
        else:
            expert_text = None
        opt = torch.optim.SGD(groups, momentum=settings.momentum, weight_decay=settings.weight_decay)
        anchor = objective.anchor.to(device) if objective.anchor is not None else None
        labels = self.data.train_labels.to(device)
        n = self.data.num_train
        for _ in range(settings.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, settings.batch_size):
                idx = order[start : start + settings.batch_size]
                with nvtx_range("step"):
                    with nvtx_range("step.features"):
                        feats = self._batch_features(clip, idx.to(device) if device.type != "cpu" else idx)
                    with nvtx_range("step.text_encode"):
                        text = encoder.encode(ctx)
                    with nvtx_range("step.gate"):
                        logits, _ = pfedmoap_logits(
                            feats,
                            text,
                            expert_text,
                            gate,
                            clip.gamma,
                            objective.lam,
                            settings.d_gate,
                            settings.reduction,
                        )
                        loss = F.cross_entropy(logits, labels[idx.to(labels.device)])
                        if objective.prox_mu > 0 and anchor is not None:
                            loss = loss + 0.5 * objective.prox_mu * (ctx - anchor).pow(2).sum()
                    with nvtx_range("step.backward"):
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    with nvtx_range("step.optimizer"):
                        opt.step()
        if gate is not None:
            gate.eval()
        self.rounds_trained += 1
        self.version += 1
        return ctx.detach()

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        gamma: float,
        local_text: torch.Tensor,
        expert_text: torch.Tensor | None,
        gate: AttentionGate | None,
        lam: float,
        d_gate: int,
        reduction: str,
        batch_size: int = 512,
    ) -> float:
        """Accuracy (%) on this client's own test split, classifying over all classes.

        With a gate, also sets ``self.attention``: the gate's head-averaged weight per expert (local first,
        then the non-local experts in the order received), averaged over the test images at their true class.
        """
        feats, labels = self.data.test_features, self.data.test_labels.to(self.data.test_features.device)
        self.attention = None
        if len(labels) == 0:
            return float("nan")
        correct = 0
        attention_sum = None
        for start in range(0, len(labels), batch_size):
            batch_labels = labels[start : start + batch_size]
            logits, weights = pfedmoap_logits(
                feats[start : start + batch_size],
                local_text,
                expert_text,
                gate,
                gamma,
                lam,
                d_gate,
                reduction,
                need_weights=gate is not None,
            )
            correct += int((logits.argmax(dim=-1) == batch_labels).sum())
            if weights is not None:
                at_true = weights[torch.arange(len(batch_labels), device=weights.device), batch_labels].sum(0)
                attention_sum = at_true if attention_sum is None else attention_sum + at_true
        if attention_sum is not None:
            self.attention = (attention_sum / len(labels)).tolist()
        return 100.0 * correct / len(labels)
