"""Contrastive pretraining of the tiny CLIPs (``pfedmoap-tiny``, a ResNet; ``pfedmoap-tiny-vit``, a ViT)
on captioned images of the synthetic world.

The federation needs a CLIP whose zero-shot accuracy on its target domain is well above chance but far from
perfect, so that prompt learning has something to learn. Pretraining on some styles of the synthetic world
(:data:`~pfedmoap.data.synthetic.PRETRAIN_STYLES`) and evaluating on the held-out ones gives exactly that,
offline and in about 10 CPU minutes. The default configuration's weights ship in the package
(``pfedmoap/model/weights/``); others are cached per configuration (see :func:`ensure_tiny_clip`).

The command line over this module is ``python -m pfedmoap.pretrain`` (:mod:`pfedmoap.pretrain`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base.errors import UserError
from ..base.files import cache_dir, read_bytes, replacing
from ..data.synthetic import CLASSNAMES, PRETRAIN_STYLES, STYLES, render, templates, to_model_input
from .model_configs import TINY_MODEL, TINY_MODELS, TINY_VIT_MODEL, open_clip_config, register_model_configs
from .text_encoder import TextTower

# Bump when the synthetic world, the model config or the training recipe changes in a way that the config
# fields do not capture, so that stale cached weights are not reused.
FORMAT_VERSION = 3
# image_size in pfedmoap-tiny.json: 64 px gives the ResNet tower a 2 x 2 grid before its attention pool, i.e.
# 4 local features per image (FedOTP transports between them and the prompts); 32 px would give only 1
_NATIVE_IMAGE_SIZE = 64
RENDER_SIZE = 32  # the synthetic world's images are drawn at 32 px (5x faster than 64) and resized, as CLIP does
_MAX_LOGIT_SCALE = math.log(100.0)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
EVAL_SEED = 12345  # the CLI's evaluation images stay the same whatever the training seed

# The default config's weights ship inside the package (pfedmoap/model/weights/), so a new user's first run needs no
# pretraining and every machine runs the same model (pretraining on another CPU type gives other weights).
# Rebuild with `python -m pfedmoap.pretrain --force --ship` after changing the world, the model or the recipe.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
# One shipped file per model (for its default_pretrain_config), each with its own SHA-256.
SHIPPED_SHA256 = {
    TINY_MODEL: "93efd76f7850f17368645cd6d644ed849e0ee9bb83bc4f5988235376defa6e60",
    TINY_VIT_MODEL: "f7d5b6a8cf1a263f6fe2366a01b62a0624296663799a45fb398585dbf3fbab6b",
}
# their zero-shot accuracy per style (EVAL_SEED, 50 images per class; `python -m pfedmoap.pretrain --eval`)
SHIPPED_ZERO_SHOT = {
    TINY_MODEL: {
        "photo": 0.999,
        "noisy": 0.975,
        "striped": 0.969,
        "cluttered": 0.992,
        "outline": 0.170,
        "faded": 0.497,
    },
    TINY_VIT_MODEL: {
        "photo": 0.977,
        "noisy": 0.845,
        "striped": 0.927,
        "cluttered": 0.908,
        "outline": 0.143,
        "faded": 0.360,
    },
}
# file name prefix per model (the ResNet's predates the ViT and keeps its name)
_FILE_PREFIX = {TINY_MODEL: "tiny-clip", TINY_VIT_MODEL: "tiny-clip-vit"}
_log = logging.getLogger("pfedmoap")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (and so the cache file name).

    The defaults are those of ``pfedmoap-tiny`` (the ResNet): about 10 minutes on 2 CPU cores (64 px input), and they
    leave the held-out styles (outline, faded) clearly above chance but far from solved. Each model's own defaults
    come from :func:`default_pretrain_config`.
    """

    steps: int = 800
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 50  # linear warm-up steps, then cosine decay to zero
    weight_decay: float = 0.1  # on weight matrices only
    seed: int = 0
    threads: int = 2  # torch threads; results are bit-identical only for the same thread count
    image_size: int = _NATIVE_IMAGE_SIZE  # model input size (a multiple of 32)
    render_size: int = RENDER_SIZE  # images are drawn at this size, then resized to image_size
    styles: tuple[str, ...] = PRETRAIN_STYLES
    model: str = TINY_MODEL  # one of TINY_MODELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "styles", tuple(self.styles))
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 2, f"batch_size must be at least 2, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.warmup >= 0, f"warmup must be non-negative, got {self.warmup}"),
            (self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}"),
            (self.seed >= 0, f"seed must be non-negative, got {self.seed}"),
            (self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (
                self.image_size >= 32 and self.image_size % 32 == 0,
                f"image_size must be a positive multiple of 32, got {self.image_size}",
            ),
            (self.render_size >= 8, f"render_size must be at least 8, got {self.render_size}"),
            (self.model in TINY_MODELS, f"model must be one of {', '.join(TINY_MODELS)}, got {self.model!r}"),
            (
                len(self.styles) > 0 and all(s in STYLES for s in self.styles),
                f"styles must be a non-empty subset of {', '.join(STYLES)}, got {self.styles!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def digest(self) -> str:
        """Short stable hash of the config and :data:`FORMAT_VERSION` (names the cache file).

        ``model`` counts only when it is not the default ``pfedmoap-tiny``, so that the ResNet's digests (and its
        shipped file's name) stay what they were before the field existed."""
        fields = dataclasses.asdict(self)
        if self.model == TINY_MODEL:
            del fields["model"]
        blob = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_pretrain_config(model: str = TINY_MODEL) -> PretrainConfig:
    """The config whose weights ship for ``model`` (one of :data:`TINY_MODELS`)."""
    if model == TINY_VIT_MODEL:
        # see the README's tiny-CLIP section for the experiments behind these numbers
        return PretrainConfig(model=model, **_VIT_DEFAULTS)
    return PretrainConfig(model=model)


_VIT_DEFAULTS: dict = dict(steps=4000, batch_size=256, lr=2e-3, warmup=100, threads=1, image_size=32)


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning, which is expected before pretraining."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def create_tiny_clip(
    image_size: int | None = None, pretrained: str | os.PathLike | None = None, model: str = TINY_MODEL
):
    """A ``model`` (default ``pfedmoap-tiny``) open_clip model (random weights unless ``pretrained`` is a weights
    file), with input size ``image_size`` (default: the config's own)."""
    native = open_clip_config(model)["vision_cfg"]["image_size"]
    kwargs = {} if image_size is None or image_size == native else {"force_image_size": image_size}
    weights = None if pretrained is None else str(pretrained)
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        return open_clip.create_model(model, pretrained=weights, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)


def _caption_tokens(tokenizer, styles: Sequence[int]) -> torch.Tensor:
    """All captions, tokenised once: [len(styles), n_classes, n_templates, context_length]."""
    counts = {len(templates(s)) for s in styles}
    if len(counts) != 1:
        raise ValueError("every style needs the same number of caption templates")
    texts = [t.format(name) for s in styles for name in CLASSNAMES for t in templates(s)]
    tokens = tokenizer(texts)
    return tokens.view(len(styles), len(CLASSNAMES), counts.pop(), -1)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(cfg: PretrainConfig, progress: bool = True, losses: list[float] | None = None) -> dict:
    """Train the tiny CLIP from scratch and return its ``state_dict`` (CPU tensors).

    Each step draws a fresh batch of images (classes and styles uniform over ``cfg.styles``) with a random
    caption template each, and minimises the symmetric CLIP loss. Deterministic for a given config.
    If ``losses`` is given, the loss of every step is appended to it.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # results depend on the thread count, so fix it
    try:
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model = create_tiny_clip(cfg.image_size, model=cfg.model)
        # channels_last makes the small convolutions of the ResNet tower about 30% faster on CPU (a ViT has one
        # patch-embedding convolution and gains nothing)
        layout = torch.channels_last if cfg.model == TINY_MODEL else torch.contiguous_format
        model.visual.to(memory_format=layout)
        model.train()
        tokenizer = open_clip.get_tokenizer(cfg.model)
        style_ids = np.array([STYLES.index(s) for s in cfg.styles])
        table = _caption_tokens(tokenizer, style_ids)
        n_templates = table.shape[2]

        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # fused: the 3.2M-entry token embedding makes the per-tensor AdamW loop a large share of each step
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
        targets = torch.arange(cfg.batch_size)
        # the library's own text pass: captions are far shorter than the context, and with a causal mask the
        # padding after the end-of-text token cannot change the pooled feature, so it runs only up to it
        text_tower = TextTower.from_model(model, cfg.model)

        bar = tqdm(range(cfg.steps), desc="pretraining tiny CLIP", unit="step", disable=not progress)
        for step in bar:
            labels = rng.integers(0, len(CLASSNAMES), cfg.batch_size)
            style_pos = rng.integers(0, len(style_ids), cfg.batch_size)
            template = rng.integers(0, n_templates, cfg.batch_size)
            images = to_model_input(render(labels, style_ids[style_pos], rng, cfg.render_size), cfg.image_size)
            images = images.contiguous(memory_format=layout)
            tokens = table[torch.from_numpy(style_pos), torch.from_numpy(labels), torch.from_numpy(template)]

            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            image_features = model.encode_image(images, normalize=True)
            text_features = F.normalize(text_tower.encode_tokens(tokens), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.T
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)

            value = loss.item()
            if losses is not None:
                losses.append(value)
            if step % 10 == 0 or step == cfg.steps - 1:
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        bar.close()
        # contiguous copies: a plain, layout-independent state_dict for the weights file
        return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(previous_threads)


@torch.no_grad()
def zero_shot_accuracy(
    model,
    tokenizer,
    styles: Sequence[str | int],
    n_per_class: int = 50,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    batch_size: int = 500,
    render_size: int = RENDER_SIZE,
) -> dict[str, float]:
    """Zero-shot top-1 accuracy per style with prompts ``"a photo of a {classname}."``.

        Renders ``n_per_class`` fresh images per class and style (from a generator seeded by ``seed`` and the
        style, so a style's images do not depend on which other styles are evaluated), drawn at ``render_size``
    and resized to the model's input size. ``classes`` restricts
        both the images and the candidate prompts to a subset of class ids (default: all 40). The model is put
        in eval mode (BatchNorm) for the evaluation and its previous mode is restored afterwards.
    """
    class_ids = np.arange(len(CLASSNAMES)) if classes is None else np.asarray(classes, dtype=np.int64)
    if n_per_class < 1 or class_ids.size == 0:
        raise ValueError("need at least one class and one image per class")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    was_training = model.training
    model.eval()
    try:
        prompts = tokenizer([ZERO_SHOT_TEMPLATE.format(CLASSNAMES[c]) for c in class_ids])
        text_features = model.encode_text(prompts, normalize=True)
        results: dict[str, float] = {}
        for style in styles:
            style_id = STYLES.index(style) if isinstance(style, str) else int(style)
            rng = np.random.default_rng([seed, style_id])
            targets = np.repeat(np.arange(class_ids.size), n_per_class)  # positions in class_ids
            images = render(class_ids[targets], np.full(targets.size, style_id), rng, render_size)
            correct = 0
            for start in range(0, targets.size, batch_size):
                x = to_model_input(images[start : start + batch_size], image_size)
                pred = (model.encode_image(x, normalize=True) @ text_features.T).argmax(dim=-1)
                correct += int((pred.numpy() == targets[start : start + batch_size]).sum())
            results[STYLES[style_id]] = correct / targets.size
        return results
    finally:
        model.train(was_training)


def weights_path(cfg: PretrainConfig, cache: Path | str | None = None) -> Path:
    """Cache file for ``cfg`` (whether or not it exists yet)."""
    return (cache_dir() if cache is None else Path(cache)) / f"{_FILE_PREFIX[cfg.model]}-{cfg.digest()}.pt"


def shipped_path(cfg: PretrainConfig | None = None) -> Path:
    """Where the package's own weights for ``cfg`` (default: ``pfedmoap-tiny``'s default config) would be (they exist
    for each model's :func:`default_pretrain_config` only)."""
    cfg = PretrainConfig() if cfg is None else cfg
    return SHIPPED_DIR / f"{_FILE_PREFIX[cfg.model]}-{cfg.digest()}.safetensors"


_verified: dict[Path, bool] = {}


def installed_copy(path: Path) -> Path | None:
    """The same file in the installed pfedmoap distribution, when this process imports another copy of the
    package: a Flower FAB carries only source files (``.py``, ``.json``, ...), so the ClientApp and ServerApp code
    unpacked from it has no weights folder, while the environment's pfedmoap (a regular or an editable install)
    has them."""
    from importlib import metadata

    relative = path.relative_to(SHIPPED_DIR.parents[2])  # pfedmoap/model/weights/<name>, from the package's folder
    try:
        dist = metadata.distribution("pfedmoap")
    except metadata.PackageNotFoundError:
        return None
    candidates = [Path(str(dist.locate_file(relative)))]
    direct = dist.read_text("direct_url.json")  # an editable install points at its project folder
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            candidates.append(Path(url.removeprefix("file://")) / relative)
    return next((c for c in candidates if c.is_file()), None)


def shipped_weights(cfg: PretrainConfig | None = None) -> Path | None:
    """The shipped weights for ``cfg`` if the package (or, for code unpacked from a Flower FAB, the installed
    distribution) has them, else None. A shipped file that cannot be read or fails its SHA-256 check is a damaged
    install: one UserError line (pretraining a replacement would quietly give this machine another model than
    everyone else's)."""
    path = shipped_path(cfg)
    if not path.exists():
        path = installed_copy(path) or path
    if not path.exists():
        return None
    if path not in _verified:
        digest = hashlib.sha256(read_bytes(path, "the shipped tiny-CLIP weights")).hexdigest()
        _verified[path] = digest == SHIPPED_SHA256[(PretrainConfig() if cfg is None else cfg).model]
    if not _verified[path]:
        raise UserError(
            f"the shipped tiny-CLIP weights {str(path)!r} fail their SHA-256 check (a damaged install): reinstall "
            "pfedmoap (pip install --force-reinstall .), or pass --pretrained with a weights file of your own"
        )
    return path


def ensure_tiny_clip(
    cache: Path | str | None = None,
    progress: bool = True,
    cfg: PretrainConfig | None = None,
    force: bool = False,
) -> Path:
    """Path of the tiny-CLIP weights for ``cfg`` (default config): the ones shipped in the package when they are
    for ``cfg`` and intact, else the cached ones, pretraining them first if missing.

    The file is a plain ``state_dict``, loadable with ``open_clip.create_model(cfg.model, pretrained=path)`` (this
    function registers the configs with open_clip). It is written to a temporary
    file in the cache folder and renamed into place, so an interrupted pretraining never leaves a partial
    file, and concurrent processes at worst both train and one rename wins. ``force`` retrains even if the
    file exists (and skips the shipped weights).
    """
    cfg = PretrainConfig() if cfg is None else cfg
    register_model_configs()  # so that the returned path loads with open_clip.create_model right away
    shipped = None if force else shipped_weights(cfg)
    if shipped is not None:
        return shipped
    path = weights_path(cfg, cache)
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)  # fail on an unusable cache before minutes of training
    state = pretrain(cfg, progress=progress)
    with replacing(path, binary=True) as f:  # concurrent writers each use their own temporary name
        torch.save(state, f)
    return path


def ship(path: Path, cfg: PretrainConfig) -> Path:
    """Write the weights at ``path`` into the package (float32 safetensors, named by the config digest)."""
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    out = shipped_path(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "model": cfg.model, "pretrain_digest": cfg.digest()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    _verified.pop(out, None)
    return out
