"""The Triton gate-and-score op against its plain-torch twin: forward, backward, every dtype, odd shapes.

Without a GPU the kernels run on CPU tensors in the Triton interpreter (conftest sets TRITON_INTERPRET=1
before anything imports triton), so shapes stay small; the `cuda` tests run paper-size shapes on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pfedmoap import ops  # noqa: E402
from pfedmoap.gates import AttentionGate, pfedmoap_logits  # noqa: E402
from pfedmoap.ops import reference, triton_gate  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_runner = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (B, C, E, d, H): E = 1 (local expert only), B = C = 1, head width 2, 3 and 4 (below tl.dot's 16), a
# width that is not a power of two, 32 and 64 heads (more than the 16 padded head slots), odd batch
# remainders, and the largest supported sizes (E = 64, d = 1024)
SHAPES = [
    (3, 5, 4, 32, 8),
    (1, 1, 1, 32, 1),
    (17, 3, 2, 32, 16),
    (2, 4, 3, 48, 3),
    (5, 2, 6, 64, 32),
    (20, 6, 10, 128, 8),
    (3, 2, 64, 1024, 8),  # the range edges: 64 experts, d = 1024
    (2, 2, 5, 1024, 64),  # 64 heads (head width 16)
    (4, 3, 7, 96, 12),  # 12 heads of width 8, d not a power of two
]
# relative-error bounds for fp32 results; low-precision inputs are judged against their own reference error
FP32_TOL = {"out": 1e-5, "grad": 5e-5}  # measured: up to 2e-6 / 2.5e-6 at d = 1024, E = 64


def make_inputs(batch, classes, experts, dim, dtype, device, seed, with_local=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    query = rand(batch, dim)
    feats = rand(experts, classes, dim)
    weights = []
    for _ in range(4):
        weights += [rand(dim, dim, scale=dim**-0.5), rand(dim, scale=0.1)]
    local = rand(batch, classes) if with_local else None
    return query, feats, weights, local


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def both(query, feats, weights, local, heads, need_weights=True, gamma=3.0, scaling=0.7, lam=0.5):
    """(outputs, weights, grads) of the fused op and of the reference on the same inputs and upstream grad."""
    inputs = [query, feats, *weights] + ([local] if local is not None else [])
    results = []
    upstream = None
    for impl in (triton_gate.gate_score, reference.gate_score):
        out, attn = impl(
            query, feats, *weights, gamma=gamma, heads=heads, scaling=scaling, need_weights=need_weights,
            local=local, lam=lam,
        )  # fmt: skip
        if upstream is None:
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, inputs, upstream)
        results.append((out, attn, grads))
    return results


def check_bk(grads_fused, grads_ref, tol):
    """b_K shifts every expert's key alike, so the scores' softmax ignores it: its true gradient is zero.
    Both implementations must agree it is negligible next to the W_K gradient (relative error is noise)."""
    scale = grads_ref[4].float().norm()
    assert grads_fused[5].float().norm() <= tol * scale
    assert grads_ref[5].float().norm() <= tol * scale


@needs_runner
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-E{}-d{}-H{}".format(*s))
def test_fp32_forward_and_backward_match_reference(shape):
    batch, classes, experts, dim, heads = shape
    query, feats, weights, local = make_inputs(batch, classes, experts, dim, torch.float32, DEVICE, seed=sum(shape))
    (out, attn, grads), (out_r, attn_r, grads_r) = both(query, feats, weights, local, heads)
    assert out.dtype == torch.float32 and out.shape == (batch, classes)
    assert rel(out, out_r) < FP32_TOL["out"]
    assert rel(attn, attn_r) < FP32_TOL["out"]
    assert torch.allclose(attn.sum(-1), torch.ones(batch, classes, device=DEVICE), atol=1e-5)
    names = ["query", "experts", "W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "local"]
    for name, g, g_r in zip(names, grads, grads_r, strict=True):
        if name == "b_K":
            continue
        assert g.shape == g_r.shape and g.dtype == g_r.dtype, name
        assert rel(g, g_r) < FP32_TOL["grad"], name
    check_bk(grads, grads_r, 1e-4)


@needs_runner
def test_expert_gradient_torch_twin_equals_the_kernel(monkeypatch):
    """Widths past EXPERT_KERNEL_MAX_D_PAD take dK, dV from the torch twin (the kernel would not fit in shared
    memory): at a width both can run, the twin gives the kernel's gradients."""
    shape = (20, 6, 10, 128, 8)
    query, feats, weights, local = make_inputs(*shape[:4], torch.float32, DEVICE, seed=11)
    (_, _, kernel_grads), _ = both(query, feats, weights, local, shape[4])
    monkeypatch.setattr(triton_gate, "EXPERT_KERNEL_MAX_D_PAD", 0)
    (_, _, twin_grads), (_, _, ref_grads) = both(query, feats, weights, local, shape[4])
    for i, (g, g_k, g_r) in enumerate(zip(twin_grads, kernel_grads, ref_grads, strict=True)):
        if i == 5:  # b_K: zero in exact arithmetic
            continue
        assert rel(g, g_k) < 1e-5, i
        assert rel(g, g_r) < FP32_TOL["grad"], i
    assert triton_gate._launch_config(16, 1024, 8)[1] > 256  # d = 1024 takes the twin in a real run


