"""FedOTP and FedPGP: what they train, what they send, what they are judged with; local image features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.methods.fedotp import LOCAL, TransportObjective
from pfedmoap.methods.fedpgp import LowRankObjective, contrastive_term
from pfedmoap.methods.transport import transport_logits
from pfedmoap.model.clip import FrozenCLIP


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=4, rounds=3, lr_prompt=0.5)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


# ------------------------------------------------------------------------------------------ local features
def test_tiny_clip_gives_four_local_features_whose_pooled_token_is_the_image_embedding(tiny_clip) -> None:
    images = torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size)
    local = tiny_clip.encode_local_images(images)
    assert tiny_clip.local_feature_kind == "attnpool"
    assert local.shape == (3, 4, tiny_clip.embed_dim) == (3, tiny_clip.local_feature_count, tiny_clip.embed_dim)
    torch.testing.assert_close(local.norm(dim=-1), torch.ones(3, 4))
    # the same attention pool with every position kept: its position 0 is what encode_image returns
    from pfedmoap.model.clip import _attention_pool_all

    v = tiny_clip.model.visual
    with torch.no_grad():
        grid = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
        tokens = _attention_pool_all(v.attnpool, grid)
        torch.testing.assert_close(tokens[:, 0], v(images), rtol=1e-5, atol=1e-6)


def test_vit_local_features_are_the_projected_patch_tokens() -> None:
    import open_clip

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    clip = FrozenCLIP(model, open_clip.get_tokenizer("ViT-B-16"), "tiny-vit", torch.device("cpu"))
    assert clip.local_feature_kind == "tokens" and clip.local_feature_count == 16
    local = clip.encode_local_images(torch.randn(2, 3, 32, 32))
    assert local.shape == (2, 16, 32)
    assert clip.model.visual.output_tokens is False  # restored


def test_fedotp_on_a_tower_without_local_features_is_refused(tiny_clip, small_world, monkeypatch) -> None:
    monkeypatch.setattr(FrozenCLIP, "local_feature_kind", property(lambda self: None))
    with pytest.raises(ConfigError, match="method=fedotp needs local image features"):
        build(tiny_clip, small_world, method="fedotp")


# ------------------------------------------------------------------------------------------ FedOTP
def test_fedotp_caches_local_features_only_when_it_needs_them(tiny_clip, small_world) -> None:
    otp = build(tiny_clip, small_world, method="fedotp")
    coop = build(tiny_clip, small_world, method="promptfl")
    d = tiny_clip.embed_dim
    for cid in range(4):
        assert otp.clients[cid].data.train_features.shape[1:] == (4, d)
        assert otp.clients[cid].data.test_features.shape[1:] == (4, d)
        assert coop.clients[cid].data.train_features.shape[1:] == (d,)


def test_fedotp_uploads_the_global_prompt_only_and_keeps_its_local_prompt(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedotp")
    start = fed.server.global_prompt.clone()
    initial_local = fed.method.initial_local(start.shape[-1]).clone()
    rec = fed.run_round(1)
    for client in fed.clients:
        up = fed.server.pool[client.cid]
        assert up.shape == start.shape  # one prompt travels, not two
        assert torch.equal(up, client.prompt)  # the trained global row
        local = client.private[LOCAL]
        assert not torch.equal(local, initial_local) and not torch.equal(local, up)  # trained, and its own
    assert rec.client_bytes_up == {cid: start.numel() * 4 for cid in range(4)}
    assert rec.client_bytes_down == {cid: start.numel() * 4 for cid in range(4)}
    assert not torch.equal(fed.server.global_prompt, start)
    # each client is judged with the server's new global prompt and its own local prompt
    view = fed.method.eval_state(fed.server, fed.clients[2])
    torch.testing.assert_close(view.prompt[0], fed.server.global_prompt)
    torch.testing.assert_close(view.prompt[1], fed.clients[2].private[LOCAL])


def test_fedotp_gradients_reach_both_prompts_through_the_similarities_only(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedotp")
    client = fed.clients[0]
    start = fed.server.global_prompt
    obj = TransportObjective(fed.cfg, fed.encoder, start, fed.method.initial_local(start.shape[-1]))
    feats, labels = client.data.train_features[:8], client.data.train_labels[:8]
    obj.loss(feats, labels).backward()
    assert obj.prompt.grad is not None and obj.local_prompt.grad is not None
    assert obj.prompt.grad.abs().sum() > 0 and obj.local_prompt.grad.abs().sum() > 0
    # the same loss from an explicit plan held constant gives the same gradients
    cfg = fed.cfg
    p, q = (t.detach().clone().requires_grad_(True) for t in (obj.prompt, obj.local_prompt))
    text = fed.encoder.encode(torch.stack([p, q]))
    sim = torch.einsum("bmd,ncd->bcmn", feats, text)
    from pfedmoap.methods.transport import unbalanced_sinkhorn

    plan = unbalanced_sinkhorn(sim, cfg.fedotp_eps, cfg.fedotp_top_percent, cfg.fedotp_thresh, cfg.fedotp_max_iter)
    logits = tiny_clip.gamma * (plan * sim).sum((-2, -1))
    torch.testing.assert_close(logits, transport_logits(feats, text, tiny_clip.gamma, cfg.fedotp_eps, 0.8))
    F.cross_entropy(logits, labels).backward()
    torch.testing.assert_close(obj.prompt.grad, p.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(obj.local_prompt.grad, q.grad, rtol=1e-4, atol=1e-7)


def test_fedotp_local_prompts_survive_checkpoints(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedotp", rounds=2)
    fed.run_round(1)
    state = fed.state_dict()
    again = build(tiny_clip, small_world, method="fedotp", rounds=2)
    again.load_state_dict(state)
    for a, b in zip(fed.clients, again.clients, strict=True):
        assert torch.equal(a.private[LOCAL], b.private[LOCAL])
    assert fed.run_round(2).client_acc == again.run_round(2).client_acc


# ------------------------------------------------------------------------------------------ FedPGP
def test_contrastive_term_against_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    t0, ts, t = (F.normalize(torch.randn(5, 8, generator=gen), dim=-1) for _ in range(3))
    value = contrastive_term(t0, ts, t, tau=0.5)
    pos = torch.stack([(t0[c] @ ts[c]) / 0.5 for c in range(5)])
    neg = torch.stack([(ts[c] @ t[c]) / 0.5 for c in range(5)])
    expected = (-(pos - torch.logaddexp(pos, neg))).mean()
    torch.testing.assert_close(value, expected)


def test_fedpgp_uploads_sigma_only_and_keeps_its_low_rank_part(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedpgp")
    start = fed.server.global_prompt.clone()
    u0, v0 = (t.clone() for t in fed.method.initial_factors(start.shape[-1]))
    assert u0.shape == (fed.cfg.n_ctx, 4) and v0.shape == (4, start.shape[-1])  # bottleneck 4
    rec = fed.run_round(1)
    for client in fed.clients:
        assert fed.server.pool[client.cid].shape == start.shape
        assert torch.equal(fed.server.pool[client.cid], client.prompt)
        assert not torch.equal(client.private["u"], u0) and not torch.equal(client.private["v"], v0)
    assert rec.client_bytes_up == {cid: start.numel() * 4 for cid in range(4)}
    view = fed.method.eval_state(fed.server, fed.clients[1])
    c = fed.clients[1]
    torch.testing.assert_close(view.prompt, fed.server.global_prompt + c.private["u"] @ c.private["v"])


def test_fedpgp_gradients_and_the_weight_of_the_contrastive_term(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedpgp")
    client = fed.clients[0]
    start = fed.server.global_prompt
    u, v = fed.method.initial_factors(start.shape[-1])
    feats, labels = client.data.train_features[:8], client.data.train_labels[:8]
    losses = {}
    for mu in (0.0, 0.5):
        obj = LowRankObjective(fed.cfg.replace(fedpgp_mu=mu), fed.encoder, start, u, v)
        loss = obj.loss(feats, labels)
        loss.backward()
        losses[mu] = float(loss.detach())
        for p in (obj.prompt, obj.u, obj.v):
            assert p.grad is not None and p.grad.abs().sum() > 0
    personal = fed.encoder.encode(start + u @ v)
    ce = F.cross_entropy(tiny_clip.gamma * feats @ personal.t(), labels)
    con = contrastive_term(fed.encoder.zero_shot(), fed.encoder.encode(start), personal, 0.5)
    assert losses[0.0] == pytest.approx(float(ce), rel=1e-5)
    assert losses[0.5] == pytest.approx(float(ce + 0.5 * con), rel=1e-5)


@pytest.mark.parametrize("method", ["fedotp", "fedpgp"])
def test_competitors_run_with_partial_participation_dropout_and_dp(tiny_clip, small_world, method) -> None:
    fed = build(
        tiny_clip, small_world, method=method, frac=0.5, client_dropout=0.3, dp_epsilon=50.0, dp_delta=0.05, rounds=2
    )
    history = fed.run()
    assert all(r.mean_acc == r.mean_acc for r in history.rounds)  # finite
    trained = [c for c in fed.clients if c.rounds_trained]
    assert trained and all(c.private for c in trained)
    assert all(not c.private for c in fed.clients if not c.rounds_trained)
