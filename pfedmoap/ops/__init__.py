"""Hot ops behind one dispatch point: a plain-torch reference twin per op, and fused backends where built.

``select_backends(fused=...)`` picks, per op, the implementation that can run here and returns the names
so the CLI can log them in one line. Until the fused backend (Triton kernels, the ``pfedmoap._C``
extension) is built, every op runs its reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable

from . import reference

OPS = ("gate_attention", "gate_score", "knn", "assemble_prompts")

_IMPLS: dict[str, dict[str, Callable]] = {
    "reference": {name: getattr(reference, name) for name in OPS},
}
_ACTIVE: dict[str, str] = dict.fromkeys(OPS, "reference")


def available_backends() -> dict[str, list[str]]:
    """For each op, the backends that can run in this process."""
    return {op: [b for b, impls in _IMPLS.items() if op in impls] for op in OPS}


def select_backends(fused: bool) -> dict[str, str]:
    """Choose a backend per op; returns {op: backend}. With ``fused`` the first non-reference one wins."""
    for op in OPS:
        choices = [b for b, impls in _IMPLS.items() if op in impls and b != "reference"]
        _ACTIVE[op] = choices[0] if (fused and choices) else "reference"
    return dict(_ACTIVE)


def active_backends() -> dict[str, str]:
    return dict(_ACTIVE)


def fused_available() -> bool:
    return any(b != "reference" for b in _IMPLS)


def gate_attention(*args, **kwargs):
    return _IMPLS[_ACTIVE["gate_attention"]]["gate_attention"](*args, **kwargs)


def gate_score(*args, **kwargs):
    return _IMPLS[_ACTIVE["gate_score"]]["gate_score"](*args, **kwargs)


def knn(*args, **kwargs):
    return _IMPLS[_ACTIVE["knn"]]["knn"](*args, **kwargs)


def assemble_prompts(*args, **kwargs):
    return _IMPLS[_ACTIVE["assemble_prompts"]]["assemble_prompts"](*args, **kwargs)
