"""Running the upper blocks of CLIP's towers on their cached inputs, with something added to each block's output.

Methods that adapt the towers' own blocks (pFedMMA's multi-modal adapters) leave the lower blocks frozen and
untouched, so each image's token states at the first adapted block are a constant: they are computed once
(:func:`vision_states`, cached with the client's features like any other) and every training step runs only the
adapted blocks on them (:func:`vision_from_states`). The text side is the same with each class's fixed sentence
(:func:`text_states`, :func:`text_from_states`). Without adapters the two halves give exactly the frozen model's
features (tests/test_pfedmma.py).

A block's adapter is a callable of its first LayerNorm's output ``LN1(x)`` whose result is added to the block's
output: ``out = h + MLP(LN2(h)) + adapter(LN1(x))`` with ``h = x + Attn(LN1(x))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from .clip import FrozenCLIP

Adapter = Callable[[torch.Tensor], torch.Tensor]


def check_blocks(blocks: Sequence[nn.Module], where: str) -> None:
    """Refuse blocks this module cannot run exactly (open_clip's pre-LN ``ResidualAttentionBlock``, batch first)."""
    for blk in blocks:
        needed = ("ln_1", "attention", "ls_1", "ln_2", "mlp", "ls_2")
        attn = getattr(blk, "attn", None)
        if not all(hasattr(blk, n) for n in needed) or not getattr(attn, "batch_first", False):
            raise ConfigError(f"{where}: its blocks are not open_clip's batch-first pre-LN residual attention blocks")


def vision_blocks(clip: FrozenCLIP) -> list[nn.Module]:
    """The image tower's transformer blocks; a ConfigError line when the tower is not a ViT."""
    visual = clip.model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(visual, "class_embedding"):
        raise ConfigError(
            f"model={clip.model_name}: its image tower is not a ViT (adapters in the image tower's blocks need one, "
            "e.g. pfedmoap-tiny-vit or ViT-B-16)"
        )
    check_blocks(blocks, f"model={clip.model_name}'s image tower")
    return list(blocks)


def text_blocks(clip: FrozenCLIP) -> list[nn.Module]:
    blocks = getattr(clip.text.transformer, "resblocks", None)
    if blocks is None:
        raise ConfigError(f"model={clip.model_name}: its text tower has no residual blocks to adapt")
    check_blocks(blocks, f"model={clip.model_name}'s text tower")
    return list(blocks)


def run_block(blk: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, adapter: Adapter | None) -> torch.Tensor:
    """One pre-LN residual block, plus ``adapter(LN1(x))`` on its output when given."""
    ln1 = blk.ln_1(x)
    h = x + blk.ls_1(blk.attention(q_x=ln1, attn_mask=mask))
    out = h + blk.ls_2(blk.mlp(blk.ln_2(h)))
    return out if adapter is None else out + adapter(ln1)


@torch.no_grad()
def vision_states(clip: FrozenCLIP, images: torch.Tensor, start: int) -> torch.Tensor:
    """Preprocessed images [N, 3, S, S] -> the token states entering image block ``start`` (0-based) [N, T, W]."""
    visual = clip.model.visual
    x = visual._embeds(images.to(clip.device))
    for blk in vision_blocks(clip)[:start]:
        x = blk(x)
    return x.float()


def vision_from_states(
    clip: FrozenCLIP, states: torch.Tensor, start: int, adapters: Sequence[Adapter | None] | None = None
) -> torch.Tensor:
    """Token states entering block ``start`` [B, T, W] -> L2-normalised image features [B, D], through blocks
    ``start``.. with ``adapters[k]`` on block ``start + k`` (differentiable)."""
    visual = clip.model.visual
    blocks = vision_blocks(clip)[start:]
    adapters = adapters or [None] * len(blocks)
    x = states.to(visual.conv1.weight.dtype)
    for blk, adapter in zip(blocks, adapters, strict=True):
        x = run_block(blk, x, None, adapter)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return F.normalize(pooled.float(), dim=-1)


@torch.no_grad()
def text_states(clip: FrozenCLIP, texts: list[str], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences -> (the token states entering text block ``start`` [C, L, W], run up to the longest end-of-text
    token L - 1; each sentence's end-of-text position [C])."""
    tower = clip.text
    tokens = clip.tokenize(texts)
    eot = tower.eot_positions(tokens)
    length = int(eot.max().item()) + 1
    x = tower.token_embedding(tokens[:, :length]).float() + tower.positional_embedding[:length].float()
    mask = tower.attn_mask[:length, :length]
    for blk in text_blocks(clip)[:start]:
        x = blk(x, attn_mask=mask)
    return x.float(), eot


def text_from_states(
    clip: FrozenCLIP,
    states: torch.Tensor,
    eot: torch.Tensor,
    start: int,
    adapters: Sequence[Adapter | None] | None = None,
) -> torch.Tensor:
    """Text token states entering block ``start`` [C, L, W] -> L2-normalised text features [C, D] (read at each
    sentence's end-of-text token), through blocks ``start``.. with ``adapters[k]`` on block ``start + k``."""
    tower = clip.text
    blocks = text_blocks(clip)[start:]
    adapters = adapters or [None] * len(blocks)
    length = states.shape[1]
    mask = tower.attn_mask[:length, :length]
    x = states
    for blk, adapter in zip(blocks, adapters, strict=True):
        x = run_block(blk, x, mask, adapter)
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device)]
    if isinstance(tower.text_projection, nn.Linear):
        x = tower.text_projection(x)
    elif tower.text_projection is not None:
        x = x @ tower.text_projection
    return F.normalize(x.float(), dim=-1)
