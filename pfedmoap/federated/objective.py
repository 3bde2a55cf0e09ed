"""What a method's local update optimises and how a client is scored: the :class:`Objective` interface and the
:data:`Scorer` type, shared by the clients (:mod:`~pfedmoap.federated.client`), the methods and the CUDA graphs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..base.tracing import nvtx_range

if TYPE_CHECKING:
    from .prompt import PromptEncoder


class Objective:
    """What one local update optimises. Methods build one per sampled client and round (``Method.objective``).

    ``prompt`` is the trained local prompt (kept by the client afterwards); ``expert_text`` the frozen experts'
    text features the update used, if any (kept until the client's next evaluation, so it need not re-encode).
    """

    prompt: nn.Parameter
    expert_text: torch.Tensor | None = None
    encoder: PromptEncoder

    def param_groups(self) -> list[dict[str, Any]]:
        """torch.optim parameter groups, each with its ``lr``."""
        raise NotImplementedError

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one batch of (L2-normalised image features, labels): the text features of
        :meth:`contexts`, encoded in one pass, scored by :meth:`loss_from_text`."""
        with nvtx_range("step.text_encode"):
            text = self.encoder.encode(self.contexts())
        return self.loss_from_text(features, labels, text)

    def contexts(self) -> torch.Tensor:
        """The prompt contexts one step encodes, [P, n_ctx, W], with their gradients. Splitting the encoding from
        the loss lets several clients' steps share one pass of the text encoder (``--parallel-clients``)."""
        raise NotImplementedError

    def loss_from_text(self, features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The loss of one batch, given the text features [P, C, D] of :meth:`contexts`."""
        raise NotImplementedError

    def vector_state(self) -> dict[str, torch.Tensor] | None:
        """The client's own tensors that :meth:`loss_from_text` reads (its gate's parameters, its experts'
        features, ...), so that a group of clients' losses can be one vectorised call (``torch.func.vmap`` over
        the stacked states). None (the default): this objective's losses are computed one by one."""
        return None

    def vector_loss(
        self, state: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`loss_from_text` with the client's tensors read from ``state`` (the keys of :meth:`vector_state`)
        and nothing else that differs between clients: it runs once, vectorised, for a whole group."""
        raise NotImplementedError

    def stacked_loss(
        self, states: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor, text: torch.Tensor
    ) -> torch.Tensor | None:
        """The losses [M] of M clients of this objective's kind from their stacked :meth:`vector_state` tensors and
        batches ([M, ...] each), computed by batched ops directly rather than by ``torch.func.vmap`` of
        :meth:`vector_loss`; None (the default): vmap it is. An objective whose loss runs an op that has no vmap
        rule but a client axis (the fused gate kernels) answers here."""
        return None

    @property
    def graphable(self) -> bool:
        """Whether a step on this objective can be captured in a CUDA graph: no host synchronisation, no
        data-dependent shape or branch in :meth:`loss` (default: not known, so no)."""
        return False

    @property
    def batchable(self) -> bool:
        """Whether this objective splits its loss into contexts() and loss_from_text() (else it trains alone)."""
        return type(self).contexts is not Objective.contexts

    def private_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors the client keeps besides its prompt and gate (``Client.private``), detached."""
        return {}

    def batches(self, client: Any, settings: Any) -> Iterator[torch.Tensor] | None:
        """The train indices of this update's batches, or None (the default): ``settings.epochs`` epochs in the
        client's own order (``Client.batch_indices``). A method that exchanges every batch (DP-FPL) trains one."""
        return None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called with the update's fresh optimiser before the first step; an objective whose optimiser state lasts
        longer than one update (DP-FPL's momentum, across its per-batch exchanges) restores it here."""

    def begin(self) -> None:
        """Called before the first step (e.g. a gate to train mode)."""

    def end(self) -> None:
        """Called after the last step (e.g. a gate back to eval mode)."""


Scorer = Callable[[torch.Tensor, bool], tuple[torch.Tensor, "torch.Tensor | None"]]