def check_low_precision(batch, classes, experts, dim, heads, dtype, device, seed):
    """Both ops run on the same bf16/fp16 inputs; against an fp32 evaluation of those very values, the fused
    op (fp32 accumulation) must be at least about as accurate as the plain-torch op in that dtype."""
    query, feats, weights, local = make_inputs(batch, classes, experts, dim, dtype, device, seed)
    exact = [t.detach().float().requires_grad_() for t in (query, feats, *weights, local)]
    (out, attn, grads), (out_r, attn_r, grads_r) = both(query, feats, weights, local, heads)
    (out_x, _, grads_x), _ = both(exact[0], exact[1], exact[2:10], exact[10], heads)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    bound = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]  # a few ulps of the storage precision
    assert rel(out, out_x) < max(2 * rel(out_r, out_x), bound)
    for i, (g, g_r, g_x) in enumerate(zip(grads, grads_r, grads_x, strict=True)):
        if i == 5:  # b_K: zero in exact arithmetic
            continue
        assert rel(g, g_x) < max(2 * rel(g_r, g_x), 2 * bound), i


@needs_runner
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_no_worse_than_the_reference(dtype):
    check_low_precision(6, 5, 6, 64, 8, dtype, DEVICE, seed=11)


@needs_runner
def test_under_autocast_the_bf16_path_runs_with_fp32_logits_and_master_grads(monkeypatch):
    """--precision bf16: under autocast the fused op casts the query, experts and fp32 gate weights to bf16 and runs
    the kernels on them (the bf16 path); the logits come back in fp32, the grads in fp32 (the master weights), and
    they match the fp32 reference evaluated on the bf16-rounded inputs within bf16 accuracy."""
    query, feats, weights, local = make_inputs(6, 5, 6, 64, torch.float32, DEVICE, seed=5)
    seen = []
    apply = triton_gate._GateScore.apply
    monkeypatch.setattr(triton_gate._GateScore, "apply", lambda *a: seen.append((a[0].dtype, a[2].dtype)) or apply(*a))
    inputs = [query, feats, *weights, local]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out, _ = triton_gate.gate_score(
            query, feats, *weights, gamma=3.0, heads=8, scaling=0.7, local=local, lam=0.5
        )  # fmt: skip
    assert seen == [(torch.bfloat16, torch.bfloat16)] and out.dtype == torch.float32
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    grads = torch.autograd.grad(out, inputs, upstream)
    assert all(g.dtype == torch.float32 for g in grads)
    rounded = [t.detach().to(torch.bfloat16).float().requires_grad_() for t in inputs[:-1]] + [
        local.detach().requires_grad_()
    ]
    out_x, _ = reference.gate_score(
        rounded[0], rounded[1], *rounded[2:10], gamma=3.0, heads=8, scaling=0.7, local=rounded[10], lam=0.5
    )  # fmt: skip
    grads_x = torch.autograd.grad(out_x, rounded, upstream)
    assert rel(out, out_x) < 2e-2
    for i, (g, g_x) in enumerate(zip(grads, grads_x, strict=True)):
        if i != 5:  # b_K: zero in exact arithmetic
            assert rel(g, g_x) < 4e-2, i


@needs_runner
def test_without_local_logits_and_weights():
    query, feats, weights, _ = make_inputs(4, 3, 5, 32, torch.float32, DEVICE, seed=3, with_local=False)
    (out, attn, grads), (out_r, attn_r, grads_r) = both(query, feats, weights, None, 4, need_weights=False)
    assert attn is None and attn_r is None
    assert rel(out, out_r) < FP32_TOL["out"]
    assert max(rel(g, g_r) for i, (g, g_r) in enumerate(zip(grads, grads_r, strict=True)) if i != 5) < FP32_TOL["grad"]


