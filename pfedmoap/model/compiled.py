"""``--compile``: the training step's text-encoder pass through ``torch.compile``, with an eager fallback.

What is compiled is the shared-prefix pass (``TextTower.encode_shared_prefix``: the text tower's blocks on one
client's or a lock-step group's contexts, forward and, through AOTAutograd, backward), the bulk of a step. It is
compiled with ``dynamic=False``: once per input shape (the local prompt alone, the K + 1 experts, a lock-step group),
each compilation cached for the rest of the run. A compilation that fails (no C++ compiler, an unsupported op) is
said once and the pass runs eagerly from then on: a run never fails because of ``--compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..base.files import first_line


class CompiledPass:
    """``fn`` through ``torch.compile(dynamic=False)`` when gradients are on (a training step); ``fn`` itself
    without them, and for good after a failed compilation (said once via ``log``)."""

    def __init__(self, fn: Callable[..., Any], log: Callable[[str], None], what: str = "the text-encoder pass"):
        self.fn = fn
        self.log = log
        self.what = what
        self.compiled: Callable[..., Any] | None = torch.compile(fn, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the training step's passes only: evaluation and the frozen experts run without grad, once per round, and a
        # no-grad graph would be one more compilation per shape
        if self.compiled is not None and torch.is_grad_enabled():
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager from now on, said once
                self.compiled = None
                self.log(f"--compile: torch.compile of {self.what} failed ({first_line(exc)}); it runs eagerly")
        return self.fn(*args, **kwargs)
