"""Hot ops behind one typed table: a plain-torch reference twin per op, and fused backends where they run.

Backends, in order of preference for ``--fused``:

- ``triton``: the fused gate-and-score kernels in ``pfedmoap.kernels`` (needs CUDA, or TRITON_INTERPRET=1
  set before import, which runs them on CPU tensors, slowly: for tests);
- ``cpp``: the compiled extension ``pfedmoap._C`` (batched expert prompt assembly and KNN; CPU with OpenMP,
  and CUDA when it was built with nvcc);
- ``factored``: the Triton kernels' algebra in plain torch (the gate's logits without building T_MoE), for
  CPUs and wherever Triton cannot run;
- ``reference``: plain torch (``reference.py``), always present; what every fused op is tested against.

A run holds one :class:`OpTable` (``select_ops(fused)``): the gate, the prompt encoder and the server call
the table's functions, so two runs in one process each use their own backends. Which backends *can* run is a
fact about the process (imports, CUDA, the built extension) and is looked up once.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import torch

from . import reference

OPS = ("gate_score", "knn", "assemble_prompts")
BACKENDS = ("triton", "cpp", "factored", "reference")


class GateScoreFn(Protocol):
    """gamma * <query_b, T_MoE[b, c]> (+ lam * local[b, c]) and the head-averaged attention [B, C, E] or None.

    query [B, d], experts [E, C, d]; the weights are (W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O).
    """

    def __call__(
        self,
        query: torch.Tensor,
        experts: torch.Tensor,
        wq: torch.Tensor,
        bq: torch.Tensor,
        wk: torch.Tensor,
        bk: torch.Tensor,
        wv: torch.Tensor,
        bv: torch.Tensor,
        wo: torch.Tensor,
        bo: torch.Tensor,
        *,
        gamma: float,
        heads: int,
        scaling: float,
        need_weights: bool = False,
        local: torch.Tensor | None = None,
        lam: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class KnnFn(Protocol):
    """For each query row id, the ids of its k nearest other present rows of pool [N, P] (nearest first)."""

    def __call__(self, pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor: ...


class AssemblePromptsFn(Protocol):
    """prefix [C, 1, W], suffix [C, S, W], contexts [E, n_ctx, W] -> token embeddings [E * C, L, W]."""

    def __call__(self, prefix: torch.Tensor, suffix: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class OpTable:
    """The op implementations one run uses, and the backend name behind each. ``gate_score_clients`` is
    ``gate_score`` over a leading axis of clients (every tensor [M, ...]; lock-step clients in one launch), always
    from the same backend as ``gate_score``."""

    gate_score: GateScoreFn
    knn: KnnFn
    assemble_prompts: AssemblePromptsFn
    backends: Mapping[str, str] = field(default_factory=lambda: dict.fromkeys(OPS, "reference"))
    gate_score_clients: GateScoreFn = reference.gate_score_clients

    def describe(self) -> str:
        """One log line: which backend runs each op."""
        return "ops: " + ", ".join(f"{op}={backend}" for op, backend in self.backends.items())


REFERENCE = OpTable(gate_score=reference.gate_score, knn=reference.knn, assemble_prompts=reference.assemble_prompts)

# backend name -> module path, in order of preference
_FUSED_MODULES = {
    "triton": "pfedmoap.ops.triton_gate",
    "cpp": "pfedmoap.ops.cpp",
    "factored": "pfedmoap.ops.factored",
}
_IMPLS: dict[str, dict[str, object]] = {"reference": {name: getattr(reference, name) for name in OPS}}
_CLIENT_AXIS: dict[str, object] = {"reference": reference.gate_score_clients}  # gate_score_clients per backend
_UNAVAILABLE: dict[str, str] = {}
_MODULES: dict[str, ModuleType] = {}  # the fused backends that imported, by name
_LOADED = False


def _load_fused() -> None:
    """Import the fused backends once; a backend that cannot run here is recorded with its reason."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name, path in _FUSED_MODULES.items():
        try:
            module: ModuleType = importlib.import_module(path)
        except ImportError as exc:  # e.g. triton not installed
            _UNAVAILABLE[name] = f"{type(exc).__name__}: {exc}"
            continue
        _MODULES[name] = module
        if not module.available():
            _UNAVAILABLE[name] = module.unavailable_reason()
            continue
        _IMPLS[name] = {op: getattr(module, op) for op in OPS if hasattr(module, op)}
        if hasattr(module, "gate_score_clients"):
            _CLIENT_AXIS[name] = module.gate_score_clients


def available_backends() -> dict[str, list[str]]:
    """For each op, the backends that can run in this process (the reference is always one)."""
    _load_fused()
    return {op: [b for b in BACKENDS if op in _IMPLS.get(b, {})] for op in OPS}


def unavailable_backends() -> dict[str, str]:
    """Fused backends that cannot run here, with the reason (for logs and error messages)."""
    _load_fused()
    return dict(_UNAVAILABLE)


def backend_warnings() -> list[str]:
    """Notes about fused backends that run here but deserve a look (e.g. an extension built for another torch)."""
    _load_fused()
    notes = [getattr(module, "build_warning", lambda: "")() for module in _MODULES.values()]
    return [note for note in notes if note]


def select_ops(fused: bool = False, pins: Mapping[str, str] | None = None) -> OpTable:
    """The op table for a run: with ``fused``, per op the first backend that implements it and can run here;
    otherwise the reference. ``pins`` forces a backend for some ops (benchmarks, tests) and raises ValueError
    when that backend cannot run the op here."""
    if fused or pins:
        _load_fused()
    chosen: dict[str, str] = {}
    for op in OPS:
        fused_choices = [b for b in BACKENDS if b != "reference" and op in _IMPLS.get(b, {})]
        chosen[op] = fused_choices[0] if (fused and fused_choices) else "reference"
    for op, backend in (pins or {}).items():
        if op not in OPS:
            raise ValueError(f"op={op!r} is not one of: {', '.join(OPS)}")
        if op not in _IMPLS.get(backend, {}):
            reason = _UNAVAILABLE.get(backend, "it does not implement this op")
            raise ValueError(f"backend={backend!r} cannot run {op} here: {reason}")
        chosen[op] = backend
    impls = {op: _IMPLS[backend][op] for op, backend in chosen.items()}
    clients = _CLIENT_AXIS[chosen["gate_score"]]
    return OpTable(**impls, backends=chosen, gate_score_clients=clients)  # type: ignore[arg-type]


__all__ = [
    "OPS",
    "REFERENCE",
    "AssemblePromptsFn",
    "GateScoreFn",
    "KnnFn",
    "OpTable",
    "available_backends",
    "backend_warnings",
    "select_ops",
    "unavailable_backends",
]
