"""The CUDA kernels' per-thread logic, run on the host (issue 28, item 3).

The kernels in ``csrc/cuda/`` call the ``__host__ __device__`` functions of ``csrc/kernel_logic.h`` for every index
they read and write; ``csrc/host_kernels.cpp`` runs the same functions over a launch's grid and block, thread by
thread (warp shuffles with their exact semantics). So these tests check, without a GPU, which thread reads and writes
which index and every bound: one block, one thread, ragged last blocks, more threads than work, k = 1, k = n - 1,
the largest list the kernel keeps, ties, and keys that are +inf or NaN; each against the reference op.
"""

from __future__ import annotations

import pytest
import torch

from pfedmoap.ops import reference

_C = pytest.importorskip("pfedmoap._C", reason="the extension pfedmoap._C is not built")
if not hasattr(_C, "_host_knn_merge_block"):
    pytest.skip("pfedmoap._C predates the host drivers: rebuild it", allow_module_level=True)

THREADS = _C.kernel_threads  # every kernel's block
NO_ID = torch.iinfo(torch.int64).max
# (grid, block): one thread; one block; a ragged grid (work not a multiple of the threads); more threads than work
LAUNCHES = [(1, 1), (1, THREADS), (3, 7), (5, THREADS), (64, THREADS)]


def _assembly_inputs(dtype, classes=3, pre=1, n_ctx=4, seq=5, width=8, experts=2, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return rand(classes, pre, width), rand(classes, seq, width), rand(experts, n_ctx, width)


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda g: f"grid{g[0]}-block{g[1]}")
@pytest.mark.parametrize(
    ("dtype", "width", "unit"),
    [
        (torch.float32, 8, 16),
        (torch.float32, 8, 4),
        (torch.float16, 3, 2),
        (torch.bfloat16, 4, 8),
        (torch.float64, 1, 8),
    ],
    ids=["fp32-16B", "fp32-4B", "fp16-odd-width-2B", "bf16-8B", "fp64-one-wide"],
)
def test_assembly_forward_writes_every_element_once_as_the_reference(launch, dtype, width, unit):
    prefix, suffix, ctx = _assembly_inputs(dtype, width=width)
    out = _C._host_assemble_prompts(prefix, suffix, ctx, *launch, unit)
    assert torch.equal(out.view(torch.uint8), reference.assemble_prompts(prefix, suffix, ctx).view(torch.uint8))


@pytest.mark.parametrize(("classes", "seq", "n_ctx"), [(1, 0, 1), (4, 3, 16), (7, 2, 2)])
def test_assembly_forward_edges(classes, seq, n_ctx):
    """One class, no suffix at all (S = 0), one context vector; a long context; odd sizes."""
    prefix, suffix, ctx = _assembly_inputs(torch.float32, classes=classes, seq=seq, n_ctx=n_ctx, experts=3, seed=4)
    for launch in LAUNCHES:
        out = _C._host_assemble_prompts(prefix, suffix, ctx, *launch, 4)
        assert torch.equal(out, reference.assemble_prompts(prefix, suffix, ctx)), launch


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda g: f"grid{g[0]}-block{g[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_assembly_backward_sums_each_context_value_over_classes_in_order(launch, dtype):
    experts, classes, pre, n_ctx, seq, width = 3, 5, 1, 4, 3, 6
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(experts * classes, pre + n_ctx + seq, width, generator=gen).to(dtype)
    got = _C._host_assemble_prompts_backward(grad, experts, classes, pre, n_ctx, *launch)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the kernel's accumulator
    ctx_part = grad.view(experts, classes, -1, width)[:, :, pre : pre + n_ctx].to(acc_dtype)
    expected = torch.zeros(experts, n_ctx, width, dtype=acc_dtype)
    for c in range(classes):  # in class order, as each thread adds
        expected += ctx_part[:, c]
    assert torch.equal(got, expected.to(dtype))
    # the autograd reference agrees (its sum order may differ: float32 tolerance)
    ctx = torch.zeros(experts, n_ctx, width, dtype=torch.float64, requires_grad=True)
    prefix = torch.zeros(classes, pre, width, dtype=torch.float64)
    suffix = torch.zeros(classes, seq, width, dtype=torch.float64)
    (reference.assemble_prompts(prefix, suffix, ctx) * grad.double()).sum().backward()
    torch.testing.assert_close(got.double(), ctx.grad, rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6,
                               atol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6)  # fmt: skip


