"""The frozen CLIP backbone: open_clip loading, image features, and the text tower (``text_encoder.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .text_encoder import TextTower


class FrozenCLIP:
    """An open_clip model with both encoders frozen in eval mode, plus its tokenizer.

    Not an ``nn.Module`` on purpose: nothing in it is ever trained, and clients share it read-only.
    """

    def __init__(self, model: nn.Module, tokenizer, model_name: str, device: torch.device):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.device = device
        self.text = TextTower.from_model(self.model, model_name)
        with torch.no_grad():
            # gamma = exp(logit_scale): frozen, a plain float from here on
            self.gamma = float(self.model.logit_scale.exp().item())
        visual = self.model.visual
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.mean = tuple(pre.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(pre.get("std", OPENAI_DATASET_STD))
        self.embed_dim = int(self.encode_text_tokens(self.tokenize(["a"])).shape[-1])

    @property
    def width(self) -> int:
        return self.text.width

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N, 3, S, S] -> L2-normalised image features [N, D] (no grad)."""
        feats = self.model.encode_image(images.to(self.device))
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain text (already tokenised) -> L2-normalised features, through the truncated encoder."""
        return F.normalize(self.text.encode_tokens(tokens).float(), dim=-1)

    @torch.no_grad()
    def zero_shot_text_features(self, classnames: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
        texts = [template.format(c.replace("_", " ")) for c in classnames]
        return self.encode_text_tokens(self.tokenize(texts))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """open_clip logs its load failures and random-init warnings on the root logger; the caller reports
    failures itself in one line, so silence those records while the model is created."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def load_clip(model_name: str, pretrained: str, device: torch.device, progress: bool = True) -> FrozenCLIP:
    """Load an open_clip model by architecture name and weights.

    ``pretrained`` is "synthetic" (the embedded tiny model, pretrained on first use and cached), "none"
    (random weights, for tests and benchmarks), a path to a weights file, or an open_clip pretrained tag.
    """
    import open_clip

    from .model_configs import TINY_MODEL, register_model_configs

    register_model_configs()
    known = open_clip.list_models()
    if model_name not in known:
        close = [m for m in known if m.lower().startswith(model_name.lower()[:3])][:8]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"model={model_name!r} is not an open_clip architecture{hint}; see open_clip.list_models()")

    weights: str | None
    if pretrained == "synthetic":
        if model_name != TINY_MODEL:
            raise ConfigError(
                f"pretrained='synthetic' exists only for model={TINY_MODEL}; for {model_name} use an "
                "open_clip tag (e.g. openai), a weights file, or none"
            )
        from .pretrain import ensure_tiny_clip

        weights = str(ensure_tiny_clip(progress=progress))
    elif pretrained == "none":
        weights = None
    elif os.path.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(pretrained).is_file():
            raise ConfigError(f"pretrained={pretrained!r}: no such weights file")
        weights = pretrained
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            valid = ", ".join(["synthetic" if model_name == TINY_MODEL else "", "none", *tags]).strip(", ")
            raise ConfigError(f"pretrained={pretrained!r} is not a tag of {model_name} (valid: {valid}, or a file)")
        weights = pretrained
    try:
        # random weights ("none") come from a fixed seed so that runs stay repeatable
        with torch.random.fork_rng(devices=[]), _quiet_root_logger():
            torch.manual_seed(0)
            model = open_clip.create_model(model_name, pretrained=weights, device="cpu")
    except (RuntimeError, OSError, ValueError) as exc:  # download refused offline, or a file that is not these weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"pretrained={pretrained!r} for model={model_name} could not be loaded: {first}") from exc
    tokenizer = open_clip.get_tokenizer(model_name)
    return FrozenCLIP(model, tokenizer, model_name, device)
