"""pfedmoap: personalised federated prompt learning for CLIP (pFedMoAP, ICLR 2025), fast and faithful.

    from pfedmoap import make_config, resume, run
    history = run(make_config("synthetic", rounds=3), out="runs/demo")
    history = run(make_config("synthetic", rounds=3), engine="flower")  # pip install 'pfedmoap[flower]'
    history = resume("runs/demo")  # a killed run, on the engine that made it

The building blocks are public for research code: :class:`PromptEncoder`, the gates (:class:`AttentionGate`,
:class:`LinearGate`, :func:`register_gate`), :class:`Client`, :class:`Server`, the round driver
(:class:`RoundDriver`, :class:`RoundRecord`), the world (:class:`World`), the partitioners in
:mod:`pfedmoap.data.partition`, the dataset registry (:func:`create_dataset`, :func:`register_dataset`), the
methods (:class:`Method`, :func:`register_method`) and the op tables (:func:`select_ops`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__

# names are loaded on first use (pfedmoap._lazy): the Flower ClientApp must import without torch
_EXPORTS = {
    "Client": "federated.client",
    "FrozenCLIP": "model.clip",
    "load_clip": "model.clip",
    "Config": "config",
    "list_presets": "config",
    "make_config": "federated.plan",
    "resolve_config": "federated.plan",
    "create_dataset": "data",
    "list_datasets": "data",
    "register_dataset": "data",
    "ConfigError": "base.errors",
    "UserError": "base.errors",
    "Federation": "engine.federation",
    "AttentionGate": "gates",
    "Gate": "gates",
    "LinearGate": "gates",
    "create_gate": "gates",
    "pfedmoap_logits": "gates",
    "reduce_features": "gates",
    "resume": "api",
    "run": "api",
    "Method": "methods",
    "create_method": "methods",
    "OpTable": "ops",
    "Setting": "config.settings",
    "select_ops": "ops",
    "PromptEncoder": "federated.prompt",
    "register_gate": "federated.registry",
    "register_method": "federated.registry",
    "History": "engine.records",
    "RoundDriver": "engine.rounds",
    "RoundRecord": "engine.records",
    "Server": "federated.server",
    "World": "engine.world",
}

if TYPE_CHECKING:
    from .api import resume, run
    from .base.errors import ConfigError, UserError
    from .config import Config, list_presets
    from .config.settings import Setting
    from .data import create_dataset, list_datasets, register_dataset
    from .engine.federation import Federation
    from .engine.records import History, RoundRecord
    from .engine.rounds import RoundDriver
    from .engine.world import World
    from .federated.client import Client
    from .federated.plan import make_config, resolve_config
    from .federated.prompt import PromptEncoder
    from .federated.registry import register_gate, register_method
    from .federated.server import Server
    from .gates import AttentionGate, Gate, LinearGate, create_gate, pfedmoap_logits, reduce_features
    from .methods import Method, create_method
    from .model.clip import FrozenCLIP, load_clip
    from .ops import OpTable, select_ops


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "AttentionGate",
    "Client",
    "Config",
    "ConfigError",
    "Federation",
    "FrozenCLIP",
    "Gate",
    "History",
    "LinearGate",
    "Method",
    "OpTable",
    "PromptEncoder",
    "RoundDriver",
    "RoundRecord",
    "Server",
    "Setting",
    "UserError",
    "World",
    "__version__",
    "create_dataset",
    "create_gate",
    "create_method",
    "list_datasets",
    "list_presets",
    "load_clip",
    "make_config",
    "resolve_config",
    "pfedmoap_logits",
    "reduce_features",
    "register_dataset",
    "register_gate",
    "register_method",
    "resume",
    "run",
    "select_ops",
]