@needs_runner
def test_through_the_gate_module_with_the_dispatch():
    """pfedmoap_logits with the triton backend pinned gives the reference's logits and parameter grads."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(7, 64), dim=-1).to(DEVICE)
    local = F.normalize(torch.randn(9, 64), dim=-1).to(DEVICE).requires_grad_()
    experts = F.normalize(torch.randn(3, 9, 64), dim=-1).to(DEVICE)
    gate = AttentionGate(32, heads=8).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        gate.ops = ops.select_ops(pins={"gate_score": backend})
        logits, attn = pfedmoap_logits(image, local, experts, gate, 100.0, 0.5, need_weights=True)
        # not cross-entropy: its gradient sums to zero over classes, which makes b_V's and b_O's zero
        loss = (logits * torch.linspace(-1, 2, 63, device=DEVICE).view(7, 9)).sum()
        grads = torch.autograd.grad(loss, [local, *gate.parameters()])
        results.append((logits, attn, grads))
    (lf, af, gf), (lr, ar, gr) = results
    assert rel(lf, lr) < 1e-5 and rel(af, ar) < 1e-5
    for i, (a, b) in enumerate(zip(gf, gr, strict=True)):
        if i == 4:  # b_K (local, W_Q, b_Q, W_K, b_K, ...): zero in exact arithmetic
            assert a.norm() <= 1e-4 * gr[3].norm()
            continue
        assert rel(a, b) < 5e-5, i


def test_cpu_tensors_without_the_interpreter_use_the_reference(monkeypatch):
    """Outside CUDA and the interpreter the op quietly runs the reference (same numbers, no kernel launch)."""
    monkeypatch.setattr(triton_gate, "INTERPRET", False)
    query, feats, weights, local = make_inputs(2, 3, 2, 32, torch.float32, "cpu", seed=5)
    out, _ = triton_gate.gate_score(query, feats, *weights, gamma=2.0, heads=4, scaling=1.0, local=local, lam=0.5)
    want, _ = reference.gate_score(query, feats, *weights, gamma=2.0, heads=4, scaling=1.0, local=local, lam=0.5)
    assert torch.equal(out, want)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("batch", "classes", "experts", "dim", "heads", "dtype"),
    [
        (16, 10, 10, 128, 8, torch.float32),
        (256, 1000, 40, 128, 8, torch.float32),
        (64, 102, 64, 1024, 8, torch.float32),
        (33, 37, 20, 96, 12, torch.float32),
        (128, 102, 10, 128, 8, torch.bfloat16),
        (128, 102, 10, 256, 8, torch.float16),
    ],
)
def test_cuda_paper_shapes(batch, classes, experts, dim, heads, dtype):
    if dtype != torch.float32:
        check_low_precision(batch, classes, experts, dim, heads, dtype, "cuda", seed=batch + classes)
        return
    query, feats, weights, local = make_inputs(batch, classes, experts, dim, dtype, "cuda", seed=batch + classes)
    (out, attn, grads), (out_r, attn_r, grads_r) = both(query, feats, weights, local, heads)
    assert rel(out, out_r) < 1e-5
    assert rel(attn, attn_r) < 1e-5
    for i, (g, g_r) in enumerate(zip(grads, grads_r, strict=True)):
        if i != 5:
            assert rel(g, g_r) < 1e-4, i
    check_bk(grads, grads_r, 1e-3)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-E{}-d{}-H{}".format(*s))
def test_factored_torch_backend_matches_reference(shape):
    """The CPU backend (same algebra as the kernels, in torch) against the reference, forward and backward."""
    from pfedmoap.ops import factored

    batch, classes, experts, dim, heads = shape
    query, feats, weights, local = make_inputs(batch, classes, experts, dim, torch.float64, "cpu", seed=sum(shape))
    inputs = [query, feats, *weights, local]
    outs = []
    for impl in (factored.gate_score, reference.gate_score):
        out, attn = impl(query, feats, *weights, gamma=3.0, heads=heads, scaling=0.7, need_weights=True,
                         local=local, lam=0.5)  # fmt: skip
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out).double()).sum(), inputs)
        outs.append((out, attn, grads))
    (out, attn, grads), (out_r, attn_r, grads_r) = outs
    assert rel(out, out_r) < 1e-12 and rel(attn, attn_r) < 1e-12
    for i, (g, g_r) in enumerate(zip(grads, grads_r, strict=True)):
        if i != 5:  # b_K: zero in exact arithmetic
            assert rel(g, g_r) < 1e-10, i


# ---------------------------------------------------------------------------------------------- the client axis
# (M, B, C, E, d, H): one client; several with one row block each; ragged rows and heads below 16; many class
# groups in the query backward (C > 64); the widest gate (expert gradients from the torch twin)
CLIENT_SHAPES = [
    (1, 3, 5, 4, 32, 8),
    (3, 17, 3, 2, 32, 16),
    (4, 5, 2, 3, 48, 3),
    (2, 2, 70, 2, 16, 2),
    (2, 3, 2, 3, 1024, 8),
]


def client_inputs(clients, batch, classes, experts, dim, dtype, device, seed):
    """M clients' own tensors stacked on a leading axis (each client its own draw)."""
    per = [make_inputs(batch, classes, experts, dim, dtype, "cpu", seed + m) for m in range(clients)]

    def stack(ts):
        return torch.stack([t.detach() for t in ts]).to(device).requires_grad_()

    query = stack([p[0] for p in per])
    feats = stack([p[1] for p in per])
    weights = [stack([p[2][i] for p in per]) for i in range(8)]
    local = stack([p[3] for p in per])
    return query, feats, weights, local


