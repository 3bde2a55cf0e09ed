"""One client: its data, its private state (prompt, gate, RNG), the generic local training loop, its evaluation.

Nothing here is shared between clients: each owns its gate (created at first use, never uploaded unless the
method shares it), its generator (batch order, augmentation, DP noise) and a fresh optimiser per local update.
The frozen CLIP and the prompt encoder are read-only and shared.

What a local update optimises is the method's business (:mod:`pfedmoap.methods`): it hands :meth:`Client.train`
an :class:`Objective`, i.e. parameter groups with their learning rates and the loss of a batch. The loop itself
(epochs, batch order, SGD) is the same for every method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.tracing import nvtx_range
from ..model.features import encode_images, random_crop_flip
from ..model.precision import autocast
from .graphs import resolve_cuda_graphs, step_graphs
from .objective import Objective, Scorer  # noqa: F401  (importable from here, as before)

if TYPE_CHECKING:
    from ..config import Config
    from ..model.clip import FrozenCLIP


@dataclass
class ClientData:
    train_labels: torch.Tensor  # [n] long
    test_labels: torch.Tensor  # [m] long
    test_features: torch.Tensor  # [m, D] normalised, on the device
    train_features: torch.Tensor | None = None  # [n, D]; None when augmentation recomputes them
    train_images: torch.Tensor | None = None  # uint8 [n, 3, H, W]; kept only with augmentation
    local_features: bool = False  # features are the local ones [n, M, D] (FedOTP) rather than pooled [n, D]
    states_from: int | None = None  # features are a ViT's token states entering this block [n, T, W] (pFedMMA)

    @property
    def num_train(self) -> int:
        return int(self.train_labels.numel())

    @property
    def num_test(self) -> int:
        return int(self.test_labels.numel())


@dataclass(frozen=True)
class TrainSettings:
    """The generic loop's settings (learning rates belong to the objective's parameter groups)."""

    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    precision: str = "fp32"  # the step's forward runs under this autocast (pfedmoap.model.precision)
    cuda_graphs: bool = False  # capture the step once per shape and replay it (pfedmoap.federated.graphs; CUDA only)

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | None = None) -> TrainSettings:
        """The loop's settings of ``cfg``; ``device`` (the run's) resolves ``cuda_graphs=auto``."""
        graphs = device is not None and resolve_cuda_graphs(cfg.cuda_graphs, device)
        return cls(cfg.local_epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.precision, graphs)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        """The forward pass's autocast on ``device`` (nothing at fp32); the backward runs outside it."""
        return autocast(self.precision, device)


