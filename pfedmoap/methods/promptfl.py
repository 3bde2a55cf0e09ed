"""PromptFL: one global prompt, trained locally and averaged (FedAvg); evaluated with the global prompt."""

from __future__ import annotations

from ..federated.registry import register_method
from .base import Method


@register_method
class PromptFL(Method):
    name = "promptfl"
    help = "PromptFL: one FedAvg'd prompt, clients evaluated with it"
