"""Mixture gates: one module call from (image features, expert features, gamma, local logits, lambda) to logits.

``attention`` is the paper's gate (:class:`AttentionGate`); ``linear`` its linear-projection ablation
(:class:`LinearGate`); ``average`` a learned weighted mean of the experts (:class:`AverageGate`). A new gate is
one file with a :class:`Gate` subclass decorated with
:func:`~pfedmoap.federated.registry.register_gate`, imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..federated.registry import gate_class, register_gate
from ..ops import REFERENCE, OpTable
from .attention import AttentionGate
from .average import AverageGate
from .base import Gate, mixture_scorer, pfedmoap_logits, reduce_features
from .linear import LinearGate

if TYPE_CHECKING:
    from ..config import Config


def create_gate(cfg: Config, ops: OpTable = REFERENCE) -> Gate:
    """A fresh gate of the kind ``cfg.gate`` names, with the run's op table."""
    return gate_class(cfg.gate).from_config(cfg, ops)


__all__ = [
    "AttentionGate",
    "AverageGate",
    "Gate",
    "LinearGate",
    "create_gate",
    "mixture_scorer",
    "pfedmoap_logits",
    "reduce_features",
    "register_gate",
]
