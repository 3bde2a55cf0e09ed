"""Hot ops behind one dispatch point: a plain-torch reference twin per op, and fused backends where built.

Backends, in order of preference for ``--fused``:

- ``triton``: the fused gate-and-score kernels in ``pfedmoap.kernels`` (needs CUDA, or TRITON_INTERPRET=1
  set before import, which runs them on CPU tensors, slowly: for tests);
- ``cpp``: the compiled extension ``pfedmoap._C`` (batched expert prompt assembly and KNN; CPU with OpenMP,
  and CUDA when it was built with nvcc);
- ``factored``: the Triton kernels' algebra in plain torch (the gate's logits without building T_MoE), for
  CPUs and wherever Triton cannot run;
- ``reference``: plain torch (``reference.py``), always present; what every fused op is tested against.

A backend module exposes ``available() -> bool``, ``unavailable_reason() -> str`` and one function per op
it implements, with the reference signature. ``select_backends(fused=...)`` picks, per op, the first
backend that implements it and can run here, and returns the names so the CLI can log them in one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

from . import reference

OPS = ("gate_attention", "gate_score", "knn", "assemble_prompts")

# backend name -> module path, in order of preference
_FUSED_MODULES = {
    "triton": "pfedmoap.ops.triton_gate",
    "cpp": "pfedmoap.ops.cpp",
    "factored": "pfedmoap.ops.factored",
}

_IMPLS: dict[str, dict[str, Callable]] = {"reference": {name: getattr(reference, name) for name in OPS}}
_UNAVAILABLE: dict[str, str] = {}
_ACTIVE: dict[str, str] = dict.fromkeys(OPS, "reference")
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
        if not module.available():
            _UNAVAILABLE[name] = module.unavailable_reason()
            continue
        _IMPLS[name] = {op: getattr(module, op) for op in OPS if hasattr(module, op)}


def available_backends() -> dict[str, list[str]]:
    """For each op, the backends that can run in this process (the reference is always one)."""
    _load_fused()
    return {op: [b for b, impls in _IMPLS.items() if op in impls] for op in OPS}


def unavailable_backends() -> dict[str, str]:
    """Fused backends that cannot run here, with the reason (for logs and error messages)."""
    _load_fused()
    return dict(_UNAVAILABLE)


def select_backends(fused: bool) -> dict[str, str]:
    """Choose a backend per op; returns {op: backend}. With ``fused`` the first non-reference one wins."""
    if fused:
        _load_fused()
    for op in OPS:
        choices = [b for b, impls in _IMPLS.items() if op in impls and b != "reference"]
        _ACTIVE[op] = choices[0] if (fused and choices) else "reference"
    return dict(_ACTIVE)


def use_backend(op: str, backend: str) -> None:
    """Pin one op to one backend (benchmarks and tests); raises ValueError if it cannot run here."""
    _load_fused()
    if op not in OPS:
        raise ValueError(f"op={op!r} is not one of: {', '.join(OPS)}")
    if op not in _IMPLS.get(backend, {}):
        reason = _UNAVAILABLE.get(backend, "it does not implement this op")
        raise ValueError(f"backend={backend!r} cannot run {op} here: {reason}")
    _ACTIVE[op] = backend


def active_backends() -> dict[str, str]:
    return dict(_ACTIVE)


def describe(backends: dict[str, str]) -> str:
    """One log line: which backend runs each op."""
    return "ops: " + ", ".join(f"{op}={backend}" for op, backend in backends.items())


def gate_attention(*args, **kwargs):
    return _IMPLS[_ACTIVE["gate_attention"]]["gate_attention"](*args, **kwargs)


def gate_score(*args, **kwargs):
    return _IMPLS[_ACTIVE["gate_score"]]["gate_score"](*args, **kwargs)


def knn(*args, **kwargs):
    return _IMPLS[_ACTIVE["knn"]]["knn"](*args, **kwargs)


def assemble_prompts(*args, **kwargs):
    return _IMPLS[_ACTIVE["assemble_prompts"]]["assemble_prompts"](*args, **kwargs)
