"""Federated prompt-learning methods on one shared round driver; each method is one file.

Built in: ``pfedmoap`` (the paper), ``pfedmoap-shared-gate`` (its aggregated-gate ablation), ``promptfl``,
``fedprox``, ``fedotp`` (FedOTP), ``fedpgp`` (FedPGP), ``promptfolio`` (PromptFolio), ``fedpha`` (FedPHA),
``fedtpg`` (FedTPG), ``pfedmma`` (pFedMMA), ``local`` (CoOp) and ``zeroshot``. A new method is a
:class:`Method` subclass in its own file, decorated with :func:`register_method` and imported below (or anywhere
before the run is configured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..federated.registry import method_class, register_method
from . import (  # noqa: F401  (registers them)
    dpfpl,
    fedotp,
    fedpgp,
    fedpha,
    fedprox,
    fedtpg,
    local,
    pfedmma,
    pfedmoap,
    promptfl,
    promptfolio,
    shared_gate,
    zeroshot,
)
from .base import ClientContext, EvalState, GlobalState, Method, Payload, PromptObjective, Upload

if TYPE_CHECKING:
    from ..config import Config


def create_method(cfg: Config) -> Method:
    """The method object ``cfg.method`` names, for this config."""
    return method_class(cfg.method).resolve(cfg)(cfg)


__all__ = [
    "ClientContext",
    "EvalState",
    "GlobalState",
    "Method",
    "Payload",
    "PromptObjective",
    "Upload",
    "create_method",
    "register_method",
]
