"""The ``triton`` backend: the fused gate-and-score op (kernels in ``pfedmoap.kernels.gate``).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton
is imported; slow, for tests). Tensors it cannot run on go to the reference implementation, so a run never
fails because of where a tensor lives.

``gate_score`` has the reference signature. The four d x d projections run as ordinary GEMMs; the kernels
do the per-(image, class) attention over experts and the scoring without building T_MoE [B, C, d]; one
``torch.autograd.Function`` gives the gradients of the queries, the expert features and every gate
parameter (the head-averaged attention weights are returned for logging and carry no gradient).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_KERNELS: ModuleType | None = None
_REASON = ""


def _load_kernels() -> ModuleType | None:
    """``pfedmoap.kernels.gate``: installed with the package, or read from ``kernels/`` in a source checkout."""
    global _KERNELS, _REASON
    if _KERNELS is not None or _REASON:
        return _KERNELS
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        _REASON = f"triton is not installed ({exc})"
        return None
    try:
        _KERNELS = importlib.import_module("pfedmoap.kernels.gate")
    except ModuleNotFoundError:
        # a source checkout: the top-level kernels/ folder is what installs as pfedmoap.kernels
        root = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "pfedmoap.kernels", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        if spec is None or not (root / "gate.py").is_file():
            _REASON = f"pfedmoap.kernels is not installed and {root} has no gate.py"
            return None
        package = importlib.util.module_from_spec(spec)
        sys.modules["pfedmoap.kernels"] = package
        spec.loader.exec_module(package)
        _KERNELS = importlib.import_module("pfedmoap.kernels.gate")
    return _KERNELS


def available() -> bool:
    """Triton and its kernels import, and there is a device to run them: CUDA, or the interpreter."""
    if _load_kernels() is None:
        return False
    return torch.cuda.is_available() or INTERPRET


def unavailable_reason() -> str:
    if _load_kernels() is None:
        return _REASON
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import, for tests)"


def _runs_here(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu")


# A program holds about six [BLOCK_B, D_PAD] fp32 tiles at once (q and u, their products with one key or value
# row, and in the query backward the dq and du accumulators). ptxas spills past 255 registers per thread, so
# the tile size bounds BLOCK_B and the warp count grows with the tile: TILE_PER_THREAD values per tile and thread.
TILE_PER_THREAD = 16
MAX_BLOCK_B = 64


def _launch_config(batch: int, dim: int, heads: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, D_PAD, H_PAD, num_warps) for a [batch, dim] query with ``heads`` heads.

    BLOCK_B is at least 16 (``tl.dot``'s minimum) and at most 64, as many rows as keep a tile within
    4 warps x 32 threads x TILE_PER_THREAD values; wider gates take more warps (up to 32) instead of spilling.
    ``python -m pfedmoap.ops.triton_aot`` compiles every result for sm_80 / sm_90 and reports registers and
    spills (kernels/README.md)."""
    kernels = _load_kernels()
    d_pad = kernels.padded(dim)
    h_pad = kernels.padded(heads)
    block_b = max(16, min(MAX_BLOCK_B, 128 * TILE_PER_THREAD // d_pad, kernels.padded(batch)))
    num_warps = min(32, max(4, block_b * d_pad // (32 * TILE_PER_THREAD)))
    return block_b, d_pad, h_pad, num_warps


class _GateScore(torch.autograd.Function):
    """The op over a leading axis of M clients: query [M, B, d], experts [M, E, C, d], each gate weight [M, ...],
    local [M, B, C] or None; one launch of each kernel for all M (a single client is M = 1)."""

    @staticmethod
    def forward(
        ctx, query, experts, wq, bq, wk, bk, wv, bv, wo, bo, local, heads, scaling, gamma, lam, need_weights, out_dtype
    ):
        kernels = _load_kernels()
        clients, batch, dim = query.shape
        n_exp, n_cls = experts.shape[1:3]
        flat = experts.reshape(clients, n_exp * n_cls, dim)
        q = (torch.baddbmm(bq[:, None], query, wq.transpose(1, 2)) * scaling).contiguous()
        u = torch.bmm(query, wo).contiguous()  # u_b = W_O^T q_b
        k = torch.baddbmm(bk[:, None], flat, wk.transpose(1, 2)).contiguous()
        v = torch.baddbmm(bv[:, None], flat, wv.transpose(1, 2)).contiguous()
        qb = torch.bmm(query.float(), bo.float()[:, :, None])[..., 0].contiguous()
        block_b, d_pad, h_pad, num_warps = _launch_config(batch, dim, heads)
        dev = query.device
        out = torch.empty(clients, batch, n_cls, device=dev, dtype=torch.float32)
        lse = torch.empty(clients, batch, n_cls, h_pad, device=dev, dtype=torch.float32)
        mix = torch.empty(clients, batch, n_cls, h_pad, device=dev, dtype=torch.float32)
        weights = torch.empty(clients, batch, n_cls, n_exp, device=dev, dtype=torch.float32) if need_weights else out
        has_local = local is not None
        grid = (triton_cdiv(batch, block_b), n_cls, clients)
        kernels.gate_score_fwd_kernel[grid](
            q, u, k, v, qb, local.contiguous() if has_local else out, out, lse, mix, weights,
            batch, n_cls, n_exp, dim, heads, dim // heads, float(gamma), float(lam),
            BLOCK_B=block_b, D_PAD=d_pad, H_PAD=h_pad, HAS_LOCAL=has_local, NEED_WEIGHTS=need_weights,
            num_warps=num_warps,
        )  # fmt: skip
        ctx.save_for_backward(query, flat, wq, wk, wv, wo, bo, q, u, k, v, lse, mix)
        ctx.shape = (clients, batch, n_exp, n_cls, dim, heads)
        ctx.consts = (float(scaling), float(gamma), float(lam), block_b, d_pad, h_pad, num_warps, has_local)
        ctx.dtypes = (query.dtype, experts.dtype, wq.dtype, None if local is None else local.dtype)
        out_dtype = query.dtype if out_dtype is None else out_dtype
        if need_weights:
            ctx.mark_non_differentiable(weights)
            return out.to(out_dtype), weights.to(out_dtype)
        return out.to(out_dtype), None

    @staticmethod
    def backward(ctx, grad_out, _grad_weights):
        kernels = _load_kernels()
        query, flat, wq, wk, wv, wo, bo, q, u, k, v, lse, mix = ctx.saved_tensors
        clients, batch, n_exp, n_cls, dim, heads = ctx.shape
        scaling, gamma, lam, block_b, d_pad, h_pad, num_warps, has_local = ctx.consts
        q_dtype, x_dtype, w_dtype, local_dtype = ctx.dtypes
        g = grad_out.float().contiguous()
        g_mix = (gamma * g).contiguous()
        dev = g.device

        per_group = triton_cdiv(n_cls, min(n_cls, 64))
        groups = triton_cdiv(n_cls, per_group)
        dq = torch.empty(clients, groups, batch, dim, device=dev, dtype=torch.float32)
        du = torch.empty(clients, groups, batch, dim, device=dev, dtype=torch.float32)
        kernels.gate_score_bwd_query_kernel[(triton_cdiv(batch, block_b), groups, clients)](
            q, u, k, v, lse, mix, g_mix, dq, du, batch, n_cls, n_exp, dim, dim // heads, per_group,
            BLOCK_B=block_b, D_PAD=d_pad, H_PAD=h_pad, num_warps=num_warps,
        )  # fmt: skip
        if d_pad > EXPERT_KERNEL_MAX_D_PAD:
            dk, dv = expert_grads_torch(q, u, k, v, lse, mix, g_mix, n_exp, n_cls, heads)
        else:
            dk = torch.empty(clients, n_exp * n_cls, dim, device=dev, dtype=torch.float32)
            dv = torch.empty(clients, n_exp * n_cls, dim, device=dev, dtype=torch.float32)
            kernels.gate_score_bwd_expert_kernel[(n_cls, n_exp, clients)](
                q, u, k, v, lse, mix, g_mix, dk, dv, batch, n_cls, n_exp, dim, dim // heads,
                BLOCK_B=block_b, D_PAD=d_pad, H_PAD=h_pad, num_warps=num_warps,
            )  # fmt: skip
        dq = dq.sum(1) * scaling  # the kernels saw the scaled queries
        du = du.sum(1)

        x32, q32 = flat.float(), query.float()
        row_sums = g.sum(2)  # d logit / d <q, b_O> summed over classes, per image [M, B]
        d_query = dq @ wq.float() + du @ wo.float().transpose(1, 2) + gamma * row_sums[..., None] * bo.float()[:, None]
        d_experts = (dk @ wk.float() + dv @ wv.float()).view(clients, n_exp, n_cls, dim)
        grads = (
            d_query.to(q_dtype),
            d_experts.to(x_dtype),
            (dq.transpose(1, 2) @ q32).to(w_dtype),  # W_Q
            dq.sum(1).to(w_dtype),
            (dk.transpose(1, 2) @ x32).to(w_dtype),  # W_K
            dk.sum(1).to(w_dtype),
            (dv.transpose(1, 2) @ x32).to(w_dtype),  # W_V
            dv.sum(1).to(w_dtype),
            (q32.transpose(1, 2) @ du).to(w_dtype),  # W_O (u = q W_O)
            (gamma * (row_sums[:, None] @ q32)[:, 0]).to(w_dtype),  # b_O
            (lam * g).to(local_dtype) if has_local else None,
        )
        return (*grads, None, None, None, None, None, None)


# Above this padded width the expert-gradient kernel needs more shared memory than one block may have (compiled
# for sm_80 / sm_90 by pfedmoap.ops.triton_aot: 168-172 KB at D_PAD = 512, 332-336 KB at 1024, against 163 KB on
# A100 and 227 KB on H100), so it would fail to launch: those widths take dK and dV from expert_grads_torch.
EXPERT_KERNEL_MAX_D_PAD = 256


def expert_grads_torch(
    q: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    mix: torch.Tensor,
    g_mix: torch.Tensor,
    n_exp: int,
    n_cls: int,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dK and dV [M, E * C, d] (fp32) from the forward's saved statistics (q, u [M, B, d], k, v [M, E * C, d],
    lse, mix [M, B, C, H_PAD], g_mix [M, B, C]), in torch: the twin of ``gate_score_bwd_expert_kernel``."""
    clients, batch, dim = q.shape
    hd = dim // heads
    qh, uh = q.float().view(clients, batch, heads, hd), u.float().view(clients, batch, heads, hd)
    kh, vh = k.float().view(clients, n_exp, n_cls, heads, hd), v.float().view(clients, n_exp, n_cls, heads, hd)
    score = torch.einsum("mbhd,mechd->mbche", qh, kh)
    value = torch.einsum("mbhd,mechd->mbche", uh, vh)
    attn = torch.exp(score - lse[..., :heads, None])
    d_value = g_mix[..., None, None] * attn
    d_score = d_value * (value - mix[..., :heads, None])
    dk = torch.einsum("mbche,mbhd->mechd", d_score, qh).reshape(clients, n_exp * n_cls, dim)
    dv = torch.einsum("mbche,mbhd->mechd", d_value, uh).reshape(clients, n_exp * n_cls, dim)
    return dk.contiguous(), dv.contiguous()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    """Fused twin of :func:`pfedmoap.ops.reference.gate_score` (same arguments, same results).

    Under autocast (``--precision bf16``) the query, experts and gate weights are cast to the autocast dtype and the
    kernels run on them as they are (their bf16 path, fp32 accumulation and softmax inside); the logits come back
    in float32 and the gradients in the dtypes of the tensors passed (the float32 master weights)."""
    weights = (wq, bq, wk, bk, wv, bv, wo, bo)
    if not _runs_here(query):
        return reference.gate_score(
            query, experts, *weights, gamma=gamma, heads=heads, scaling=scaling, need_weights=need_weights,
            local=local, lam=lam,
        )  # fmt: skip
    logits, attn = gate_score_clients(
        query[None], experts[None], *(w[None] for w in weights), gamma=gamma, heads=heads, scaling=scaling,
        need_weights=need_weights, local=None if local is None else local[None], lam=lam,
    )  # fmt: skip
    return logits[0], None if attn is None else attn[0]


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
    """:func:`gate_score` for M clients at once, each its own query, experts and gate weights (a leading axis M on
    every tensor: query [M, B, d], experts [M, E, C, d], W [M, d, d], b [M, d], local [M, B, C]): logits [M, B, C]
    and attention [M, B, C, E] or None, client m's equal to ``gate_score`` on its own tensors. One launch of each
    kernel scores, and one of each differentiates, every client (the lock step's path)."""
    weights = (wq, bq, wk, bk, wv, bv, wo, bo)
    if not _runs_here(query):
        return reference.gate_score_clients(
            query, experts, *weights, gamma=gamma, heads=heads, scaling=scaling, need_weights=need_weights,
            local=local, lam=lam,
        )  # fmt: skip
    dim = query.shape[-1]
    if dim % heads:
        raise ValueError(f"d_gate={dim} is not divisible by heads={heads}")
    kind = query.device.type
    if torch.is_autocast_enabled(kind):
        low = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            return _GateScore.apply(
                query.to(low).contiguous(), experts.to(low).contiguous(), *(w.to(low) for w in weights), local,
                heads, scaling, gamma, lam, need_weights, torch.float32,
            )  # fmt: skip
    experts = experts.to(query.dtype)
    return _GateScore.apply(
        query.contiguous(), experts.contiguous(), *weights, local, heads, scaling, gamma, lam, need_weights, None
    )
