"""The compiled extension pfedmoap._C (the ``cpp`` ops backend) against the plain-torch reference.

Skipped, saying why, when the extension is not built; with PFEDMOAP_REQUIRE_EXT=1 (CI) a missing extension fails.
CUDA tests run the GPU kernels against the reference and are skipped without a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from pfedmoap import ops
from pfedmoap.federated.prompt import PromptEncoder
from pfedmoap.federated.selection import KnnSelection
from pfedmoap.federated.server import Server
from pfedmoap.ops import cpp, reference


@pytest.fixture(autouse=True)
def extension():
    """The module pfedmoap._C; skip (or fail under PFEDMOAP_REQUIRE_EXT=1) when it is not built."""
    if not cpp.available():
        if os.environ.get("PFEDMOAP_REQUIRE_EXT") == "1":
            pytest.fail(f"PFEDMOAP_REQUIRE_EXT=1 but {cpp.unavailable_reason()}")
        pytest.skip(cpp.unavailable_reason())
    return cpp._C


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prompt_parts(experts, classes, n_ctx, seq, width, dtype, seed=0, device="cpu"):
    g = _gen(seed)
    prefix = torch.randn(classes, 1, width, generator=g).to(device, dtype)
    suffix = torch.randn(classes, seq, width, generator=g).to(device, dtype)
    ctx = torch.randn(experts, n_ctx, width, generator=g).to(device, dtype)
    return prefix, suffix, ctx


# Backward tolerances: both sides sum the classes in fp32 (fp64 for double) and round once, in another order.
GRAD_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
SHAPES = [  # experts, classes, n_ctx, suffix length, width
    (1, 1, 1, 1, 4),
    (1, 7, 4, 0, 8),
    (3, 1, 16, 5, 12),
    (4, 13, 16, 9, 64),
    (10, 31, 2, 3, 7),
]


def _check_assemble(prefix, suffix, ctx):
    ctx = ctx.clone().requires_grad_(True)
    ref_ctx = ctx.detach().clone().requires_grad_(True)
    out = cpp.assemble_prompts(prefix, suffix, ctx)
    ref = reference.assemble_prompts(prefix, suffix, ref_ctx)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out, ref)  # pure copies: bit-exact
    grad = torch.randn(out.shape, generator=_gen(7)).to(out.device, out.dtype)
    (got,) = torch.autograd.grad(out, ctx, grad)
    (want,) = torch.autograd.grad(ref, ref_ctx, grad)
    assert got.dtype == want.dtype == ctx.dtype
    torch.testing.assert_close(got, want, **GRAD_TOL[ctx.dtype])
    # and against the exact sum over classes, in float64
    n_ctx = ctx.shape[1]
    exact = grad.double().view(ctx.shape[0], prefix.shape[0], -1, grad.shape[-1])[:, :, 1 : 1 + n_ctx].sum(1)
    torch.testing.assert_close(got.double(), exact, **GRAD_TOL[ctx.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_assemble_matches_reference(shape, dtype):
    _check_assemble(*_prompt_parts(*shape, dtype=dtype, seed=sum(shape)))


def test_assemble_casts_ctx_like_the_reference():
    prefix, suffix, _ = _prompt_parts(2, 5, 4, 3, 8, torch.float16)
    ctx = torch.randn(2, 4, 8, dtype=torch.float32, requires_grad=True)
    out = cpp.assemble_prompts(prefix, suffix, ctx)
    ref = reference.assemble_prompts(prefix, suffix, ctx)
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    (got,) = torch.autograd.grad(out.float().square().sum(), ctx)
    (want,) = torch.autograd.grad(ref.float().square().sum(), ctx)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_assemble_noncontiguous_inputs_and_gradcheck():
    g = _gen(3)
    prefix = torch.randn(6, 1, 5, dtype=torch.float64, generator=g)
    suffix = torch.randn(6, 5, 4, dtype=torch.float64, generator=g).transpose(1, 2)  # [6, 4, 5], strided
    ctx = torch.randn(3, 5, 2, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_(True)
    assert torch.equal(cpp.assemble_prompts(prefix, suffix, ctx), reference.assemble_prompts(prefix, suffix, ctx))
    assert torch.autograd.gradcheck(lambda c: cpp.assemble_prompts(prefix, suffix, c), (ctx,))


def test_assemble_without_grad_and_with_a_trainable_prefix():
    prefix, suffix, ctx = _prompt_parts(2, 3, 4, 2, 8, torch.float32)
    out = cpp.assemble_prompts(prefix, suffix, ctx)  # no grad anywhere: a plain tensor
    assert not out.requires_grad and torch.equal(out, reference.assemble_prompts(prefix, suffix, ctx))
    prefix.requires_grad_(True)  # the kernel gives no prefix gradient: the reference runs instead
    (grad,) = torch.autograd.grad(cpp.assemble_prompts(prefix, suffix, ctx).sum(), prefix)
    assert torch.equal(grad, torch.full_like(prefix, 2.0))


def test_assemble_rejects_bad_shapes(extension):
    prefix, suffix, ctx = _prompt_parts(2, 3, 4, 2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="token widths"):
        extension.assemble_prompts(prefix, suffix, ctx[..., :4].contiguous())
    with pytest.raises(RuntimeError, match="classes"):
        extension.assemble_prompts(prefix, suffix[:2].contiguous(), ctx)


def test_prompt_encoder_through_the_cpp_backend(tiny_clip):
    names = ["cat", "sea lion", "a b c d"]
    enc = PromptEncoder(tiny_clip, names, 4, mode="truncated", assemble=reference.assemble_prompts)
    ctx = (torch.randn(3, 4, enc.prefix.shape[-1], generator=_gen(5)) * 0.02).requires_grad_(True)
    want = enc.encode(ctx)
    (want_grad,) = torch.autograd.grad(want.square().sum(), ctx)
    enc = PromptEncoder(tiny_clip, names, 4, mode="truncated", assemble=ops.select_ops(fused=True).assemble_prompts)
    assert enc.assemble_prompts is cpp.assemble_prompts
    got = enc.encode(ctx)
    (got_grad,) = torch.autograd.grad(got.square().sum(), ctx)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_grad, want_grad)


# ----------------------------------------------------------------------------------------------- KNN
def _int_pool(n, p, seed, low=-3, high=4):
    """Small integers: every GEMM distance is exact in float32 and float64, and ties are frequent."""
    return torch.randint(low, high, (n, p), generator=_gen(seed)).float()


METHODS = [("auto", 0), ("select", 0), ("select", 1), ("select", 7), ("sort", 0), ("sort", 1), ("sort", 7)]


@pytest.mark.parametrize(("method", "chunk"), METHODS)
@pytest.mark.parametrize(("n", "k"), [(1, 3), (2, 1), (7, 3), (7, 6), (7, 10), (30, 5), (64, 9), (64, 0)])
def test_knn_matches_reference(extension, n, k, method, chunk):
    g = _gen(n * 100 + k)
    pool = torch.randn(n, 3, 5, generator=g)
    present = torch.rand(n, generator=g) > 0.3
    present[0] = True
    queries = torch.tensor([i for i in range(n) if present[i]] + [0], dtype=torch.long)  # a repeat, too
    want = reference.knn(pool, present, queries, k)
    got = extension.knn(pool, present, queries, k, chunk, method)
    assert got.dtype == torch.long and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize(("method", "chunk"), METHODS)
def test_knn_exact_ties_go_to_the_lower_id(extension, method, chunk):
    pool = _int_pool(40, 6, seed=1, low=0, high=2)  # 64 possible rows: many duplicates and equal distances
    pool[[5, 17, 33]] = pool[2].clone()
    present = torch.ones(40, dtype=torch.bool)
    present[17] = False
    queries = torch.arange(40)[present]
    want = reference.knn(pool, present, queries, 39)
    assert torch.equal(extension.knn(pool, present, queries, 39, chunk, method), want)
    first = extension.knn(pool, present, torch.tensor([2]), 3, chunk, method)
    assert first.tolist() == [[5, 33, want[2, 2].item()]]  # the duplicates at distance 0, lower id first
    zeros = torch.zeros(6, 4)
    assert extension.knn(zeros, torch.ones(6, dtype=torch.bool), torch.tensor([3, 0]), 4, chunk, method).tolist() == [
        [0, 1, 2, 4],
        [1, 2, 3, 4],
    ]


def test_knn_small_and_empty_cases():
    one = torch.randn(1, 8)
    assert cpp.knn(one, torch.ones(1, dtype=torch.bool), torch.tensor([0]), 5).shape == (1, 0)
    pool = torch.randn(5, 8)
    present = torch.ones(5, dtype=torch.bool)
    assert cpp.knn(pool, present, torch.tensor([], dtype=torch.long), 3).shape == (0, 0)
    assert cpp.knn(pool, present, torch.tensor([1]), 0).shape == (1, 0)
    only_self = torch.tensor([False, True, False, False, False])
    assert cpp.knn(pool, only_self, torch.tensor([1]), 3).shape == (1, 0)
    two = torch.tensor([2, 0])
    for k in (4, 5, 100):  # k >= N - 1: every other row
        assert torch.equal(cpp.knn(pool, present, two, k), reference.knn(pool, present, two, k))
    # an absent query still gets its nearest present rows
    present[3] = False
    assert torch.equal(cpp.knn(pool, present, torch.tensor([3]), 2), reference.knn(pool, present, torch.tensor([3]), 2))
    with pytest.raises(RuntimeError, match="out of range"):
        cpp.knn(pool, present, torch.tensor([5]), 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_knn_other_dtypes_and_prompt_shaped_pools(dtype):
    pool = torch.randn(50, 4, 6, generator=_gen(9)).to(dtype)
    present = torch.rand(50, generator=_gen(10)) > 0.2
    queries = torch.tensor([1, 7, 49, 7])
    assert torch.equal(cpp.knn(pool, present, queries, 6), reference.knn(pool, present, queries, 6))


def test_knn_prompt_sized_rows_match_reference():
    # 16 x 512 prompts, as the server holds them; Gaussian rows are far apart next to float64 rounding
    pool = torch.randn(60, 16, 512, generator=_gen(11)) * 0.02
    present = torch.ones(60, dtype=torch.bool)
    queries = torch.arange(0, 60, 7)
    assert torch.equal(cpp.knn(pool, present, queries, 59), reference.knn(pool, present, queries, 59))


def _exact_order(pool, present, queries, take):
    """The reference's order restricted to valid rows: float64 cdist without the GEMM, NaN last, ties by id.

    Equal to reference.knn wherever that returns only valid rows; the reference masks the query and absent rows
    with inf, so next to inf or NaN distances it can return them, which the op never does."""
    n = pool.shape[0]
    flat = pool.reshape(n, -1).double()
    dists = torch.cdist(flat[queries], flat, compute_mode="donot_use_mm_for_euclid_dist")
    out = []
    for row, q in zip(dists.tolist(), queries.tolist(), strict=True):
        valid = [j for j in range(n) if bool(present[j]) and j != q]
        valid.sort(key=lambda j: (math.isnan(row[j]), 0.0 if math.isnan(row[j]) else row[j], j))
        out.append(valid[:take])
    return torch.tensor(out, dtype=torch.long).reshape(len(queries), take)


def _gemm_fp32_order(pool, present, queries, k):
    """What a float32 GEMM alone (|a|^2 + |b|^2 - 2ab) would return: the order this op must not fall back to."""
    flat = pool.reshape(pool.shape[0], -1).float()
    sq = (flat * flat).sum(1)
    d = sq[queries].unsqueeze(1) + sq.unsqueeze(0) - 2 * flat[queries] @ flat.t()
    d[torch.arange(len(queries)), queries] = float("inf")
    d = d.masked_fill(~present.bool().unsqueeze(0), float("inf"))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def _far_rows(seed, n, p, clusters, spread=1e-3):
    """Rows 100 away from the origin, 1e-3 from their cluster centre: their distances differ by far less than a
    float32 GEMM's rounding (~1e-7 x |row|^2). With two clusters at +c and -c the queries' mean is near the origin,
    so centring cannot help and the error bound alone must keep the order."""
    g = _gen(seed)
    c = torch.randn(p, generator=g, dtype=torch.float64)
    c = c / c.norm() * 100
    side = torch.ones(n, 1, dtype=torch.float64)
    if clusters == 2:
        side[1::2] = -1.0
    return (side * c + torch.randn(n, p, generator=g, dtype=torch.float64) * spread).float()


@pytest.mark.parametrize(("method", "chunk"), METHODS)
@pytest.mark.parametrize("clusters", [1, 2])
def test_knn_near_ties_below_float32_resolution(extension, method, chunk, clusters):
    pool = _far_rows(seed=20 + clusters, n=48, p=64, clusters=clusters)
    present = torch.ones(48, dtype=torch.bool)
    present[[5, 30]] = False
    queries = torch.tensor([0, 1, 7, 12, 30, 47])
    want = reference.knn(pool, present, queries, 12)
    # the construction is meaningful: the float32 GEMM's own order is wrong here
    assert not torch.equal(_gemm_fp32_order(pool, present, queries, 12), want)
    assert torch.equal(extension.knn(pool, present, queries, 12, chunk, method), want)


def test_knn_clustered_prompt_pool_matches_reference():
    # prompts trained from one initialisation: a tight cluster far from the origin (the centring path)
    g = _gen(21)
    init = torch.randn(16, 64, generator=g) * 0.3
    pool = init + torch.randn(400, 16, 64, generator=g) * 1e-4
    present = torch.rand(400, generator=g) > 0.1
    queries = torch.randperm(400, generator=g)[:40]
    want = reference.knn(pool, present, queries, 9)
    assert not torch.equal(_gemm_fp32_order(pool, present, queries, 9), want)
    for method, chunk in [("auto", 0), ("select", 50), ("sort", 0), ("sort", 77)]:
        assert torch.equal(cpp._C.knn(pool, present, queries, 9, chunk, method), want)


@pytest.mark.parametrize(("method", "chunk"), [("auto", 0), ("select", 3000), ("sort", 0)])
def test_knn_many_candidates_per_query(extension, method, chunk):
    # two clusters of 10,000 rows each, spread far below the float32 bound: every row of a query's cluster is a
    # candidate (the CPU lists refine themselves past 4,096 entries; the tensor lists widen up to the pool)
    pool = _far_rows(seed=29, n=20000, p=256, clusters=2)
    pool[100:150] = pool[8].clone()  # and exact ties
    present = torch.ones(20000, dtype=torch.bool)
    queries = torch.tensor([8, 100, 7, 19999])
    for k in (9, 60):
        want = reference.knn(pool, present, queries, k)
        assert torch.equal(extension.knn(pool, present, queries, k, chunk, method), want)


@pytest.mark.parametrize(("method", "chunk"), METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_near_ties_at_float64_resolution(extension, method, chunk, dtype):
    # Around a zero query, rows that permute one vector's values are at the same distance in exact arithmetic; the
    # float64 sums differ only in their rounding, which decides the reference's order. Rows one float64 ulp apart
    # come in, too. 200 rows: the tensor path has to widen its candidate lists twice.
    g = _gen(22)
    v = torch.randn(40, generator=g, dtype=torch.float64)
    rows = [v[torch.randperm(40, generator=g)] for _ in range(199)]
    pool = torch.stack([torch.zeros(40, dtype=torch.float64)] + rows).to(dtype)
    if dtype == torch.float64:
        pool[150] = torch.nextafter(pool[3], torch.full_like(pool[3], 10.0))
    present = torch.ones(200, dtype=torch.bool)
    queries = torch.tensor([0, 0, 3])
    for k in (5, 60, 199):
        want = reference.knn(pool, present, queries, k)
        assert torch.equal(extension.knn(pool, present, queries, k, chunk, method), want)


@pytest.mark.parametrize(("method", "chunk"), METHODS)
def test_knn_duplicate_rows_lower_id_first(extension, method, chunk):
    pool = torch.randn(90, 33, generator=_gen(23))
    dups = [3, 9, 20, 41, 88]
    pool[dups] = pool[7].clone()
    present = torch.ones(90, dtype=torch.bool)
    queries = torch.tensor([7, 3, 88, 50])
    got = extension.knn(pool, present, queries, 8, chunk, method)
    assert torch.equal(got, reference.knn(pool, present, queries, 8))
    assert got[0, :5].tolist() == dups  # distance 0 to the query: every duplicate, in id order
    assert got[1, :5].tolist() == [7, 9, 20, 41, 88]


@pytest.mark.parametrize("method", ["auto", "sort"])
@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 299, 1000])
def test_knn_random_rows_across_chunk_sizes(extension, method, chunk):
    g = _gen(24)
    pool = torch.randn(300, 257, generator=g) * 0.02
    present = torch.rand(300, generator=g) > 0.2
    queries = torch.cat([torch.randint(0, 300, (40,), generator=g), torch.tensor([0, 0])])
    for k in (1, 9, 40, 299):
        want = reference.knn(pool, present, queries, k)
        assert torch.equal(extension.knn(pool, present, queries, k, chunk, method), want)


@pytest.mark.parametrize("method", ["auto", "sort"])
def test_knn_integer_pools(extension, method):
    pool = torch.randint(-3, 4, (70, 24), generator=_gen(25))
    present = torch.rand(70, generator=_gen(26)) > 0.2
    queries = torch.tensor([1, 7, 69, 7])
    assert torch.equal(extension.knn(pool, present, queries, 6, 0, method), reference.knn(pool, present, queries, 6))


@pytest.mark.parametrize("method", ["auto", "sort"])
def test_knn_non_finite_rows_come_last(extension, method):
    pool = torch.randn(30, 8, generator=_gen(27))
    pool[5, 2] = float("nan")
    pool[11, 0] = float("inf")
    pool[17] = 1e30  # finite, but its squared norm overflows float32
    present = torch.ones(30, dtype=torch.bool)
    present[2] = False
    queries = torch.tensor([0, 1, 17])
    for k in (5, 28):
        got = extension.knn(pool, present, queries, k, 0, method)
        assert torch.equal(got, _exact_order(pool, present, queries, got.shape[1]))
    assert got[0, -2:].tolist() == [11, 5]  # inf, then NaN
    assert torch.equal(extension.knn(pool, present, queries, 5, 0, method), reference.knn(pool, present, queries, 5))


def test_knn_reduced_fp32_matmul_precision_stays_exact():
    # bf16/tf32 matmuls would void the float32 error bound: the op must notice and stay exact
    pool = _far_rows(seed=28, n=40, p=64, clusters=2)
    present = torch.ones(40, dtype=torch.bool)
    queries = torch.arange(0, 40, 5)
    want = reference.knn(pool, present, queries, 10)
    before = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert torch.equal(cpp.knn(pool, present, queries, 10), want)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def test_server_knn_selection_matches_reference():
    g = _gen(12)
    init = torch.randn(4, 16, generator=g)
    uploads = {cid: torch.randn(4, 16, generator=g) for cid in range(20) if cid % 5 != 3}  # some never uploaded
    uploads[11] = uploads[4].clone()  # a duplicate: a tie the lower id must win
    results = {}
    for backend in ("reference", "cpp"):
        knn = ops.select_ops(pins={"knn": backend}).knn
        server = Server(20, init, train_sizes=[10] * 20, frac=0.5, seed=0, selection=KnnSelection(), knn=knn)
        for cid, prompt in uploads.items():
            server.receive(cid, prompt)
        view = server.snapshot()
        results[backend] = [server.select_experts(cid, view, 5) for cid in range(20)]
    assert results["cpp"] == results["reference"]
    assert results["cpp"][4][0] == 11 and results["cpp"][11][0] == 4


def test_cpp_backend_is_offered():
    assert "cpp" in ops.available_backends()["knn"]
    assert "cpp" in ops.available_backends()["assemble_prompts"]


# ----------------------------------------------------------------------------------------------- CUDA
needs_cuda_build = pytest.mark.skipif(not cpp.cuda_built(), reason="pfedmoap._C was built without CUDA")


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(10, 102, 16, 60, 512)])
def test_cuda_assemble_matches_reference(shape, dtype):
    _check_assemble(*_prompt_parts(*shape, dtype=dtype, seed=sum(shape), device="cuda"))


@pytest.mark.cuda
@needs_cuda_build
def test_cuda_assemble_misaligned_views():
    # views that start mid-row: the kernel must fall back to narrower copies
    prefix, suffix, ctx = _prompt_parts(3, 5, 4, 3, 9, torch.float16, device="cuda")
    big = torch.randn(3 * 4 * 9 + 1, device="cuda", dtype=torch.float16)
    ctx = big[1:].view(3, 4, 9)
    _check_assemble(prefix, suffix, ctx)


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("k", [1, 9, 32, 64, 65, 300])
@pytest.mark.parametrize(("method", "chunk"), [("auto", 0), ("auto", 1000), ("auto", 333), ("sort", 1000)])
def test_cuda_knn_matches_reference(extension, k, method, chunk):
    n = 4000  # several blocks when chunk > 0
    pool = _int_pool(n, 64, seed=k)
    present = torch.rand(n, generator=_gen(k)) > 0.1
    queries = torch.randint(0, n, (37,), generator=_gen(k + 1))
    want = reference.knn(pool, present, queries, k)
    got = extension.knn(pool.cuda(), present.cuda(), queries.cuda(), k, chunk, method)
    assert got.is_cuda and torch.equal(got.cpu(), want)


@pytest.mark.cuda
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_knn_dtypes(dtype):
    pool = _int_pool(300, 16 * 32, seed=3).to(dtype)  # integers up to 3: exact in every dtype
    present = torch.ones(300, dtype=torch.bool)
    present[::7] = False
    queries = torch.arange(0, 300, 11)
    want = reference.knn(pool, present, queries, 10)
    assert torch.equal(cpp.knn(pool.cuda(), present.cuda(), queries.cuda(), 10).cpu(), want)


@pytest.mark.cuda
@needs_cuda_build
def test_cuda_knn_gaussian_prompts_and_tf32_stays_off():
    pool = torch.randn(500, 16, 512, generator=_gen(4))
    present = torch.ones(500, dtype=torch.bool)
    queries = torch.arange(0, 500, 50)
    want = reference.knn(pool, present, queries, 9)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # the op must not use it, and must leave the setting alone
    try:
        got = cpp.knn(pool.cuda(), present.cuda(), queries.cuda(), 9).cpu()
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_cuda_tensors_without_cuda_kernels_use_the_reference(monkeypatch):
    monkeypatch.setattr(cpp, "cuda_built", lambda: False)
    pool = torch.randn(20, 8, device="cuda")
    present = torch.ones(20, dtype=torch.bool, device="cuda")
    got = cpp.knn(pool, present, torch.tensor([3], device="cuda"), 4)
    assert torch.equal(got, reference.knn(pool, present, torch.tensor([3], device="cuda"), 4))
    prefix, suffix, ctx = _prompt_parts(2, 3, 4, 2, 8, torch.float32, device="cuda")
    assert torch.equal(cpp.assemble_prompts(prefix, suffix, ctx), reference.assemble_prompts(prefix, suffix, ctx))
