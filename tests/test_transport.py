"""FedOTP's unbalanced Sinkhorn against a naive dense implementation, its constraints, and its logits' gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pfedmoap.methods.transport import transport_logits, unbalanced_sinkhorn


def naive_plan(sim: np.ndarray, eps: float, top_percent: float, iters: int) -> np.ndarray:
    """One problem at a time, in the direct domain and float64, for a fixed number of iterations (the textbook
    form of FedOTP's iteration: u <- min(a / K v, 1), v <- b / K^T u)."""
    m, n = sim.shape
    gamma = min(1.0, top_percent)
    k = np.exp(-(1.0 - sim) / eps)
    a, b = np.full(m, 1.0 / m), np.full(n, gamma / n)
    u, v = np.ones(m), np.ones(n)
    for _ in range(iters):
        u = np.minimum(a / (k @ v), 1.0)
        v = b / (k.T @ u)
    return u[:, None] * k * v[None, :]


@pytest.mark.parametrize("m,n,eps,top", [(4, 2, 0.1, 0.8), (9, 3, 0.2, 1.0), (5, 2, 0.05, 0.5)])
def test_sinkhorn_matches_naive_dense(m: int, n: int, eps: float, top: float) -> None:
    gen = torch.Generator().manual_seed(m * 100 + n)
    sim = torch.rand(3, 4, m, n, generator=gen, dtype=torch.float64) * 1.6 - 0.6  # cosines in [-0.6, 1]
    plan = unbalanced_sinkhorn(sim, eps, top, thresh=0.0, max_iter=40)  # thresh 0: exactly 40 iterations
    for idx in np.ndindex(3, 4):
        ref = naive_plan(sim[idx].numpy(), eps, top, 40)
        np.testing.assert_allclose(plan[idx].numpy(), ref, rtol=1e-9, atol=1e-12)


def test_plan_satisfies_the_mass_constraints() -> None:
    gen = torch.Generator().manual_seed(3)
    sim = torch.rand(64, 7, 2, generator=gen) * 0.5  # float32, the tiny model's range of cosines
    plan = unbalanced_sinkhorn(sim, eps=0.01, top_percent=0.8, thresh=1e-6, max_iter=500)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-2), torch.full((64, 2), 0.4), rtol=1e-5, atol=1e-6)  # every prompt: 0.4
    assert (plan.sum(-1) <= 1 / 7 + 1e-5).all()  # no local feature sends more than its share
    torch.testing.assert_close(plan.sum((-2, -1)), torch.full((64,), 0.8), rtol=1e-5, atol=1e-6)


def test_small_eps_and_negative_cosines_stay_finite() -> None:
    """eps = 0.01 with cosines near -1: exp(-(1 - s) / eps) underflows to 0 even in float32, so the direct
    iteration divides 0 by 0; the log-domain one must not."""
    sim = torch.tensor([[[-0.9, -0.95], [-0.99, -0.97], [-0.8, -0.85], [-0.9, -0.6]]])
    assert torch.exp(-(1 - sim) / 0.01).max() == 0  # the direct kernel is all zeros here
    plan = unbalanced_sinkhorn(sim, eps=0.01, top_percent=0.8)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-2), torch.full((1, 2), 0.4), rtol=1e-5, atol=1e-6)


def test_half_precision_input_is_solved_in_float32() -> None:
    sim = (torch.rand(8, 4, 2) * 0.4).to(torch.bfloat16)
    plan = unbalanced_sinkhorn(sim, eps=0.01, top_percent=0.8)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()


def naive_published(sim: np.ndarray, eps: float, top_percent: float, thresh: float, max_iter: int) -> np.ndarray:
    """FedOTP's released stopping rule, stated directly: a batch of problems [P, M, N] iterated together in the
    direct domain (float64) from u = v = 1, stopping when the mean over the whole batch of |v - v_prev| is below
    ``thresh`` (checked after each iteration) or after ``max_iter`` iterations."""
    p, m, n = sim.shape
    gamma = min(1.0, top_percent)
    k = np.exp(-(1.0 - sim) / eps)
    a, b = 1.0 / m, gamma / n
    u, v = np.ones((p, m)), np.ones((p, n))
    for _ in range(max_iter):
        previous = v
        u = np.minimum(a / np.einsum("pmn,pn->pm", k, v), 1.0)
        v = b / np.einsum("pmn,pm->pn", k, u)
        if np.abs(v - previous).mean() < thresh:
            break
    return u[:, :, None] * k * v[:, None, :]


