"""Federated prompt-learning methods on one shared round loop; only what differs lives here."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .base import EvalState, Method, Payload
from .local import LocalOnly
from .pfedmoap import PFedMoAP
from .promptfl import FedProx, PromptFL
from .zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (PFedMoAP, PromptFL, FedProx, LocalOnly, ZeroShot)}


def register_method(cls: type[Method]) -> type[Method]:
    """Make a Method subclass available by its ``name`` (usable as a decorator)."""
    METHODS[cls.name] = cls
    return cls


def create_method(cfg: Config) -> Method:
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not one of: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method](cfg)


__all__ = ["METHODS", "EvalState", "Method", "Payload", "create_method", "register_method"]
