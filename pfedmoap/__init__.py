"""pfedmoap: personalised federated prompt learning for CLIP (pFedMoAP, ICLR 2025), fast and faithful.

    from pfedmoap import make_config, run
    history = run(make_config("synthetic", rounds=3))

The building blocks are public for research code: :class:`PromptEncoder`, :class:`AttentionGate`,
:class:`Client`, :class:`Server`, the partitioners in :mod:`pfedmoap.data.partition`, the dataset registry
(:func:`create_dataset`, :func:`register_dataset`) and the methods (:func:`register_method`).
"""

__version__ = "0.1.0"

from .client import Client  # noqa: E402
from .clip import FrozenCLIP, load_clip  # noqa: E402
from .config import Config, list_presets, make_config  # noqa: E402
from .data import create_dataset, list_datasets, register_dataset  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402
from .federation import Federation, History, run  # noqa: E402
from .gate import AttentionGate, pfedmoap_logits, reduce_features  # noqa: E402
from .methods import Method, create_method, register_method  # noqa: E402
from .prompt import PromptEncoder  # noqa: E402
from .server import Server  # noqa: E402

__all__ = [
    "AttentionGate",
    "Client",
    "Config",
    "ConfigError",
    "Federation",
    "FrozenCLIP",
    "History",
    "Method",
    "PromptEncoder",
    "Server",
    "UserError",
    "__version__",
    "create_dataset",
    "create_method",
    "list_datasets",
    "list_presets",
    "load_clip",
    "make_config",
    "pfedmoap_logits",
    "reduce_features",
    "register_dataset",
    "register_method",
    "run",
]
