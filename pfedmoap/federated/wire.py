"""Communication: what crosses the wire, in the dtype it crosses in, and how many bytes that is."""

from __future__ import annotations

from collections.abc import Iterable

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def wire_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def to_wire(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """The tensor as sent: detached, on CPU, cast to the wire dtype (lossy for float16 / bfloat16)."""
    return t.detach().to("cpu", _DTYPES[dtype]).clone()


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors' data, dtype-aware."""
    return sum(int(t.numel()) * t.element_size() for t in tensors)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
