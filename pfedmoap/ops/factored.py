"""The ``factored`` backend: the fused kernels' algebra in plain torch, for CPUs (and anything without Triton).

With u_b = W_O^T q_b, the gate's logit is gamma * (sum_h sum_e a[b,c,h,e] <u_bh, V_h[e,c]> + <q_b, b_O>), so
the mixed values T_MoE [B, C, d] and the W_O product per (image, class) (B * C * d^2 multiply-adds, the
largest term of the reference at d = 128) are never computed; torch autograd gives the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> bool:
    return True


def unavailable_reason() -> str:
    return ""


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
    """Same arguments and results as :func:`pfedmoap.ops.reference.gate_score`."""
    batch, dim = query.shape
    n_exp, n_cls, _ = experts.shape
    head_dim = dim // heads
    q = (F.linear(query, wq, bq) * scaling).view(batch, heads, head_dim)
    u = (query @ wo).view(batch, heads, head_dim)
    k = F.linear(experts, wk, bk).view(n_exp, n_cls, heads, head_dim)
    v = F.linear(experts, wv, bv).view(n_exp, n_cls, heads, head_dim)
    attn = torch.einsum("bhx,echx->bche", q, k).softmax(dim=-1)  # [B, C, H, E]
    values = torch.einsum("bhx,echx->bche", u, v)  # <u_bh, V_h[e, c]>
    logits = gamma * ((attn * values).sum(dim=(2, 3)) + (query @ bo)[:, None])
    if local is not None:
        logits = logits + lam * local
    return logits, (attn.mean(dim=2) if need_weights else None)


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
    """:func:`gate_score` over a leading axis of M clients (the arguments of
    :func:`pfedmoap.ops.reference.gate_score_clients`), every client in the same batched ops."""
    clients, batch, dim = query.shape
    n_exp, n_cls = experts.shape[1:3]
    head_dim = dim // heads
    q = ((torch.baddbmm(bq[:, None], query, wq.transpose(1, 2))) * scaling).view(clients, batch, heads, head_dim)
    u = torch.bmm(query, wo).view(clients, batch, heads, head_dim)
    flat = experts.reshape(clients, n_exp * n_cls, dim)
    k = torch.baddbmm(bk[:, None], flat, wk.transpose(1, 2)).view(clients, n_exp, n_cls, heads, head_dim)
    v = torch.baddbmm(bv[:, None], flat, wv.transpose(1, 2)).view(clients, n_exp, n_cls, heads, head_dim)
    attn = torch.einsum("mbhx,mechx->mbche", q, k).softmax(dim=-1)  # [M, B, C, H, E]
    values = torch.einsum("mbhx,mechx->mbche", u, v)
    logits = gamma * ((attn * values).sum(dim=(3, 4)) + torch.bmm(query, bo[:, :, None]))
    if local is not None:
        logits = logits + lam * local
    return logits, (attn.mean(dim=3) if need_weights else None)
