"""Plain-torch reference implementations of the hot ops (the twins every fused backend is tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gate_attention(
    query: torch.Tensor,
    experts: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    wo: torch.Tensor,
    bo: torch.Tensor,
    heads: int,
    scaling: float,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of each query over the E experts of each class.

    query [B, d], experts [E, C, d] -> T_MoE [B, C, d] and head-averaged attention [B, C, E].
    Keys and values are projected once per (expert, class), not once per (image, class).
    """
    batch, dim = query.shape
    n_exp, n_cls, _ = experts.shape
    head_dim = dim // heads
    q = F.linear(query, wq, bq).view(batch, heads, head_dim)
    k = F.linear(experts, wk, bk).view(n_exp, n_cls, heads, head_dim)
    v = F.linear(experts, wv, bv).view(n_exp, n_cls, heads, head_dim)
    scores = torch.einsum("bhx,echx->bche", q, k) * scaling  # [B, C, H, E]
    attn = scores.softmax(dim=-1)
    mixed = torch.einsum("bche,echx->bchx", attn, v).reshape(batch, n_cls, dim)
    out = F.linear(mixed, wo, bo)
    weights = attn.mean(dim=2) if need_weights else None
    return out, weights


def gate_score(
    query: torch.Tensor,
    experts: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    wo: torch.Tensor,
    bo: torch.Tensor,
    *,
    gamma: float,
    heads: int,
    scaling: float,
    need_weights: bool = False,
    local: torch.Tensor | None = None,
    lam: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gamma * <query_b, T_MoE[b, c]> (+ lam * local[b, c] when ``local`` logits are given).

    The weights, ``heads`` and ``scaling`` are those of :func:`gate_attention`; returns (logits [B, C],
    head-averaged attention [B, C, E] or None).
    """
    moe, attn = gate_attention(
        query, experts, wq, bq, wk, bk, wv, bv, wo, bo, heads=heads, scaling=scaling, need_weights=need_weights
    )
    logits = gamma * torch.einsum("bd,bcd->bc", query, moe)
    if local is not None:
        logits = logits + lam * local
    return logits, attn


def gate_score_clients(
    query: torch.Tensor,
    experts: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    wo: torch.Tensor,
    bo: torch.Tensor,
    *,
    gamma: float,
    heads: int,
    scaling: float,
    need_weights: bool = False,
    local: torch.Tensor | None = None,
    lam: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`gate_score` for M clients, one after another: every tensor has a leading client axis (query [M, B, d],
    experts [M, E, C, d], W [M, d, d], b [M, d], local [M, B, C]); returns logits [M, B, C] and attention
    [M, B, C, E] or None. The twin of the fused backends' one-launch ``gate_score_clients``."""
    weights = (wq, bq, wk, bk, wv, bv, wo, bo)
    outs = [
        gate_score(
            query[m],
            experts[m],
            *(w[m] for w in weights),
            gamma=gamma,
            heads=heads,
            scaling=scaling,
            need_weights=need_weights,
            local=None if local is None else local[m],
            lam=lam,
        )  # fmt: skip
        for m in range(query.shape[0])
    ]
    logits = torch.stack([o[0] for o in outs])
    return logits, (torch.stack([o[1] for o in outs]) if need_weights else None)


def assemble_prompts(prefix: torch.Tensor, suffix: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Token embeddings of every (expert, class) prompt, expert-major.

    prefix [C, 1, W] (SOS), suffix [C, S, W] (class tokens, '.', EOT, already truncated past the longest
    EOT) and contexts [E, n_ctx, W] -> [E * C, 1 + n_ctx + S, W]. Gradients flow to ``ctx`` only.
    """
    experts, classes = ctx.shape[0], prefix.shape[0]
    ctx = ctx.to(prefix.dtype)
    expanded = ctx[:, None].expand(experts, classes, *ctx.shape[1:])
    seq = torch.cat(
        [prefix[None].expand(experts, *prefix.shape), expanded, suffix[None].expand(experts, *suffix.shape)], dim=2
    )
    return seq.reshape(experts * classes, seq.shape[2], -1)


def knn(pool: torch.Tensor, present: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """For each query row id, the ids of its k nearest *other present* rows by L2 distance.

    pool [N, P]; present [N] bool; queries [Q] long. Returns [Q, min(k, present others)], nearest first,
    ties to the lower id. Absent rows and the query itself are never returned.
    """
    n = pool.shape[0]
    flat = pool.reshape(n, -1).double()
    dists = torch.cdist(flat[queries], flat, compute_mode="donot_use_mm_for_euclid_dist")
    invalid = ~present.bool()[None, :].expand(len(queries), n).clone()
    invalid[torch.arange(len(queries)), queries] = True
    dists = dists.masked_fill(invalid, float("inf"))
    available = int((~invalid).sum(dim=1).min().item()) if len(queries) else 0
    take = min(k, available)
    # a stable sort keeps equal distances in id order: ties go to the lower id
    order = torch.sort(dists, dim=1, stable=True).indices
    return order[:, :take]
