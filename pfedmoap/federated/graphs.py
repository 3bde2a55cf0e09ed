"""CUDA graphs of the fixed-shape training step (``--cuda-graphs``).

A local update's step (the prompt's pass through the frozen text encoder, the gate, the loss, the backward, the
SGD update) is a few hundred small kernels whose shapes never change within the update; on a GPU it is bound by
their launches. :class:`StepGraphs` captures the step once per input shape and replays it: the first step of a
shape runs eagerly on a side stream (the warm-up torch asks for: cuBLAS handles, SGD's momentum buffers, the
autograd graph's allocations), the second is captured and then replayed, every later one copies its batch into
the captured inputs and replays. Every step still runs exactly once, in order, on the same tensors, so the update
is the eager one (the CUDA test ``tests/test_graphs.py`` checks replay against eager).

What a captured step may not do: synchronise with the host, or take a data-dependent shape or branch. The
objectives that are known to satisfy this say so (:attr:`~pfedmoap.federated.objective.Objective.graphable`); the
others, and any step whose capture fails, run eagerly (a failed capture is said once, in a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from ..base.errors import ConfigError
from ..config import CUDA_GRAPHS

if TYPE_CHECKING:
    from .objective import Objective


def resolve_cuda_graphs(setting: str, device: torch.device) -> bool:
    """Whether a run captures its training steps: ``auto`` on CUDA, ``on`` (CUDA required), ``off``."""
    if setting not in CUDA_GRAPHS:
        raise ConfigError(f"cuda_graphs={setting!r} is not one of: {', '.join(CUDA_GRAPHS)}")
    if setting == "on" and device.type != "cuda":
        raise ConfigError(
            f"cuda_graphs=on needs a CUDA device (this run is on {device.type}); use --cuda-graphs auto or off"
        )
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def step_graphs(enabled: bool, device: torch.device, objectives: Iterable[Objective]) -> StepGraphs | None:
    """The captured-step runner of one local update, or None (run eagerly): graphs switched on, a CUDA device, and
    every objective of the update :attr:`~pfedmoap.federated.objective.Objective.graphable`."""
    if enabled and device.type == "cuda" and all(o.graphable for o in objectives):
        return StepGraphs(device)
    return None


class StepGraphs:
    """One local update's captured steps, one CUDA graph per key (the caller's key plus the inputs' shapes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.warmed: set[Hashable] = set()
        self.failed: str | None = None  # why a capture failed (then every step runs eagerly)
        self.eager = self.captured = self.replayed = 0

    def run(self, step: Callable[..., None], inputs: Sequence[torch.Tensor], key: Hashable = ()) -> None:
        """Run ``step(*inputs)`` once: eagerly (warm-up, or after a failed capture), captured, or replayed."""
        full = (key, tuple((t.shape, t.dtype) for t in inputs))
        hit = self.graphs.get(full)
        if hit is not None:
            graph, static = hit
            for dst, src in zip(static, inputs, strict=True):
                dst.copy_(src)
            graph.replay()
            self.replayed += 1
            return
        if self.failed is not None:
            step(*inputs)
            self.eager += 1
            return
        if full not in self.warmed:
            self._warm_up(step, inputs)
            self.warmed.add(full)
            return
        static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step(*static)
        except Exception as exc:  # noqa: BLE001 (anything capture refuses: run eagerly from now on, say it once)
            self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(
                f"CUDA graph capture of the training step failed ({self.failed}); this update runs eagerly "
                "(--cuda-graphs off silences this)",
                RuntimeWarning,
                stacklevel=2,
            )
            torch.cuda.synchronize(self.device)
            step(*inputs)
            self.eager += 1
            return
        self.graphs[full] = (graph, static)
        self.captured += 1
        graph.replay()  # capturing ran nothing: this step runs now
        self.replayed += 1

    def _warm_up(self, step: Callable[..., None], inputs: Sequence[torch.Tensor]) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.eager += 1
