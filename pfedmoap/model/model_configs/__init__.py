"""open_clip model configs shipped with pfedmoap.

open_clip only knows the configs in its own package folder; :func:`register_model_configs` adds this folder
so that ``open_clip.create_model(TINY_MODEL)`` and ``open_clip.get_tokenizer(TINY_MODEL)`` work (and the same for
:data:`TINY_VIT_MODEL`).
"""

from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).resolve().parent
TINY_MODEL = "pfedmoap-tiny"  # ModifiedResNet image tower
TINY_VIT_MODEL = "pfedmoap-tiny-vit"  # VisionTransformer image tower
TINY_MODELS = (TINY_MODEL, TINY_VIT_MODEL)  # the configs in this folder, each with shipped synthetic weights


def register_model_configs() -> None:
    """Make the configs in this folder known to open_clip (safe to call any number of times)."""
    # add_model_config appends to a global path list and rescans every time, so only add the folder once.
    known = open_clip.list_models()
    if all(name in known for name in TINY_MODELS):
        return
    open_clip.add_model_config(CONFIG_DIR)


def open_clip_config(name: str) -> dict | None:
    """An open_clip architecture's config (this folder's included), without loading any weights; None for a name
    open_clip does not know."""
    register_model_configs()
    return open_clip.get_model_config(name)


def text_width(config: dict) -> int:
    """The token width W of a config's text tower (open_clip's CLIPTextCfg default when it names none)."""
    return int(config.get("text_cfg", {}).get("width", 512))
