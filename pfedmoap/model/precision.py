"""Numerical precision of a run (``--precision``): float32 everywhere, or bfloat16 autocast.

With ``bf16`` the frozen encoders' forward passes (image tower, text tower with the prompts spliced in) and the
training step's forward (the gate and the logits) run under ``torch.autocast(dtype=torch.bfloat16)``; the trained
tensors (prompts, gates: the "master" weights) and their SGD states stay float32, softmax and cross-entropy run in
float32 (autocast's own policy), the cached image features and every encoded text feature are kept in float32, and
the backward pass runs outside the autocast region (as torch recommends). The Triton gate kernels take the bf16
inputs as they are (:func:`pfedmoap.ops.triton_gate.gate_score`): their bf16 path, fp32 accumulation inside.

bfloat16 keeps float32's exponent range, so no loss scaling is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..base.errors import ConfigError
from ..config import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None: float32, no autocast)."""
    return _DTYPES.get(precision)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`ConfigError` (one line) unless ``device`` can run ``precision``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"precision={precision}: {name} has no native bfloat16 (needs compute capability 8.0+); "
                "use --precision fp32"
            )
    elif device.type != "cpu":
        raise ConfigError(f"precision={precision} is supported on cuda and cpu, not on device {device.type}")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast for ``precision`` on ``device``'s type (nothing for fp32). Wrap forward passes only."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    kind = device.type if isinstance(device, torch.device) else str(device)
    # no cast cache: a CUDA graph cannot capture it, and eager and captured steps then run the same casts
    with torch.autocast(kind, dtype=dtype, cache_enabled=False):
        yield
