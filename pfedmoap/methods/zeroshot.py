"""Zero-shot CLIP: the handcrafted prompt "a photo of a {class}.", no training and no communication."""

from __future__ import annotations

from ..federated.client import Client
from ..federated.registry import register_method
from .base import EvalState, GlobalState, Method


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    help = 'zero-shot CLIP with "a photo of a {class}." (no training)'
    trains = False
    uploads = False

    def eval_state(self, state: GlobalState, client: Client) -> EvalState:
        return EvalState(("zeroshot",), None)

    def eval_needs_global(self, client: Client) -> bool:
        return False