def client_axis_against_each_client(impl, inputs, heads, tol_out, tol_grad, double=False):
    """``impl`` over the client axis against the reference run on each client alone: logits, attention and the
    gradient of every input, client by client (an upstream gradient that differs per element)."""
    query, feats, weights, local = inputs
    flat = [query, feats, *weights, local]
    kwargs = dict(gamma=3.0, heads=heads, scaling=0.7, need_weights=True, lam=0.5)
    out, attn = impl(query, feats, *weights, local=local, **kwargs)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad(out, flat, upstream)
    for m in range(query.shape[0]):
        mine = [t.detach()[m].clone().requires_grad_() for t in flat]
        out_r, attn_r = reference.gate_score(mine[0], mine[1], *mine[2:10], local=mine[10], **kwargs)
        grads_r = torch.autograd.grad(out_r, mine, upstream[m])
        assert rel(out[m], out_r) <= tol_out and rel(attn[m], attn_r) <= tol_out, m
        for i, (g, g_r) in enumerate(zip(grads, grads_r, strict=True)):
            if i == 5:  # b_K: zero in exact arithmetic
                assert g[m].float().norm() <= 1e-3 * grads_r[4].float().norm() + 1e-12
                continue
            assert g.shape[1:] == g_r.shape and rel(g[m], g_r) <= tol_grad, (m, i)


@needs_runner
@pytest.mark.parametrize("shape", CLIENT_SHAPES, ids=lambda s: "M{}-B{}-C{}-E{}-d{}-H{}".format(*s))
def test_client_axis_kernels_equal_each_client_alone(shape):
    """The kernels' client axis (one launch for every client, forward and backward) against the reference on each
    client's own tensors, fresh random inputs per client."""
    clients, batch, classes, experts, dim, heads = shape
    inputs = client_inputs(clients, batch, classes, experts, dim, torch.float32, DEVICE, seed=sum(shape))
    client_axis_against_each_client(triton_gate.gate_score_clients, inputs, heads, FP32_TOL["out"], FP32_TOL["grad"])


@needs_runner
def test_client_axis_under_autocast_gives_fp32_logits_and_master_grads():
    kind = "cuda" if HAS_CUDA else "cpu"
    query, feats, weights, local = client_inputs(2, 4, 3, 2, 32, torch.float32, DEVICE, seed=11)
    with torch.autocast(kind, dtype=torch.bfloat16):
        out, _ = triton_gate.gate_score_clients(query, feats, *weights, gamma=3.0, heads=4, scaling=0.7, local=local)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 3)
    out.sum().backward()
    assert weights[0].grad.dtype == torch.float32 and query.grad.shape == query.shape
    ref, _ = reference.gate_score_clients(
        query.detach(), feats.detach(), *(w.detach() for w in weights), gamma=3.0, heads=4, scaling=0.7,
        local=local.detach(),
    )  # fmt: skip
    assert rel(out.detach(), ref) < 2e-2  # bf16 inputs


@pytest.mark.parametrize("shape", CLIENT_SHAPES[:4], ids=lambda s: "M{}-B{}-C{}-E{}-d{}-H{}".format(*s))
def test_factored_client_axis_equals_each_client_alone(shape):
    """The CPU backend's client axis (batched torch ops) against the reference per client, float64."""
    from pfedmoap.ops import factored

    clients, batch, classes, experts, dim, heads = shape
    inputs = client_inputs(clients, batch, classes, experts, dim, torch.float64, "cpu", seed=sum(shape))
    client_axis_against_each_client(factored.gate_score_clients, inputs, heads, 1e-12, 1e-10)


def test_reference_client_axis_is_each_client_alone():
    inputs = client_inputs(3, 4, 3, 2, 16, torch.float64, "cpu", seed=5)
    client_axis_against_each_client(reference.gate_score_clients, inputs, 4, 0.0, 0.0)


def test_the_op_table_takes_the_client_axis_from_the_gate_scores_backend():
    from pfedmoap.ops import factored

    modules = {"reference": reference, "triton": triton_gate, "factored": factored}
    for backend in ops.available_backends()["gate_score"]:
        table = ops.select_ops(pins={"gate_score": backend})
        assert table.gate_score_clients is modules[backend].gate_score_clients, backend
    assert ops.REFERENCE.gate_score_clients is reference.gate_score_clients
