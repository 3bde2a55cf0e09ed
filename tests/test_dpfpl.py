"""DP-FPL against explicit statements of its pieces (competitors-2.md §5): the factorisation, the local prompt's
gradient rule, the noise level, one client's exchange, the server's step, and what travels per batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.plan import make_config
from pfedmoap.federated.seeding import Stream, counter_generator
from pfedmoap.methods import Upload, create_method
from pfedmoap.methods.dpfpl import (
    CURSOR,
    GRAD,
    MOMENTUM,
    ORDER,
    SERVER_MOMENTUM,
    _LowRankContext,
    factorize,
    local_prompt_gradient,
    noise_std,
    orthonormalize,
)
from pfedmoap.methods.global_local import LOCAL


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=4, rounds=2, lr_prompt=0.5, method="dpfpl", dpfpl_rank=2)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


def test_gram_schmidt_and_factorisation() -> None:
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    q = orthonormalize(local[:, :3])
    torch.testing.assert_close(q.t() @ q, torch.eye(3, dtype=torch.float64))
    for i in range(3):  # column i spans the first i+1 columns: q_i's component along column j > i is zero
        for j in range(i + 1, 3):
            assert abs(float(q[:, j] @ q[:, i])) < 1e-12
    u, v, residual = factorize(local, 3, torch.Generator().manual_seed(1))
    assert u.shape == (6, 3) and v.shape == (3, 10)
    torch.testing.assert_close(u.t() @ u, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(v @ v.t(), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(u @ v + residual, local)  # the context equals p_G + p_L in value
    # v0 comes from the generator it is handed: the same seed, the same factors
    u2, v2, _ = factorize(local, 3, torch.Generator().manual_seed(1))
    assert torch.equal(u, u2) and torch.equal(v, v2)


def _rule(g: torch.Tensor, u: torch.Tensor, v: torch.Tensor, clip=None, nu=None, nv=None) -> torch.Tensor:
    """The local prompt's gradient, element by element: g_u = g v^T, g_v = u^T g (clipped, noised), /10, then
    g_u v + u g_v + u u^T g_u v."""
    n, w = g.shape
    r = u.shape[1]
    g_u = torch.zeros(n, r, dtype=g.dtype)
    g_v = torch.zeros(r, w, dtype=g.dtype)
    for i in range(n):
        for k in range(r):
            g_u[i, k] = sum(g[i, j] * v[k, j] for j in range(w))
    for k in range(r):
        for j in range(w):
            g_v[k, j] = sum(u[i, k] * g[i, j] for i in range(n))
    if clip is not None:
        for t, noise in ((g_u, nu), (g_v, nv)):
            norm = math.sqrt(sum(float(x) ** 2 for x in t.flatten()))
            if norm > clip:
                t.mul_(clip / norm)
            t.add_(noise)
    g_u, g_v = g_u / 10.0, g_v / 10.0
    out = torch.zeros(n, w, dtype=g.dtype)
    for i in range(n):
        for j in range(w):
            a = sum(g_u[i, k] * v[k, j] for k in range(r))
            b = sum(u[i, k] * g_v[k, j] for k in range(r))
            uu = [sum(u[i, k] * u[m, k] for k in range(r)) for m in range(n)]
            c = sum(uu[m] * sum(g_u[m, k] * v[k, j] for k in range(r)) for m in range(n))
            out[i, j] = a + b + c
    return out


@pytest.mark.parametrize("private", [False, True])
def test_local_prompt_gradient_is_the_published_rule(private: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    local = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    u, v, residual = factorize(local.detach(), 2, gen)
    g = torch.randn(4, 5, generator=gen, dtype=torch.float64) * 30  # long enough to be clipped
    clip, nu, nv = None, None, None
    if private:
        clip, nu, nv = 0.5, torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    out = _LowRankContext.apply(local, u, v, residual, nu, nv, clip)
    torch.testing.assert_close(out.detach(), local.detach())
    (out * g).sum().backward()
    torch.testing.assert_close(local.grad, _rule(g, u, v, clip, nu, nv))


def test_noise_level_is_the_released_codes() -> None:
    cfg = make_config("synthetic", method="dpfpl", dpfpl_epsilon=0.4, rounds=100, batch_size=32, pretrained="none")
    assert noise_std(cfg) == pytest.approx(math.sqrt(100 * math.log(1e5)) / 0.4 * 10 / 32)
    assert noise_std(cfg.replace(**{"dpfpl_epsilon": 0.0})) == 0.0


def test_one_exchange_on_a_client(tiny_clip, small_world) -> None:
    """The loss is CLIP's cross-entropy with p_G + p_L; the upload is p_G's gradient; p_L takes one SGD step with
    momentum from the buffer the client kept; the batch is the next one of the client's own permutation."""
    fed = build(tiny_clip, small_world, batch_size=8, momentum=0.9, weight_decay=5e-4)
    client, m, server = fed.clients[0], fed.method, fed.server
    gen = torch.Generator().manual_seed(3)
    p_l = torch.randn(fed.cfg.n_ctx, tiny_clip.width, generator=gen) * 0.02
    kept = torch.randn(p_l.shape, generator=gen) * 0.01
    order = torch.randperm(client.data.num_train, generator=gen)
    client.private = {LOCAL: p_l, MOMENTUM: kept, ORDER: order, CURSOR: torch.tensor(8)}
    payload = m.payload(server, {}, 0)
    # the statement, from the same starting point
    idx = order[8:16]
    feats, labels = client.data.train_features[idx], client.data.train_labels[idx]
    p_g = server.global_prompt.clone().requires_grad_(True)
    text = fed.encoder.encode((p_g + p_l)[None])[0]
    ref_loss = F.cross_entropy(tiny_clip.gamma * feats @ text.t(), labels)
    ref_loss.backward()
    obj = m.objective(fed.runtime.context, server, client, payload)
    assert torch.equal(obj.batch, idx)
    before = client.generator.get_state()  # u and v are drawn from here, in the loss
    client.train(obj, fed.runtime.settings, tiny_clip)
    up = m.upload(client, obj)
    assert up.prompt is None and set(up.extras) == {GRAD}
    # u v + residual equals p_L up to float32 rounding, so the gradients agree to the text tower's conditioning
    scale = float(p_g.grad.abs().max())
    torch.testing.assert_close(up.extras[GRAD], p_g.grad, rtol=0, atol=1e-4 * scale)
    state = obj.private_state()
    assert int(state[CURSOR]) == 16 and torch.equal(state[ORDER], order)
    # p_L' = p_L - lr buf, buf = 0.9 kept + grad + wd p_L, grad by the published rule from the client's u and v
    buf = state[MOMENTUM]
    torch.testing.assert_close(p_l - state[LOCAL], fed.cfg.lr_prompt * buf)
    replay = torch.Generator()
    replay.set_state(before)
    u, v, _ = factorize(p_l, 2, replay)
    expected = local_prompt_gradient(p_g.grad, u, v)  # d loss / d context = d loss / d p_G
    torch.testing.assert_close(buf - 0.9 * kept - 5e-4 * p_l, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert expected.abs().sum() > 0


def test_a_client_cycles_through_its_data_and_keeps_its_momentum(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, batch_size=24, rounds=1)
    n = fed.clients[0].data.num_train
    assert fed.driver.exchanges == math.ceil(max(fed.world.train_sizes) / 24)
    fed.run()
    for client in fed.clients:
        assert {LOCAL, MOMENTUM, ORDER, CURSOR} <= set(client.private)
        assert int(client.private[CURSOR]) == min(n, fed.driver.exchanges * 24)
    record = fed.rounds[0]
    values = fed.cfg.n_ctx * tiny_clip.width
    assert record.client_bytes_up[0] == record.client_bytes_down[0] == fed.driver.exchanges * values * 4


def test_server_averages_noises_and_steps_with_momentum(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, dpfpl_epsilon=0.2, momentum=0.9, weight_decay=5e-4, rounds=10)
    m, server = fed.method, fed.server
    start = server.global_prompt.clone()
    g = [torch.randn(start.shape, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    m.aggregate(server, {c: Upload(None, {GRAD: g[c]}) for c in range(3)})
    noise = torch.randn(start.shape, generator=counter_generator(fed.cfg.seed, Stream.SERVER_NOISE, 0))
    mean = (g[0] + g[1] + g[2]) / 3 + noise * noise_std(fed.cfg) / 3
    buf = mean + 5e-4 * start
    torch.testing.assert_close(server.global_prompt, start - fed.cfg.lr_prompt * buf)
    torch.testing.assert_close(server.extras[SERVER_MOMENTUM], buf)
    assert server.global_version == 1
    second = server.global_prompt.clone()
    m.aggregate(server, {0: Upload(None, {GRAD: g[0]})})
    noise = torch.randn(start.shape, generator=counter_generator(fed.cfg.seed, Stream.SERVER_NOISE, 1))
    buf2 = 0.9 * buf + g[0] + noise * noise_std(fed.cfg) + 5e-4 * second
    torch.testing.assert_close(server.global_prompt, second - fed.cfg.lr_prompt * buf2)


def test_what_travels_per_batch_at_vit_b16() -> None:
    """8,192 values down (p_G) and up (its gradient) per client per batch at ViT-B/16, n_ctx 16 (competitors-2.md)."""
    cfg = make_config("synthetic", method="dpfpl", n_ctx=16, pretrained="none")
    m = create_method(cfg)
    down = m.payload(SimpleNamespace(global_prompt=torch.zeros(16, 512)), {}, 0).tensors()
    up = m.upload(None, SimpleNamespace(global_gradient=lambda: torch.zeros(16, 512))).tensors()
    assert sum(t.numel() for t in down.values()) == 8192 == sum(t.numel() for t in up.values())
    assert m.check_extras(up) is None
    assert "shape" in m.check_extras({GRAD: torch.zeros(8, 512)})
    assert "not finite" in m.check_extras({GRAD: torch.full((16, 512), float("nan"))})
    assert "not DP-FPL's upload" in m.check_extras({})


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(ConfigError, match="dpfpl_rank=8 must be at most n_ctx=4"):
        make_config("synthetic", method="dpfpl", n_ctx=4, pretrained="none")
    with pytest.raises(ConfigError, match="adds its own noise"):
        make_config("synthetic", method="dpfpl", dp_epsilon=1.0, pretrained="none")
    with pytest.raises(ConfigError, match="dpfpl_epsilon"):
        make_config("synthetic", method="dpfpl", dpfpl_epsilon=-1.0, pretrained="none")


def test_a_round_under_bf16_autocast(tiny_clip, small_world):
    """--precision bf16: the context's gradient comes back in bfloat16; p_L keeps float32 (the smoke matrix's cell)."""
    import math

    fed = build(tiny_clip, small_world, precision="bf16", dpfpl_epsilon=0.4, rounds=1)
    record = fed.run_round(1)
    assert all(math.isfinite(a) for a in record.client_acc)
    assert all(c.private[LOCAL].dtype == torch.float32 for c in fed.clients if LOCAL in c.private)
