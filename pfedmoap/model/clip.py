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

from ..base.errors import ConfigError
from ..base.files import first_line
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

    @property
    def local_feature_kind(self) -> str | None:
        """Which local (pre-pooling) features the image tower exposes: "attnpool" (a ModifiedResNet: the spatial
        outputs of its attention pool), "tokens" (a ViT: its patch tokens, projected), or None."""
        visual = self.model.visual
        if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
            return "attnpool"
        if hasattr(visual, "output_tokens") and getattr(visual, "proj", None) is not None:
            return "tokens"
        return None

    @property
    def local_feature_count(self) -> int:
        """M, the number of local features per image (0 when the tower exposes none)."""
        visual, kind = self.model.visual, self.local_feature_kind
        if kind == "attnpool":
            return int(visual.attnpool.positional_embedding.shape[0]) - 1
        if kind == "tokens":
            grid = visual.grid_size
            return int(grid[0] * grid[1])
        return 0

    @torch.no_grad()
    def encode_local_images(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N, 3, S, S] -> L2-normalised local features [N, M, D] (no grad).

        ModifiedResNet (RN50, pfedmoap-tiny): the M = (S / 32)^2 spatial outputs of the attention pool, i.e. the
        pooled token's attention computed for every position too (FedOTP's local features); its token 0 is the
        usual image embedding. ViT: the patch tokens after ``ln_post``, projected by ``proj``.
        """
        visual = self.model.visual
        x = images.to(self.device)
        kind = self.local_feature_kind
        if kind == "attnpool":
            feats = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
            feats = _attention_pool_all(visual.attnpool, feats)[:, 1:]
        elif kind == "tokens":
            previous = visual.output_tokens
            visual.output_tokens = True
            try:
                _, tokens = visual(x)
            finally:
                visual.output_tokens = previous
            feats = tokens @ visual.proj
        else:
            raise ConfigError(
                f"model={self.model_name}: its image tower exposes no local features "
                "(supported: ModifiedResNet towers such as RN50 and pfedmoap-tiny, and ViTs)"
            )
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain text (already tokenised) -> L2-normalised features, through the truncated encoder."""
        return F.normalize(self.text.encode_tokens(tokens).float(), dim=-1)

    @torch.no_grad()
    def zero_shot_text_features(self, classnames: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
        texts = [template.format(c.replace("_", " ")) for c in classnames]
        return self.encode_text_tokens(self.tokenize(texts))


def _attention_pool_all(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` with every output position kept: [N, C, H, W] -> [N, 1 + HW, D]. The pool
    returns only position 0 (the mean token); its queries for the spatial positions are FedOTP's local features."""
    seq = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
    seq = torch.cat([seq.mean(dim=0, keepdim=True), seq], dim=0)
    seq = seq + pool.positional_embedding[:, None, :].to(seq.dtype)
    out, _ = F.multi_head_attention_forward(
        query=seq,
        key=seq,
        value=seq,
        embed_dim_to_check=seq.shape[-1],
        num_heads=pool.num_heads,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        training=False,
        need_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
    )
    return out.permute(1, 0, 2)


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

    ``pretrained`` is "synthetic" (the embedded tiny model: weights shipped in the package), "none"
    (random weights, for tests and benchmarks), a path to a weights file, or an open_clip pretrained tag.
    """
    import open_clip

    from .model_configs import TINY_MODEL, TINY_MODELS, register_model_configs

    register_model_configs()
    known = open_clip.list_models()
    if model_name not in known:
        close = [m for m in known if m.lower().startswith(model_name.lower()[:3])][:8]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"model={model_name!r} is not an open_clip architecture{hint}; see open_clip.list_models()")

    weights: str | None
    from_file = False  # weights from a file on disk (given, or the tiny CLIP's), not an open_clip tag
    if pretrained == "synthetic":
        if model_name not in TINY_MODELS:
            raise ConfigError(
                f"pretrained='synthetic' exists only for model={' or '.join(TINY_MODELS)}; for {model_name} use an "
                "open_clip tag (e.g. openai), a weights file, or none"
            )
        from .pretraining import default_pretrain_config, ensure_tiny_clip

        cfg = default_pretrain_config(model_name)
        weights, from_file = str(ensure_tiny_clip(progress=progress, cfg=cfg)), True
    elif pretrained == "none":
        weights = None
    elif os.path.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(pretrained).is_file():
            raise ConfigError(f"pretrained={pretrained!r}: no such weights file")
        weights, from_file = pretrained, True
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
    except Exception as exc:  # noqa: BLE001 - see below
        # a file: torch's unpickler and safetensors raise anything (IndexError, EOFError, UnpicklingError, ...) on a
        # damaged, truncated, empty or foreign file, and a state dict of another architecture is a RuntimeError;
        # a tag: a download refused offline. Anything else from open_clip is a bug, with its traceback.
        if not from_file and not isinstance(exc, (RuntimeError, OSError, ValueError)):
            raise
        where = f" (file {weights})" if from_file and weights != pretrained else ""
        raise ConfigError(
            f"pretrained={pretrained!r}{where} cannot be loaded as {model_name} weights: {first_line(exc)}"
        ) from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return FrozenCLIP(model, tokenizer, model_name, device)
