import pytest
import torch
import torch.nn.functional as F

from pfedmoap.gates import AttentionGate, LinearGate, pfedmoap_logits, reduce_features


@pytest.mark.parametrize(("d", "expected"), [(32, 4224), (64, 16640), (128, 66048), (256, 263168), (512, 1050624)])
def test_gate_parameter_count(d, expected):
    gate = AttentionGate(d, heads=8)
    assert sum(p.numel() for p in gate.parameters()) == expected == 4 * (d * d + d)


def test_reduction_strided_and_avgpool():
    x = torch.arange(16.0).view(2, 8)
    assert torch.equal(reduce_features(x, 4, "strided"), x[:, ::2])
    assert torch.equal(reduce_features(x, 4, "avgpool"), x.view(2, 4, 2).mean(-1))
    assert reduce_features(x, 8) is x
    with pytest.raises(ValueError, match="does not divide"):
        reduce_features(x, 3)


def naive_logits(image, local, experts, gate, gamma, lam, d, reduction):
    """Per-(b, c) loop straight from SPEC §1: the obviously-correct twin."""
    heads, dh = gate.heads, gate.dim // gate.heads
    all_experts = torch.cat([local[None], experts], 0)  # [E, C, D]
    B, C = image.shape[0], local.shape[0]
    out = torch.zeros(B, C)
    weights = torch.zeros(B, C, all_experts.shape[0])
    for b in range(B):
        q_in = reduce_features(image[b], d, reduction)
        for c in range(C):
            kv_in = reduce_features(all_experts[:, c], d, reduction)  # [E, d]
            q = gate.q_proj(q_in)
            k = gate.k_proj(kv_in)
            v = gate.v_proj(kv_in)
            head_out = []
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                a = torch.softmax((k[:, sl] @ q[sl]) * gate.scaling, dim=0)  # [E]
                weights[b, c] += a / heads
                head_out.append(a @ v[:, sl])
            t_moe = gate.out_proj(torch.cat(head_out))
            l_moe = gamma * torch.dot(q_in, t_moe)
            l_loc = gamma * torch.dot(image[b], local[c])
            out[b, c] = l_moe + lam * l_loc
    return out, weights


@pytest.mark.parametrize("reduction", ["strided", "avgpool"])
@pytest.mark.parametrize("scaling", [10.0, 0.5])
def test_logits_match_naive_loop(reduction, scaling):
    torch.manual_seed(0)
    B, C, K, D, d = 3, 5, 4, 64, 16
    image = F.normalize(torch.randn(B, D), dim=-1)
    local = F.normalize(torch.randn(C, D), dim=-1)
    experts = F.normalize(torch.randn(K, C, D), dim=-1)
    gate = AttentionGate(d, heads=4, scaling=scaling, reduction=reduction)
    got, w = pfedmoap_logits(image, local, experts, gate, 100.0, 0.5, need_weights=True)
    want, w_want = naive_logits(image, local, experts, gate, 100.0, 0.5, d, reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w, w_want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, C))


