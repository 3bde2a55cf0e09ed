"""The server's state: the prompt pool, the global prompt, client sampling, expert selection, upload checks, FedAvg.

It never sees a private gate: pFedMoAP's gates stay on their clients (SPEC §2). What happens in a round (who is
sampled, what each client receives, what is accepted, the round's record) is the round driver's
(:mod:`pfedmoap.engine.rounds`); this class holds what persists between rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from ..base.errors import UserError
from ..base.tracing import nvtx_range
from ..ops import REFERENCE, KnnFn
from .seeding import Stream, stream


class Selection(Protocol):
    """An expert-selection rule (:mod:`pfedmoap.federated.selection`), handed to the server by the engine."""

    name: str

    def select(
        self, server: Server, cid: int, view: Mapping[int, torch.Tensor], candidates: list[int], k: int
    ) -> list[int]: ...


class Server:
    """Owns the pool (client id -> that client's last uploaded prompt) and the global prompt P_g."""

    def __init__(
        self,
        num_clients: int,
        init_prompt: torch.Tensor,
        train_sizes: list[int],
        frac: float,
        seed: int,
        selection: Selection,
        max_norm: float | None = None,
        knn: KnnFn = REFERENCE.knn,
    ):
        self.num_clients = num_clients
        self.prompt_shape = tuple(init_prompt.shape)
        self.init_prompt = init_prompt.detach().cpu().float().clone()
        self.global_prompt = self.init_prompt.clone()
        self.global_version = 0  # bumped at every aggregation
        self.pool: dict[int, torch.Tensor] = {}
        # other tensors a method aggregates on the server (e.g. a shared gate), by wire name
        self.extras: dict[str, torch.Tensor] = {}
        self.train_sizes = list(train_sizes)
        self.frac = frac
        self.selection = selection
        self.max_norm = max_norm
        self.knn = knn
        self.sample_rng = stream(seed, Stream.SAMPLE)
        self.select_rng = stream(seed, Stream.SELECT)
        self.rejected: list[tuple[int, str]] = []  # uploads refused this round: (client id, reason)

    # --------------------------------------------------------------------------------- sampling
    @property
    def clients_per_round(self) -> int:
        return max(1, int(self.frac * self.num_clients))

    def sample(self) -> list[int]:
        """m = max(1, int(frac * N)) clients without replacement, from the server's seeded RNG."""
        chosen = self.sample_rng.choice(self.num_clients, size=self.clients_per_round, replace=False)
        return [int(c) for c in chosen]

    # --------------------------------------------------------------------------------- experts
    def snapshot(self) -> dict[int, torch.Tensor]:
        """The pool as at the start of the round (pool tensors are never modified in place)."""
        return dict(self.pool)

    @nvtx_range("server.select_experts")
    def select_experts(self, cid: int, view: Mapping[int, torch.Tensor], k: int) -> list[int]:
        """The K experts for client ``cid`` from the other pool entries, by the run's selection rule
        (:mod:`pfedmoap.federated.selection`: knn, random, fixed).

        A client with no pool entry (first participation) gets none; fewer than K candidates -> all.
        """
        if cid not in view or k <= 0:
            return []
        others = sorted(j for j in view if j != cid)
        if not others:
            return []
        return self.selection.select(self, cid, view, others, k)

    # --------------------------------------------------------------------------------- uploads
    def check_upload(self, prompt: torch.Tensor) -> str | None:
        """Why an upload is unacceptable (shape, dtype, non-finite values, norm bound), or None if it is fine."""
        if not isinstance(prompt, torch.Tensor):
            return f"not a tensor ({type(prompt).__name__})"
        if tuple(prompt.shape) != self.prompt_shape:
            return f"shape {tuple(prompt.shape)} != {self.prompt_shape}"
        if not prompt.is_floating_point():
            return f"dtype {prompt.dtype} is not floating point"
        if not bool(torch.isfinite(prompt).all()):
            return "non-finite values"
        if self.max_norm is not None:
            norm = float(prompt.double().norm())
            if norm > self.max_norm:
                return f"L2 norm {norm:.4g} > max_prompt_norm {self.max_norm:.4g}"
        return None

    def receive(self, cid: int, prompt: torch.Tensor) -> bool:
        """Put a client's upload into the pool; a bad upload is refused, recorded, and changes nothing."""
        reason = self.check_upload(prompt)
        if reason is not None:
            self.rejected.append((cid, reason))
            return False
        self.pool[cid] = prompt.detach().cpu().float().clone()
        return True

    # --------------------------------------------------------------------------------- aggregation
    def fedavg(self, tensors: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """sum_i n_i / sum(n) * T_i over the given clients' tensors (float64 sums, float32 result)."""
        ids = sorted(tensors)
        weights = torch.tensor([float(self.train_sizes[i]) for i in ids], dtype=torch.float64)
        weights = weights / weights.sum()
        stacked = torch.stack([tensors[i].double() for i in ids])
        return (weights.view(-1, *([1] * (stacked.dim() - 1))) * stacked).sum(0).float()

    @nvtx_range("server.aggregate")
    def aggregate(self, uploads: Mapping[int, torch.Tensor]) -> None:
        """P_g := sum_i n_i / sum(n) * P_i over this round's accepted uploads (FedAvg)."""
        if not uploads:
            return
        self.global_prompt = self.fedavg(uploads)
        self.global_version += 1

    # --------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What later rounds depend on: P_g and its version, the pool, the method's extras, both RNG states."""
        return {
            "global_prompt": self.global_prompt,
            "global_version": self.global_version,
            "pool": {int(k): v for k, v in self.pool.items()},
            "extras": dict(self.extras),
            "sample_rng": self.sample_rng.bit_generator.state,
            "select_rng": self.select_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; prompts of another shape or dtype than this run's (another run's
        checkpoint) are one UserError line."""
        for name, prompt in [("global prompt", state["global_prompt"]), *state["pool"].items()]:
            check_prompt_like(self.global_prompt, prompt, name if isinstance(name, str) else f"client {name}'s prompt")
        self.global_prompt = state["global_prompt"]
        self.global_version = int(state["global_version"])
        self.pool = {int(k): v for k, v in state["pool"].items()}
        self.extras = dict(state["extras"])
        self.sample_rng.bit_generator.state = state["sample_rng"]
        self.select_rng.bit_generator.state = state["select_rng"]


def check_prompt_like(expected: torch.Tensor, found: object, what: str) -> None:
    """Refuse (UserError) a restored prompt that is not a tensor of ``expected``'s shape and dtype."""
    if not isinstance(found, torch.Tensor) or found.shape != expected.shape or found.dtype != expected.dtype:
        shape = list(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
        raise UserError(f"its {what} is {shape}, this run's prompts are {list(expected.shape)} {expected.dtype}")
