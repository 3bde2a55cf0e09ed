"""Triton kernels for the fused pFedMoAP gate-and-score op (forward and backward).

The gate is one multi-head attention layer over the E experts of each class (SPEC §1). Its logit is

    l[b, c] = gamma * <q_b, W_O mix[b, c] + b_O> + lam * local[b, c]
            = gamma * (sum_h sum_e a[b, c, h, e] * <u_bh, V_h[e, c]> + <q_b, b_O>) + lam * local[b, c]

with u_b = W_O^T q_b and a = softmax_e(<Q_bh, K_h[e, c]>) (the score scale folded into Q). So the mixed
values T_MoE [B, C, d] are never built: per (b, c, h) the kernels keep a running max, a running softmax
denominator and a running sum of weight x <u, V> (an online softmax over experts, as in flash attention).

Head sums over the d axis are a product with a 0/1 "head indicator" matrix [d, H] (``tl.dot``), which works
for any head width, including widths below tl.dot's minimum of 16 and non-powers of two. Every load is
upcast to fp32 and every sum accumulates in fp32 (``input_precision="ieee"``: no TF32 rounding), so fp16 and
bf16 inputs only lose precision where they are stored. The interpreter (TRITON_INTERPRET=1) runs the same
kernels on CPU tensors for the tests.

Every kernel also takes a leading axis of clients (the grid's third axis, ``tl.program_id(2)``): client m's
tensors follow client m - 1's in each buffer, all of one shape, so clients trained in lock step are scored and
differentiated in one launch each; a single client is the case M = 1.

Projections (four d x d GEMMs) are left to cuBLAS; :mod:`pfedmoap.ops.triton_gate` wraps everything in one
``torch.autograd.Function``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _head_matrix(D, HEAD_DIM, D_PAD: tl.constexpr, H_PAD: tl.constexpr):
    """[D_PAD, H_PAD] float 0/1: coordinate x belongs to head h (padding rows and columns are 0)."""
    x = tl.arange(0, D_PAD)
    h = tl.arange(0, H_PAD)
    member = ((x[:, None] // HEAD_DIM) == h[None, :]) & (x[:, None] < D)
    return member.to(tl.float32)


@triton.jit
def _load_tile(ptr, rows, cols, B, D):
    """fp32 [BLOCK_B, D_PAD] tile of a [B, D] tensor; padding rows and columns read as 0."""
    tile = (rows[:, None] < B) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=tile, other=0.0).to(tl.float32)


@triton.jit
def _load_row(ptr, e, c, C, D, cols):
    """fp32 [D_PAD] feature row (e, c) of an [E, C, D] tensor; padding reads as 0."""
    return tl.load(ptr + (e * C + c) * D + cols, mask=cols < D, other=0.0).to(tl.float32)


@triton.jit
def _load_stats(lse_ptr, mix_ptr, g_ptr, rows, c, B, C, H_PAD: tl.constexpr):
    """The forward's saved (log-sum-exp, mixed value) [BLOCK_B, H_PAD] and the incoming gradient [BLOCK_B] for
    class c; padding rows read as 0 (so they contribute nothing)."""
    row_ok = rows < B
    hb = (rows[:, None] * C + c) * H_PAD + tl.arange(0, H_PAD)[None, :]
    lse = tl.load(lse_ptr + hb, mask=row_ok[:, None], other=0.0)
    mix = tl.load(mix_ptr + hb, mask=row_ok[:, None], other=0.0)
    g = tl.load(g_ptr + rows * C + c, mask=row_ok, other=0.0)
    return lse, mix, g


@triton.jit
def gate_score_fwd_kernel(
    q_ptr,  # [M, B, D] scaled queries (W_Q q + b_Q) * scaling
    u_ptr,  # [M, B, D] W_O^T q
    k_ptr,  # [M, E, C, D] keys
    v_ptr,  # [M, E, C, D] values
    qb_ptr,  # [M, B] <q, b_O>
    local_ptr,  # [M, B, C] local logits (read only if HAS_LOCAL)
    out_ptr,  # [M, B, C] fp32 final logits
    lse_ptr,  # [M, B, C, H_PAD] fp32 log-sum-exp of the scores per head (saved for backward)
    mix_ptr,  # [M, B, C, H_PAD] fp32 per-head softmax-weighted <u, V> (saved for backward)
    w_ptr,  # [M, B, C, E] fp32 head-averaged attention (written only if NEED_WEIGHTS)
    B,
    C,
    E,
    D,
    H,
    HEAD_DIM,
    gamma,
    lam,
    BLOCK_B: tl.constexpr,
    D_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    NEED_WEIGHTS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    c = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)  # the client: every buffer holds M clients' tensors, one after another
    q_ptr += m * B * D
    u_ptr += m * B * D
    k_ptr += m * E * C * D
    v_ptr += m * E * C * D
    qb_ptr += m * B
    local_ptr += m * B * C
    out_ptr += m * B * C
    lse_ptr += m * B * C * H_PAD
    mix_ptr += m * B * C * H_PAD
    w_ptr += m * B * C * E
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, D_PAD)
    heads = tl.arange(0, H_PAD)
    row_ok = rows < B
    head_ok = heads < H
    q = _load_tile(q_ptr, rows, cols, B, D)
    u = _load_tile(u_ptr, rows, cols, B, D)
    member = _head_matrix(D, HEAD_DIM, D_PAD, H_PAD)

    run_max = tl.full((BLOCK_B, H_PAD), float("-inf"), tl.float32)
    run_den = tl.zeros((BLOCK_B, H_PAD), tl.float32)
    run_num = tl.zeros((BLOCK_B, H_PAD), tl.float32)
    for e in range(E):
        k = _load_row(k_ptr, e, c, C, D, cols)
        v = _load_row(v_ptr, e, c, C, D, cols)
        score = tl.dot(q * k[None, :], member, input_precision="ieee")  # [BLOCK_B, H_PAD]
        value = tl.dot(u * v[None, :], member, input_precision="ieee")
        new_max = tl.maximum(run_max, score)
        decay = tl.exp(run_max - new_max)
        p = tl.exp(score - new_max)
        run_den = run_den * decay + p
        run_num = run_num * decay + p * value
        run_max = new_max

    mix = tl.where(head_ok[None, :], run_num / run_den, 0.0)
    lse = run_max + tl.log(run_den)
    hb = (rows[:, None] * C + c) * H_PAD + heads[None, :]
    tl.store(lse_ptr + hb, lse, mask=row_ok[:, None])
    tl.store(mix_ptr + hb, mix, mask=row_ok[:, None])

    qb = tl.load(qb_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    logit = gamma * (tl.sum(mix, axis=1) + qb)
    if HAS_LOCAL:
        local = tl.load(local_ptr + rows * C + c, mask=row_ok, other=0.0).to(tl.float32)
        logit += lam * local
    tl.store(out_ptr + rows * C + c, logit, mask=row_ok)

    if NEED_WEIGHTS:
        for e in range(E):
            k = _load_row(k_ptr, e, c, C, D, cols)
            score = tl.dot(q * k[None, :], member, input_precision="ieee")
            attn = tl.where(head_ok[None, :], tl.exp(score - lse), 0.0)
            tl.store(w_ptr + (rows * C + c) * E + e, tl.sum(attn, axis=1) / H, mask=row_ok)


@triton.jit
def _softmax_grads(q, u, k, v, lse, mix, g, member):
    """For one expert row: (dS, dZ) [BLOCK_B, H_PAD] from the saved statistics (no running state needed)."""
    score = tl.dot(q * k[None, :], member, input_precision="ieee")
    value = tl.dot(u * v[None, :], member, input_precision="ieee")
    attn = tl.exp(score - lse)
    d_value = g[:, None] * attn  # d logit / d <u, V>
    d_score = d_value * (value - mix)  # softmax backward
    return d_score, d_value


@triton.jit
def gate_score_bwd_query_kernel(
    q_ptr,
    u_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    mix_ptr,
    g_ptr,  # [M, B, C] fp32 gradient of the mixed term (gamma * dlogits)
    dq_ptr,  # [M, G, B, D] fp32 partial dQ per class group
    du_ptr,  # [M, G, B, D] fp32 partial dU per class group
    B,
    C,
    E,
    D,
    HEAD_DIM,
    CLASSES_PER_GROUP,
    BLOCK_B: tl.constexpr,
    D_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
):
    """dQ and dU: one program per (block of rows, group of classes, client); groups are summed on the host."""
    pid_b = tl.program_id(0)
    group = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    tile_off = m * B * D
    q_ptr += tile_off
    u_ptr += tile_off
    row_off = m * E * C * D
    k_ptr += row_off
    v_ptr += row_off
    g_off = m * B * C
    lse_ptr += g_off * H_PAD
    mix_ptr += g_off * H_PAD
    g_ptr += g_off
    out_off = tile_off * tl.num_programs(1)
    dq_ptr += out_off
    du_ptr += out_off
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, D_PAD)
    tile = (rows[:, None] < B) & (cols[None, :] < D)
    q = _load_tile(q_ptr, rows, cols, B, D)
    u = _load_tile(u_ptr, rows, cols, B, D)
    member = _head_matrix(D, HEAD_DIM, D_PAD, H_PAD)
    member_t = tl.trans(member)

    dq = tl.zeros((BLOCK_B, D_PAD), tl.float32)
    du = tl.zeros((BLOCK_B, D_PAD), tl.float32)
    c_start = group * CLASSES_PER_GROUP
    c_stop = tl.minimum(c_start + CLASSES_PER_GROUP, C)
    for c in range(c_start, c_stop):
        lse, mix, g = _load_stats(lse_ptr, mix_ptr, g_ptr, rows, c, B, C, H_PAD)
        for e in range(E):
            k = _load_row(k_ptr, e, c, C, D, cols)
            v = _load_row(v_ptr, e, c, C, D, cols)
            d_score, d_value = _softmax_grads(q, u, k, v, lse, mix, g, member)
            # spread each head's gradient back over its coordinates
            dq += tl.dot(d_score, member_t, input_precision="ieee") * k[None, :]
            du += tl.dot(d_value, member_t, input_precision="ieee") * v[None, :]
    out = (group * B + rows[:, None]) * D + cols[None, :]
    tl.store(dq_ptr + out, dq, mask=tile)
    tl.store(du_ptr + out, du, mask=tile)


@triton.jit
def gate_score_bwd_expert_kernel(
    q_ptr,
    u_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    mix_ptr,
    g_ptr,
    dk_ptr,  # [M, E, C, D] fp32
    dv_ptr,  # [M, E, C, D] fp32
    B,
    C,
    E,
    D,
    HEAD_DIM,
    BLOCK_B: tl.constexpr,
    D_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
):
    """dK[e, c] and dV[e, c]: one program per (class, expert, client), looping over the batch (no atomics)."""
    c = tl.program_id(0)
    e = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    q_ptr += m * B * D
    u_ptr += m * B * D
    k_ptr += m * E * C * D
    v_ptr += m * E * C * D
    lse_ptr += m * B * C * H_PAD
    mix_ptr += m * B * C * H_PAD
    g_ptr += m * B * C
    dk_ptr += m * E * C * D
    dv_ptr += m * E * C * D
    cols = tl.arange(0, D_PAD)
    member = _head_matrix(D, HEAD_DIM, D_PAD, H_PAD)
    member_t = tl.trans(member)
    k = _load_row(k_ptr, e, c, C, D, cols)
    v = _load_row(v_ptr, e, c, C, D, cols)

    dk = tl.zeros((D_PAD,), tl.float32)
    dv = tl.zeros((D_PAD,), tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        q = _load_tile(q_ptr, rows, cols, B, D)
        u = _load_tile(u_ptr, rows, cols, B, D)
        lse, mix, g = _load_stats(lse_ptr, mix_ptr, g_ptr, rows, c, B, C, H_PAD)
        d_score, d_value = _softmax_grads(q, u, k, v, lse, mix, g, member)
        dk += tl.sum(tl.dot(d_score, member_t, input_precision="ieee") * q, axis=0)
        dv += tl.sum(tl.dot(d_value, member_t, input_precision="ieee") * u, axis=0)
    base = (e * C + c) * D
    tl.store(dk_ptr + base + cols, dk, mask=cols < D)
    tl.store(dv_ptr + base + cols, dv, mask=cols < D)


def padded(n: int) -> int:
    """Power-of-two padding (tl.arange needs one), at least 16 (tl.dot's minimum); padding is masked out."""
    return max(16, triton.next_power_of_2(n))