def test_gate_matches_torch_multihead_attention_with_textbook_scaling():
    """With scaling 1/sqrt(d/H) the gate is exactly nn.MultiheadAttention per (image, class)."""
    torch.manual_seed(1)
    d, H, B, C, E = 32, 8, 4, 6, 5
    gate = AttentionGate(d, H, scaling=(d // H) ** -0.5)
    mha = torch.nn.MultiheadAttention(d, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([gate.q_proj.weight, gate.k_proj.weight, gate.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([gate.q_proj.bias, gate.k_proj.bias, gate.v_proj.bias]))
        mha.out_proj.weight.copy_(gate.out_proj.weight)
        mha.out_proj.bias.copy_(gate.out_proj.bias)
    q = torch.randn(B, d)
    experts = torch.randn(E, C, d)
    out, w = gate.mix(q, experts, need_weights=True)
    # MHA over (b, c) pairs: query [B*C, 1, d], keys [B*C, E, d]
    qq = q[:, None, None, :].expand(B, C, 1, d).reshape(B * C, 1, d)
    kv = experts.permute(1, 0, 2)[None].expand(B, C, E, d).reshape(B * C, E, d)
    ref, ref_w = mha(qq, kv, kv, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(out, ref.view(B, C, d), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, ref_w.view(B, C, E), rtol=1e-5, atol=1e-6)


def test_no_experts_gives_local_logits():
    image = F.normalize(torch.randn(2, 8), dim=-1)
    local = F.normalize(torch.randn(3, 8), dim=-1)
    logits, w = pfedmoap_logits(image, local, None, None, 100.0, 0.5)
    torch.testing.assert_close(logits, 100.0 * image @ local.t())
    assert w is None


def test_gradients_reach_local_prompt_through_both_paths():
    """lambda = 0 still trains the local expert through the key/value path; experts get no gradient."""
    torch.manual_seed(2)
    image = F.normalize(torch.randn(4, 16), dim=-1)
    local = F.normalize(torch.randn(3, 16), dim=-1).requires_grad_()
    experts = F.normalize(torch.randn(2, 3, 16), dim=-1)
    gate = AttentionGate(8, heads=2)
    logits, _ = pfedmoap_logits(image, local, experts, gate, 100.0, 0.0)
    logits.sum().backward()
    assert local.grad is not None and local.grad.abs().sum() > 0
    assert all(p.grad is not None for p in gate.parameters())


# ---------------------------------------------------------------------------------------------- the linear gate
def naive_linear_logits(image, local, experts, gate, gamma, lam, d, reduction):
    """The paper's router, per (b, c) from the module docstring: softmax(W q_b + b) over the first E slots."""
    all_experts = torch.cat([local[None], experts], 0)  # [E, C, D]
    n_exp = all_experts.shape[0]
    B, C = image.shape[0], local.shape[0]
    out, weights = torch.zeros(B, C), torch.zeros(B, C, n_exp)
    for b in range(B):
        q = reduce_features(image[b], d, reduction)
        z = torch.stack([gate.router.weight[e] @ q + gate.router.bias[e] for e in range(n_exp)])
        w = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        for c in range(C):
            mixed = sum(w[e] * reduce_features(all_experts[e, c], d, reduction) for e in range(n_exp))
            out[b, c] = gamma * torch.dot(q, mixed) + lam * gamma * torch.dot(image[b], local[c])
            weights[b, c] = w
    return out, weights


@pytest.mark.parametrize("reduction", ["strided", "avgpool"])
@pytest.mark.parametrize("available", [4, 2])  # all K = 4 experts, and a small pool with only 2 of them
def test_linear_gate_matches_naive_router(reduction, available):
    torch.manual_seed(3)
    B, C, K, D, d = 3, 4, 4, 32, 8
    image = F.normalize(torch.randn(B, D), dim=-1)
    local = F.normalize(torch.randn(C, D), dim=-1)
    experts = F.normalize(torch.randn(available, C, D), dim=-1)
    gate = LinearGate(d, slots=K + 1, reduction=reduction)
    assert sum(p.numel() for p in gate.parameters()) == (K + 1) * (d + 1)
    got, w = pfedmoap_logits(image, local, experts, gate, 50.0, 0.5, need_weights=True)
    want, w_want = naive_linear_logits(image, local, experts, gate, 50.0, 0.5, d, reduction)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w, w_want, rtol=1e-5, atol=1e-6)
    # gradients reach the router and the local prompt; more experts than slots is an error
    local.requires_grad_()
    logits, _ = pfedmoap_logits(image, local, experts, gate, 50.0, 0.0)
    logits.sum().backward()
    assert gate.router.weight.grad.abs().sum() > 0 and local.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="5 expert slots"):
        gate(image, torch.randn(6, C, D), gamma=1.0)


# ---------------------------------------------------------------------------------------------- plug-in gates
def test_a_gate_written_outside_the_library_plugs_in_by_name(tiny_clip, small_world, monkeypatch):
    """A registered Gate subclass with the call signature is picked by --gate; every client gets its own, built
    under its own seed, trained and evaluated through the shared loop."""
    from conftest import small_config

    from pfedmoap import Gate
    from pfedmoap.engine.federation import Federation
    from pfedmoap.federated import registry

    monkeypatch.setattr(registry, "_GATES", dict(registry._GATES))  # this test's registration stays in this test

    @registry.register_gate
    class ScaledMean(Gate):
        name, help = "scaled-mean", "a learned scale on the experts' mean feature"

        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim
            self.scale = torch.nn.Parameter(torch.rand(()))

        @classmethod
        def from_config(cls, cfg, ops=None):
            return cls(cfg.d_gate)

        def forward(self, image, experts, *, gamma, local_logits=None, lam=0.0, need_weights=False):
            q, k = reduce_features(image, self.dim), reduce_features(experts, self.dim)
            logits = gamma * self.scale * torch.einsum("bd,cd->bc", q, k.mean(0)) + lam * local_logits
            weights = torch.full((*logits.shape, experts.shape[0]), 1.0 / experts.shape[0]) if need_weights else None
            return logits, weights

    cfg = small_config(gate="scaled-mean", clients=4, experts=2, rounds=2, lr_gate=0.5)
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    fed.run_round(1)
    record = fed.run_round(2)
    gates = [c.gate for c in fed.clients]
    assert all(isinstance(g, ScaledMean) for g in gates)
    starts = []
    for c in fed.clients:  # each started from its own seed's draw, then trained
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            starts.append(float(torch.rand(())))
    assert len(set(starts)) == 4 and all(float(g.scale.detach()) != s for g, s in zip(gates, starts, strict=True))
    assert sorted(record.client_attention) == [0, 1, 2, 3]
