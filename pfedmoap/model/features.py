"""Image features from the frozen image encoder: computed once per image, or per batch with augmentation."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.registry import LabeledImages
from ..data.synthetic import to_model_input
from .clip import FrozenCLIP


def _gather(images, idx: np.ndarray) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx, dtype=torch.long)]
    return torch.stack([images[int(i)] for i in idx])


def encode_images(
    clip: FrozenCLIP, images: torch.Tensor, batch_size: int = 512, local: bool = False, states_from: int | None = None
) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> normalised features [N, D] (float32, on the CLIP device); with ``local``, the
    local features [N, M, D] instead (:meth:`FrozenCLIP.encode_local_images`); with ``states_from`` = k, the ViT's
    token states entering block k [N, T, W] (:func:`~pfedmoap.model.towers.vision_states`)."""
    if states_from is not None:
        from .towers import vision_states

        def encode(batch: torch.Tensor) -> torch.Tensor:
            return vision_states(clip, batch, states_from)
    else:
        encode = clip.encode_local_images if local else clip.encode_images
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size], clip.image_size, clip.mean, clip.std)
        out.append(encode(batch))
    if not out:
        if states_from is not None:
            blank = torch.zeros(1, 3, clip.image_size, clip.image_size, device=clip.device)
            return encode(blank)[:0]
        empty = (0, clip.local_feature_count, clip.embed_dim) if local else (0, clip.embed_dim)
        return torch.zeros(*empty, device=clip.device)
    return torch.cat(out)


def encode_subset(
    clip: FrozenCLIP,
    data: LabeledImages,
    indices: np.ndarray,
    batch_size: int = 512,
    progress: bool = False,
    desc: str = "image features",
    local: bool = False,
    states_from: int | None = None,
) -> torch.Tensor:
    """Features of ``data`` rows ``indices`` (in that order), encoded once in batches (``local``: the local
    features [n, M, D]; ``states_from``: a ViT's token states entering that block)."""
    chunks = []
    steps = range(0, len(indices), batch_size)
    for start in tqdm(steps, desc=desc, disable=not progress, leave=False):
        imgs = _gather(data.images, indices[start : start + batch_size])
        chunks.append(encode_images(clip, imgs, batch_size, local=local, states_from=states_from))
    if not chunks:
        blank = torch.zeros(0, 3, clip.image_size, clip.image_size, dtype=torch.uint8)
        return encode_images(clip, blank, local=local, states_from=states_from)
    return torch.cat(chunks)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random translation (reflect-pad then crop back) and horizontal flip, from ``generator``
    so that augmented runs stay reproducible per client."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images, dtype=torch.float32)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out.round().clamp(0, 255).to(torch.uint8)