@pytest.mark.parametrize(("grid", "rows", "cols"), [(1, 1, 1), (1, 9, 33), (2, 40, 100), (100, 3, 64)])
def test_row_norms_one_warp_per_row(grid, rows, cols):
    """Fewer warps than rows (grid-stride over rows), a row shorter than a warp, more warps than rows."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        got = _C._host_row_sq_norms(x.to(dtype), grid, THREADS)
        expected = (x.to(dtype).double() ** 2).sum(1)
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    assert not torch.isnan(_C._host_row_sq_norms(x, 1, 32)).any()  # one warp covers every row


def _merge_expected(keys, col0, best_d, best_i, take):
    """The merged list, by definition: the previous entries and the finite keys of the block, sorted by (key, id),
    the first ``take``, empty slots (+inf, no id)."""
    out_d, out_i = torch.full_like(best_d, float("inf")), torch.full_like(best_i, NO_ID)
    for q in range(keys.shape[0]):
        entries = [(float(d), int(i)) for d, i in zip(best_d[q], best_i[q], strict=True) if int(i) != NO_ID]
        entries += [(float(d), col0 + j) for j, d in enumerate(keys[q]) if float(d) < float("inf")]
        entries.sort()
        for r, (d, i) in enumerate(entries[:take]):
            out_d[q, r], out_i[q, r] = d, i
    return out_d, out_i


def _merge_case(queries, cols, take, seed, ties=False, filled=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(queries, cols, generator=gen, dtype=torch.float64)
    if ties:  # few distinct values: equal keys are ordered by id
        keys = (keys * 4).floor()
    keys[torch.rand(queries, cols, generator=gen) < 0.1] = float("inf")  # absent rows
    keys[torch.rand(queries, cols, generator=gen) < 0.05] = float("nan")
    best_d = torch.full((queries, take), float("inf"), dtype=torch.float64)
    best_i = torch.full((queries, take), NO_ID, dtype=torch.long)
    if filled:  # a running list from an earlier block (ids below this block's), sorted
        prev = torch.sort((torch.rand(queries, filled, generator=gen, dtype=torch.float64) * 4).floor(), dim=1).values
        best_d[:, :filled] = prev
        best_i[:, :filled] = torch.arange(filled).expand(queries, filled)
    return keys, best_d, best_i


@pytest.mark.parametrize(
    ("cols", "take", "ties", "filled"),
    [
        (1, 1, False, 0),  # one column
        (10, 1, True, 0),  # k = 1 with ties
        (10, 9, False, 0),  # k = n - 1
        (600, 64, True, 30),  # the kernel's longest list, more columns than threads, a half-full running list
        (300, 17, True, 17),  # a full running list merged with ties
        (40, 40, False, 5),  # k = n: every finite key kept
        (5, 8, False, 2),  # fewer finite keys than slots: the rest stay empty
    ],
)
def test_knn_merge_keeps_the_best_take_entries_in_order(cols, take, ties, filled):
    keys, best_d, best_i = _merge_case(queries=3, cols=cols, take=take, seed=cols + take, ties=ties, filled=filled)
    col0 = filled  # this block's pool rows come after the running list's ids
    expected = _merge_expected(keys, col0, best_d, best_i, take)
    _C._host_knn_merge_block(keys, col0, best_d, best_i, take, THREADS)
    assert torch.equal(best_i, expected[1])
    assert torch.equal(best_d, expected[0])


def test_knn_merge_blocks_in_sequence_equal_the_reference_knn():
    """The kernel's use in knn.cpp: the pool's distances in column blocks merged into running lists; the result is
    the reference KNN's, ties to the lower id."""
    gen = torch.Generator().manual_seed(9)
    pool = (torch.rand(50, 6, generator=gen, dtype=torch.float64) * 3).floor()  # many equal distances
    present = torch.rand(50, generator=gen) < 0.8
    queries = torch.tensor([0, 3, 17, 49])
    present[queries] = True
    k = 7
    dist = torch.cdist(pool[queries], pool, compute_mode="donot_use_mm_for_euclid_dist")
    dist[~present.expand(len(queries), -1)] = float("inf")
    dist[torch.arange(len(queries)), queries] = float("inf")
    best_d = torch.full((len(queries), k), float("inf"), dtype=torch.float64)
    best_i = torch.full((len(queries), k), NO_ID, dtype=torch.long)
    for c0 in range(0, 50, 16):  # ragged last block
        _C._host_knn_merge_block(dist[:, c0 : c0 + 16].contiguous(), c0, best_d, best_i, k, THREADS)
    assert torch.equal(best_i, reference.knn(pool, present, queries, k))


def test_bad_launches_are_refused():
    prefix, suffix, ctx = _assembly_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="at least one block"):
        _C._host_assemble_prompts(prefix, suffix, ctx, 0, 1, 4)
    with pytest.raises(RuntimeError, match="must be 1, 2, 4, 8 or 16"):
        _C._host_assemble_prompts(prefix, suffix, ctx, 1, 1, 32)
    half = _assembly_inputs(torch.float16, width=3)  # 6-byte token rows
    with pytest.raises(RuntimeError, match="whole number"):
        _C._host_assemble_prompts(*half, 1, 1, 4)
    with pytest.raises(RuntimeError, match="whole warps"):
        _C._host_row_sq_norms(torch.ones(2, 2), 1, 48)