@pytest.mark.parametrize("eps,thresh", [(0.1, 1e-3), (0.2, 1e-2), (0.3, 1e-1)])
def test_published_rule_matches_the_direct_statement(eps: float, thresh: float) -> None:
    gen = torch.Generator().manual_seed(int(eps * 100))
    sim = torch.rand(12, 6, 2, generator=gen, dtype=torch.float64) * 0.6
    ref = naive_published(sim.numpy(), eps, 0.8, thresh, 500)
    plan = unbalanced_sinkhorn(sim, eps, 0.8, thresh=thresh, max_iter=500, rule="published")
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-9, atol=1e-12)
    # and the iteration count matters here: the same problems run to convergence give another plan
    converged = unbalanced_sinkhorn(sim, eps, 0.8, thresh=0.0, max_iter=2000)
    assert not np.allclose(converged.numpy(), ref, rtol=1e-6, atol=1e-9)


def test_published_rule_never_fires_at_eps_001_and_ours_does() -> None:
    """At eps = 0.01 the true v is about 1 / K ~ 1e30, so the mean change of v never drops below 1e-3 and all
    ``max_iter`` iterations run (as in FedOTP's code); the scale-free log-v rule stops earlier."""
    gen = torch.Generator().manual_seed(5)
    sim = 0.3 + torch.rand(32, 16, 2, generator=gen) * 0.05  # close cosines: log v settles in about 20 iterations
    full = unbalanced_sinkhorn(sim, 0.01, 0.8, thresh=0.0, max_iter=100, rule="log-v")  # exactly 100 iterations
    published = unbalanced_sinkhorn(sim, 0.01, 0.8, thresh=1e-3, max_iter=100, rule="published")
    ours = unbalanced_sinkhorn(sim, 0.01, 0.8, thresh=1e-3, max_iter=100, rule="log-v")
    torch.testing.assert_close(published, full, rtol=0, atol=0)
    assert not torch.equal(ours, full)
    torch.testing.assert_close(ours, full, rtol=0.05, atol=2e-3)  # the same fixed point, nearly reached


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="rule must be one of published, log-v"):
        unbalanced_sinkhorn(torch.zeros(1, 2, 2), eps=0.1, top_percent=0.8, rule="v")


def test_stops_early_on_the_threshold() -> None:
    sim = torch.rand(16, 5, 2) * 0.3
    converged = unbalanced_sinkhorn(sim, 0.1, 0.8, thresh=0.0, max_iter=2000, rule="log-v")
    tight = unbalanced_sinkhorn(sim, 0.1, 0.8, thresh=1e-7, max_iter=2000, rule="log-v")
    loose = unbalanced_sinkhorn(sim, 0.1, 0.8, thresh=1e-2, max_iter=2000, rule="log-v")
    torch.testing.assert_close(tight, converged, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(loose, converged, rtol=1e-4, atol=1e-7)  # it stopped before converging
    torch.testing.assert_close(loose, converged, rtol=0.2, atol=1e-2)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="eps"):
        unbalanced_sinkhorn(torch.zeros(1, 2, 2), eps=0.0, top_percent=0.8)
    with pytest.raises(ValueError, match="top_percent"):
        unbalanced_sinkhorn(torch.zeros(1, 2, 2), eps=0.1, top_percent=0.0)


def test_logits_equal_the_plan_weighted_similarity_and_its_gradient_treats_the_plan_as_constant() -> None:
    gen = torch.Generator().manual_seed(5)
    local = F.normalize(torch.randn(6, 4, 8, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(2, 3, 8, generator=gen, dtype=torch.float64), dim=-1).requires_grad_(True)
    logits = transport_logits(local, text, gamma=10.0, eps=0.1, top_percent=0.8, thresh=0.0, max_iter=30)
    # reference: plain loops over (image, class), the plan from the naive solver, held constant
    expected = torch.zeros(6, 3, dtype=torch.float64)
    for b in range(6):
        for c in range(3):
            sim = local[b] @ text[:, c].t()  # [M, N]
            plan = torch.from_numpy(naive_plan(sim.detach().numpy(), 0.1, 0.8, 30))
            expected[b, c] = 10.0 * (plan * sim).sum()
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-12)
    weights = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logits * weights).sum(), text)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), text)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert math.isfinite(float(grad.abs().sum())) and float(grad.abs().sum()) > 0