class Client:
    def __init__(self, cid: int, data: ClientData, seed: int):
        self.cid = cid
        self.data = data
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt: torch.Tensor | None = None  # the last prompt this client trained (kept locally)
        self.gate: nn.Module | None = None  # private: persists across this client's rounds
        # a method's other private tensors (FedOTP's local prompt, FedPGP's low-rank factors); never uploaded
        self.private: dict[str, torch.Tensor] = {}
        self.expert_ids: list[int] = []  # the experts it received in its last round
        self.expert_prompts: torch.Tensor | None = None  # [K, n_ctx, W] as received
        self.rounds_trained = 0
        self.version = 0  # bumped whenever the state that evaluation depends on changes
        self.eval_key: object = None  # what the cached accuracy was computed from
        self.accuracy: float | None = None
        self.attention: list[float] | None = None  # gate weight per expert at the last evaluation
        # accuracy on the shared evaluation sets at the last evaluation (--eval-split base2novel: base, novel)
        self.split_acc: dict[str, float] = {}
        # transient, never saved: (version, expert text features) of the last update, for the next evaluation
        self.expert_text: tuple[int, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------- gate
    def ensure_gate(self, make_gate: Callable[[], nn.Module], device: torch.device) -> nn.Module:
        """The client's gate, created by ``make_gate`` at first use from the client's own seed."""
        if self.gate is None:
            # initialise from the client's own seed, without touching the global RNG
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.gate = make_gate()
        return self.gate.to(device)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The private state later rounds depend on (prompt, gate, a method's private tensors, RNG, last experts,
        evaluation cache), as
        plain tensors and Python values. Checkpoints and Flower nodes both keep exactly this."""
        return {
            "prompt": self.prompt,
            "gate": None if self.gate is None else {k: v.cpu() for k, v in self.gate.state_dict().items()},
            "private": {k: v.cpu() for k, v in self.private.items()},
            "generator": self.generator.get_state(),
            "expert_ids": list(self.expert_ids),
            "expert_prompts": self.expert_prompts,
            "rounds_trained": self.rounds_trained,
            "version": self.version,
            "eval_key": None if self.eval_key is None else list(self.eval_key),
            "accuracy": self.accuracy,
            "attention": self.attention,
            "split_acc": dict(self.split_acc),
        }

    def load_state_dict(self, state: dict[str, Any], make_gate: Callable[[], nn.Module], device: torch.device) -> None:
        """Restore what :meth:`state_dict` returned; the gate is rebuilt on ``device`` when there was one."""
        self.prompt = state["prompt"]
        self.gate = None
        if state["gate"] is not None:
            self.ensure_gate(make_gate, device).load_state_dict(state["gate"])
            self.gate.eval()
        self.private = dict(state.get("private", {}))
        self.generator.set_state(state["generator"])
        self.expert_ids = [int(j) for j in state["expert_ids"]]
        self.expert_prompts = state["expert_prompts"]
        self.rounds_trained = int(state["rounds_trained"])
        self.version = int(state["version"])
        self.eval_key = None if state["eval_key"] is None else tuple(state["eval_key"])
        self.accuracy = state["accuracy"]
        self.attention = state["attention"]
        self.split_acc = dict(state.get("split_acc", {}))
        self.expert_text = None

    # ----------------------------------------------------------------------------------- training
    def _batch_features(self, clip: FrozenCLIP, idx: torch.Tensor) -> torch.Tensor:
        if self.data.train_features is not None:
            return self.data.train_features[idx]
        images = random_crop_flip(self.data.train_images[idx], self.generator)
        return encode_images(clip, images, local=self.data.local_features, states_from=self.data.states_from)

    def batch_indices(self, settings: TrainSettings) -> Iterator[torch.Tensor]:
        """The local update's batches (train indices), ``settings.epochs`` epochs in the order of this client's own
        generator, drawn lazily: fetch each batch (:meth:`batch`) before asking for the next, and augmentation
        draws from the same generator in the same order as in a sequential run, however steps are scheduled."""
        n = self.data.num_train
        for _ in range(settings.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, settings.batch_size):
                yield order[start : start + settings.batch_size]

    def batch(self, clip: FrozenCLIP, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features, labels) of the train images ``idx``, on the CLIP's device."""
        device = clip.device
        feats = self._batch_features(clip, idx.to(device) if device.type != "cpu" else idx)
        labels = self.data.train_labels
        return feats, labels[idx.to(labels.device)].to(device)  # only the batch's labels move

    def optimizer(
        self, param_groups: list[dict[str, Any]], settings: TrainSettings, foreach: bool | None = None
    ) -> torch.optim.Optimizer:
        """A fresh SGD for one local update: no state leaks between rounds or clients. ``foreach`` picks torch's
        multi-tensor implementation (same update per parameter; None: torch's default for the device)."""
        return torch.optim.SGD(
            param_groups, momentum=settings.momentum, weight_decay=settings.weight_decay, foreach=foreach
        )

    @nvtx_range("local_train")
    def train(self, objective: Objective, settings: TrainSettings, clip: FrozenCLIP) -> None:
        """Local update: ``settings.epochs`` epochs of SGD on the objective's parameter groups, batches in the
        order of this client's own generator. A fresh optimiser every call: no state leaks between rounds or
        clients."""
        opt = self.optimizer(objective.param_groups(), settings)
        objective.attach_optimizer(opt)
        objective.begin()

        def step(feats: torch.Tensor, labels: torch.Tensor) -> None:
            with settings.autocast(clip.device):  # the forward only: the backward runs outside autocast
                loss = objective.loss(feats, labels)
            with nvtx_range("step.backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with nvtx_range("step.optimizer"):
                opt.step()

        # with --cuda-graphs each step is captured once per shape and replayed (pfedmoap.federated.graphs); the batch is
        # fetched outside the graph and copied into its inputs
        graphs = step_graphs(settings.cuda_graphs, clip.device, [objective])
        batches = objective.batches(self, settings)
        for idx in self.batch_indices(settings) if batches is None else batches:
            with nvtx_range("step"):
                with nvtx_range("step.features"), settings.autocast(clip.device):
                    feats, labels = self.batch(clip, idx)
                if graphs is None:
                    step(feats, labels)
                else:
                    graphs.run(step, (feats, labels))
        objective.end()
        self.trained()

    def trained(self) -> None:
        """Count a finished local update (its state changed: cached evaluations are stale)."""
        self.rounds_trained += 1
        self.version += 1

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate_with(self, scorer: Scorer, batch_size: int = 512, weights: bool = False) -> float:
        """Accuracy (%) of ``scorer`` on this client's own test split. With ``weights``, also sets
        ``self.attention``: the gate's weight per expert (local first, then the non-local experts in the order
        received), averaged over the test images at their true class; else it is cleared."""
        feats, labels = self.data.test_features, self.data.test_labels
        acc, self.attention = accuracy(scorer, feats, labels, batch_size, weights)
        return acc


"""A classifier at evaluation: (image features of a batch, need_weights) -> (logits [B, C], weights or None)."""


@torch.no_grad()
def accuracy(
    scorer: Scorer, feats: torch.Tensor, labels: torch.Tensor, batch_size: int = 512, weights: bool = False
) -> tuple[float, list[float] | None]:
    """Accuracy (%) of ``scorer`` on (``feats``, ``labels``) in batches (NaN without data) and, with ``weights``,
    the mean weight per expert at the true class (else None)."""
    labels = labels.to(feats.device)
    if len(labels) == 0:
        return float("nan"), None
    correct = 0
    attention_sum = None
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]
        logits, w = scorer(feats[start : start + batch_size], weights)
        correct += int((logits.argmax(dim=-1) == batch_labels).sum())
        if weights and w is not None:
            at_true = w[torch.arange(len(batch_labels), device=w.device), batch_labels].sum(0)
            attention_sum = at_true if attention_sum is None else attention_sum + at_true
    attention = None if attention_sum is None else (attention_sum / len(labels)).tolist()
    return 100.0 * correct / len(labels), attention
