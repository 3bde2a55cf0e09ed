"""The CLIP text tower as a prompt encoder sees it: token embeddings in, EOT features out.

The encoder takes token *embeddings* (so learned context vectors can be spliced in) and runs the open_clip
tower's own modules. Two passes give the same features up to float rounding:

- :meth:`TextTower.encode_embeddings`, the plain one and the reference twin: every sequence through the causal
  transformer. Because CLIP's text transformer is causal and pools the EOT position, positions after the longest
  EOT never influence the features, so sequences are truncated to ``max(EOT) + 1`` tokens (SPEC §1).
- :meth:`TextTower.encode_shared_prefix`, the fast one: all C prompts of an expert share [SOS] + context, whose
  hidden states are then the same for every class; they are computed once per expert and each class's few
  suffix tokens attend to them (tests/test_text_encoder.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError


@dataclass
class TextTower:
    """The parts of an open_clip text tower that a prompt encoder needs (shared, never copied)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor  # [context_length, W]
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Linear | None
    attn_mask: torch.Tensor  # [context_length, context_length] additive causal mask
    pool_type: str  # "argmax" (EOT = highest token id) or "eos"
    eos_token_id: int | None
    context_length: int

    @property
    def width(self) -> int:
        return self.positional_embedding.shape[-1]

    @classmethod
    def from_model(cls, model: nn.Module, model_name: str = "model") -> TextTower:
        """Extract the tower from an open_clip ``CLIP`` or ``CustomTextCLIP``; refuse what cannot work."""
        owner = model.text if hasattr(model, "text") else model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        missing = [n for n in needed if getattr(owner, n, None) is None]
        if missing:
            raise ConfigError(
                f"model={model_name}: its text tower has no {', '.join(missing)}; prompt learning needs a "
                "CLIP-style transformer text tower (e.g. RN50, ViT-B-16, pfedmoap-tiny)"
            )
        attn_mask = getattr(owner, "attn_mask", None)
        if attn_mask is None:
            raise ConfigError(
                f"model={model_name}: its text tower has no causal mask; prompt learning here needs a causal "
                "CLIP text tower (SigLIP-style towers are not supported)"
            )
        pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        if pool_type not in ("argmax", "eos"):
            raise ConfigError(
                f"model={model_name}: text pool type {pool_type!r} is not EOT pooling ('argmax' or 'eos')"
            )
        if getattr(owner, "cls_emb", None) is not None:
            raise ConfigError(f"model={model_name}: text towers with an appended class token are not supported")
        projection = getattr(owner, "text_projection", None)
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            ln_final=owner.ln_final,
            text_projection=projection,
            attn_mask=attn_mask,
            pool_type=pool_type,
            eos_token_id=getattr(owner, "text_eos_id", None) or getattr(owner, "eos_id", None),
            context_length=owner.positional_embedding.shape[0],
        )

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (EOT) token in each tokenised sequence."""
        if self.pool_type == "eos" and self.eos_token_id is not None:
            return (tokens == self.eos_token_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def encode_embeddings(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, L, W] (L <= context_length) -> projected EOT features [N, D], unnormalised.

        Running only the first L positions is exact as long as every EOT index is below L: the causal
        mask means no position attends to a later one.
        """
        length = x.shape[1]
        cast_dtype = _cast_dtype(self.transformer)
        x = x.to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        mask = self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return x

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Plain tokenised text [N, context_length] -> projected EOT features [N, D], unnormalised, run only up to
        the longest EOT (exact, see :meth:`encode_embeddings`). Differentiable: pretraining trains through it."""
        eot = self.eot_positions(tokens)
        length = int(eot.max().item()) + 1
        return self.encode_embeddings(self.token_embedding(tokens[:, :length]), eot)

    def shared_prefix_blocks(self) -> list[nn.Module] | None:
        """The transformer's blocks if the shared-prefix encoder can run them exactly, else None.

        Supported: open_clip ``ResidualAttentionBlock`` (pre-LN, ``nn.MultiheadAttention`` with packed
        in-projection, optional LayerScale), batch-first, no cross-attention.
        """
        blocks = getattr(self.transformer, "resblocks", None)
        if blocks is None or not getattr(self.transformer, "batch_first", True):
            return None
        for blk in blocks:
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                return None
            if not all(hasattr(blk, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")) or hasattr(blk, "ln_1_kv"):
                return None
        return list(blocks)

    @staticmethod
    def shared_prefix_layout(
        eot: torch.Tensor, n_exp: int, n_pre: int, n_suf: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed suffix stream's layout for :meth:`encode_shared_prefix`: (``packed``, the flat positions of the
        real suffix tokens in the padded [E*C*S] layout; ``eot_rows``, each (expert, class) EOT token's row in the
        packed stream [E*C]). It depends on the classes' EOT positions and the shapes only, so a caller encoding
        the same classes again passes it back in (no data-dependent ``nonzero`` per call: a CUDA graph can capture
        the pass, and eager steps lose a host sync)."""
        rows = eot - n_pre  # each class's EOT row within its suffix
        valid = torch.arange(n_suf, device=eot.device)[None, :] <= rows[:, None]  # [C, S]
        flat_valid = valid.expand(n_exp, -1, -1).reshape(-1)
        packed = flat_valid.nonzero().squeeze(1)  # flat ids in [E*C*S]
        slot = torch.cumsum(flat_valid.long(), 0) - 1  # position of each padded token in the packed stream
        n_cls = eot.shape[0]
        flat_eot = torch.arange(n_exp * n_cls, device=eot.device).view(n_exp, n_cls) * n_suf + rows[None, :]
        return packed, slot[flat_eot].reshape(-1)

    def encode_shared_prefix(
        self,
        prefix: torch.Tensor,
        suffix: torch.Tensor,
        eot: torch.Tensor,
        layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Encode E x C prompts whose first P tokens are shared by all C classes of an expert.

        prefix [E, P, W]: token embeddings of [SOS] + context (one copy per expert);
        suffix [E, C, S, W]: each class's remaining tokens up to its EOT; eot [C]: EOT index in the full
        sequence (>= P). The prefix positions' hidden states are computed once per expert (causal
        attention: they never see the suffix) and every suffix token attends to [prefix; its own suffix]
        with the causal mask. Returns the projected EOT features [E, C, D], unnormalised; equal to
        :meth:`encode_embeddings` on the concatenated sequences up to float rounding. ``layout``: this call's
        :meth:`shared_prefix_layout` (computed here when None).
        """
        blocks = self.shared_prefix_blocks()
        if blocks is None:
            raise ValueError("this text tower's blocks are not supported by the shared-prefix encoder")
        n_exp, n_pre, width = prefix.shape
        n_cls, n_suf = suffix.shape[1], suffix.shape[2]
        cast_dtype = _cast_dtype(self.transformer)
        pos = self.positional_embedding.to(cast_dtype)
        xp = prefix.to(cast_dtype) + pos[:n_pre]
        # Suffix tokens after a class's own EOT never reach its feature (causal mask), but padding every class
        # to the longest name would run them through every linear layer. So the suffix stream is packed: only
        # tokens up to each class's EOT, [N, W]. Attention alone uses the padded [E*C, S] layout, where the
        # causal mask keeps a real token from seeing the padding after it.
        if layout is None:
            layout = self.shared_prefix_layout(eot.to(prefix.device), n_exp, n_pre, n_suf)
        packed, eot_rows = layout
        xs = (suffix.to(cast_dtype) + pos[n_pre : n_pre + n_suf]).reshape(-1, width).index_select(0, packed)
        # additive masks: the prefix is causal in itself; a suffix token sees the whole prefix and the
        # suffix tokens up to itself
        full_mask = self.attn_mask[: n_pre + n_suf, : n_pre + n_suf].to(cast_dtype)
        prefix_mask = full_mask[:n_pre, :n_pre]
        suffix_mask = full_mask[n_pre:, :]
        for blk in blocks:
            xp, xs = _shared_prefix_block(blk, xp, xs, packed, n_cls, n_suf, prefix_mask, suffix_mask)
        x = xs.index_select(0, eot_rows).view(n_exp, n_cls, width)  # [E, C, W]: each (expert, class) EOT token
        x = self.ln_final(x)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return x


def _shared_prefix_block(
    blk: nn.Module,
    xp: torch.Tensor,
    xs: torch.Tensor,
    packed: torch.Tensor,
    n_cls: int,
    n_suf: int,
    prefix_mask: torch.Tensor,
    suffix_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-LN residual block on (prefix [E, P, W], packed suffix tokens [N, W]) with the prefix shared
    per expert; ``packed`` holds the packed tokens' flat positions in the padded [E*C*S] suffix layout."""
    attn: nn.MultiheadAttention = blk.attn
    heads = attn.num_heads
    n_exp, n_pre, width = xp.shape
    dh = width // heads
    scale = dh**-0.5
    qp, kp, vp = F.linear(blk.ln_1(xp), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qkv = F.linear(blk.ln_1(xs), attn.in_proj_weight, attn.in_proj_bias)  # packed [N, 3W]
    # to the padded layout for attention; padding rows are zero and only ever seen by padding queries
    qkv = qkv.new_zeros(n_exp * n_cls * n_suf, 3 * width).index_copy(0, packed, qkv)
    qs, ks, vs = qkv.view(n_exp * n_cls, n_suf, 3 * width).chunk(3, dim=-1)

    def split(t: torch.Tensor, rows: int) -> torch.Tensor:  # [N, L, W] -> [N, H, L, dh]
        return t.reshape(rows, -1, heads, dh).transpose(1, 2)

    # prefix: ordinary causal self-attention, once per expert
    kph, vph = split(kp, n_exp), split(vp, n_exp)
    out_p = F.scaled_dot_product_attention(split(qp, n_exp), kph, vph, attn_mask=prefix_mask)
    # suffix tokens of all C classes of an expert score against that expert's prefix in ONE matmul
    # ([E, H, C*S, dh] x [E, H, dh, P]) and against their own class's suffix tokens (causal); one softmax
    # over [prefix; suffix] keys. The prefix keys/values are never copied per class.
    q_all = split(qs.reshape(n_exp, n_cls * n_suf, width), n_exp) * scale  # [E, H, C*S, dh]
    s_pre = (q_all @ kph.transpose(-1, -2)).view(n_exp, heads, n_cls, n_suf, n_pre)
    qsh, ksh = split(qs, n_exp * n_cls) * scale, split(ks, n_exp * n_cls)  # [E*C, H, S, dh]
    s_suf = (qsh @ ksh.transpose(-1, -2) + suffix_mask[:, n_pre:]).view(n_exp, n_cls, heads, n_suf, n_suf)
    probs = torch.cat([s_pre, s_suf.transpose(1, 2)], dim=-1).softmax(dim=-1)  # [E, H, C, S, P + S]
    a_pre, a_suf = probs.split([n_pre, n_suf], dim=-1)
    out_s = (a_pre.reshape(n_exp, heads, n_cls * n_suf, n_pre) @ vph).view(n_exp, heads, n_cls, n_suf, dh)
    v_suf = vs.reshape(n_exp, n_cls, n_suf, heads, dh).permute(0, 3, 1, 2, 4)  # [E, H, C, S, dh]
    out_s = out_s + a_suf @ v_suf
    # back to tokens, then to the packed stream (index_select: its backward is an index_add, much cheaper
    # than indexing's index_put)
    out_s = out_s.permute(0, 2, 3, 1, 4).reshape(n_exp * n_cls * n_suf, width).index_select(0, packed)
    out_p = out_p.transpose(1, 2).reshape(xp.shape)
    xp = xp + blk.ls_1(F.linear(out_p, attn.out_proj.weight, attn.out_proj.bias))
    xs = xs + blk.ls_1(F.linear(out_s, attn.out_proj.weight, attn.out_proj.bias))
    xp = xp + blk.ls_2(blk.mlp(blk.ln_2(xp)))
    xs = xs + blk.ls_2(blk.mlp(blk.ln_2(xs)))
    return xp, xs


def _cast_dtype(transformer: nn.Module) -> torch.dtype:
    get = getattr(transformer, "get_cast_dtype", None)
    return get() if callable(get) else torch.float32
