"""PromptFolio, FedPHA and FedTPG against explicit statements of their forward pass and loss (small shapes, loops
where the code is vectorised); what they send, checked against the published sizes at ViT-B/16; what they are
judged with."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated import wire as comm
from pfedmoap.federated.plan import make_config
from pfedmoap.methods import create_method
from pfedmoap.methods.fedpha import ProjectionObjective, projection_basis
from pfedmoap.methods.fedtpg import GeneratorObjective, PromptTranslator
from pfedmoap.methods.global_local import LOCAL
from pfedmoap.methods.promptfolio import PortfolioObjective


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=4, rounds=2, lr_prompt=0.5)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


def loop_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over images of log sum_c exp(logit_c) - logit_y, one image at a time."""
    total = logits.new_zeros(())
    for b in range(logits.shape[0]):
        row = logits[b]
        top = row.max()
        total = total + (top + torch.log(sum(torch.exp(row[c] - top) for c in range(row.shape[0])))) - row[labels[b]]
    return total / logits.shape[0]


def batch(fed, n: int = 6):
    client = fed.clients[0]
    return client.data.train_features[:n], client.data.train_labels[:n]


# ------------------------------------------------------------------------------------------ PromptFolio
def test_promptfolio_loss_is_the_mixed_text_features_cross_entropy(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="promptfolio", promptfolio_theta=0.3)
    gen = torch.Generator().manual_seed(1)
    start_g, start_l = (torch.randn(fed.cfg.n_ctx, tiny_clip.width, generator=gen) * 0.02 for _ in range(2))
    obj = PortfolioObjective(fed.cfg, fed.encoder, start_g, start_l)
    feats, labels = batch(fed)
    loss = obj.loss(feats, labels)
    loss.backward()
    # the statement: t_c = (1 - theta) t_G,c + theta t_L,c (not re-normalised), logit = gamma <f, t_c>, CE
    g, q = (t.detach().clone().requires_grad_(True) for t in (start_g, start_l))
    t_g, t_l = fed.encoder.encode(g), fed.encoder.encode(q)
    logits = torch.zeros(len(labels), fed.encoder.num_classes)
    for b in range(len(labels)):
        for c in range(fed.encoder.num_classes):
            mixed = 0.7 * t_g[c] + 0.3 * t_l[c]
            logits[b, c] = tiny_clip.gamma * (feats[b] * mixed).sum()
    ref = loop_cross_entropy(logits, labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # float32 sums in another order: the bound is relative to the gradient's scale
    for got, want in ((obj.prompt.grad, g.grad), (obj.local_prompt.grad, q.grad)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert obj.local_prompt.grad.abs().sum() > 0
    assert torch.linalg.vector_norm(0.7 * t_g + 0.3 * t_l, dim=-1).max() < 1  # the mix is not re-normalised


def test_promptfolio_sends_its_global_prompt_and_keeps_the_local_one(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="promptfolio")
    history = fed.run()
    client = fed.clients[0]
    assert LOCAL in client.private and client.private[LOCAL].shape == (fed.cfg.n_ctx, tiny_clip.width)
    values = fed.cfg.n_ctx * tiny_clip.width
    assert history.rounds[0].bytes_up == 4 * values * 4 == history.rounds[0].bytes_down
    # evaluated with the server's global prompt and its own local prompt
    view = fed.method.eval_state(fed.server, client)
    torch.testing.assert_close(view.prompt[0], fed.server.global_prompt)
    torch.testing.assert_close(view.prompt[1], client.private[LOCAL])
    assert fed.method.eval_needs_global(client)


@pytest.mark.parametrize("method,n_ctx,values", [("promptfolio", 8, 4096), ("fedpha", 16, 8192), ("fedotp", 16, 8192)])
def test_what_travels_at_vit_b16_is_the_published_size(method: str, n_ctx: int, values: int) -> None:
    """Per client per round at ViT-B/16 (W = 512), the published n_ctx: PromptFolio 4,096 values up and down,
    FedPHA 8,192 (competitors-2.md's summary)."""
    cfg = make_config("synthetic", method=method, n_ctx=n_ctx, pretrained="none")
    m = create_method(cfg)
    server = SimpleNamespace(global_prompt=torch.zeros(n_ctx, 512))
    down = m.payload(server, {}, 0).tensors()
    up = m.upload(SimpleNamespace(cid=0), SimpleNamespace(prompt=torch.zeros(n_ctx, 512))).tensors()
    assert sum(t.numel() for t in down.values()) == values == sum(t.numel() for t in up.values())
    assert comm.nbytes(up.values()) == 4 * values


# ------------------------------------------------------------------------------------------ FedPHA
def test_fedpha_projection_is_onto_the_weaker_singular_directions_of_the_global_prompt() -> None:
    gen = torch.Generator().manual_seed(0)
    p_g = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    basis = projection_basis(p_g, 0.8)  # k = floor(16 * 0.2) = 3: 13 directions
    assert basis.shape == (40, 13)
    torch.testing.assert_close(basis.t() @ basis, torch.eye(13, dtype=torch.float64))
    _, s, vh = torch.linalg.svd(p_g, full_matrices=False)
    assert (s[:-1] >= s[1:]).all()
    torch.testing.assert_close(vh[:3] @ basis, torch.zeros(3, 13, dtype=torch.float64), atol=1e-12, rtol=0)
    # P^_L = P_L V2 V2^T: the local prompt's component along the global prompt's 13 weaker directions
    p_l = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    projected = p_l @ basis @ basis.t()
    explicit = sum(torch.outer(p_l @ vh[j], vh[j]) for j in range(3, 16))
    torch.testing.assert_close(projected, explicit)
    assert projection_basis(p_g, 1.0).shape == (40, 16)  # rho = 1: k = 0, the whole row space


@pytest.mark.parametrize("local_ctx", [None, 4])
def test_fedpha_loss_is_its_four_terms(tiny_clip, small_world, local_ctx) -> None:
    fed = build(tiny_clip, small_world, method="fedpha", fedpha_alpha=1.5)
    n_ctx = fed.cfg.n_ctx
    length = n_ctx if local_ctx is None else local_ctx
    local_encoder = fed.method.encoder_for(fed.encoder, length)
    gen = torch.Generator().manual_seed(2)
    start_g = torch.randn(n_ctx, tiny_clip.width, generator=gen) * 0.02
    start_l = torch.randn(length, tiny_clip.width, generator=gen) * 0.02
    obj = ProjectionObjective(fed.cfg, fed.encoder, local_encoder, start_g, start_l)
    assert obj.batchable == (local_ctx is None)
    feats, labels = batch(fed)
    loss = obj.loss(feats, labels)
    loss.backward()
    g, q = (t.detach().clone().requires_grad_(True) for t in (start_g, start_l))
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    k = math.floor(n_ctx * (1 - 0.8))
    v2 = vh[k:].t()
    t_g, t_l, t_p = fed.encoder.encode(g), local_encoder.encode(q), local_encoder.encode(q @ v2 @ v2.t())
    num_c, dim = t_g.shape
    ce_l = loop_cross_entropy(tiny_clip.gamma * feats @ t_l.t(), labels)
    ce_g = loop_cross_entropy(tiny_clip.gamma * feats @ t_g.t(), labels)
    mse = sum(((t_l[c, d] - t_p[c, d]) ** 2 for c in range(num_c) for d in range(dim)), torch.zeros(())) / (num_c * dim)
    hinge = sum(torch.clamp(1.5 - torch.sqrt(((t_l[c] - t_g[c]) ** 2).sum()), min=0) for c in range(num_c))
    ref = ce_l + ce_g + mse + hinge / num_c
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, want in ((obj.prompt.grad, g.grad), (obj.local_prompt.grad, q.grad)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert obj.prompt.grad.abs().sum() > 0 and obj.local_prompt.grad.abs().sum() > 0


def test_fedpha_local_features_are_read_at_each_lengths_own_end_of_text(tiny_clip, small_world) -> None:
    """The published heterogeneous-length code reads a short prompt's feature past its end-of-text token; here a
    length-L encoder gives exactly the features of the plain sequence [SOS] ctx_1..ctx_L classname. [EOS]."""
    fed = build(tiny_clip, small_world, method="fedpha", n_ctx=8)
    enc = fed.method.encoder_for(fed.encoder, 3)
    assert enc.n_ctx == 3 and fed.method.encoder_for(fed.encoder, 3) is enc  # built once
    ctx = torch.randn(3, tiny_clip.width, generator=torch.Generator().manual_seed(4)) * 0.02
    got = enc.encode(ctx)
    text = tiny_clip.text
    for c, name in enumerate(fed.encoder.classnames[:5]):
        tokens = tiny_clip.tokenize([f"X X X {name}."])
        eot = text.eot_positions(tokens)
        emb = text.token_embedding(tokens).float()
        emb[0, 1:4] = ctx
        ref = torch.nn.functional.normalize(text.encode_embeddings(emb, eot).float(), dim=-1)[0]
        torch.testing.assert_close(got[c], ref, rtol=1e-4, atol=1e-5)


def test_fedpha_clients_keep_their_own_lengths_and_are_judged_by_the_local_prompt(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedpha", fedpha_local_ctx="4,8,12")
    fed.run()
    lengths = [fed.clients[cid].private[LOCAL].shape[0] for cid in range(4)]
    assert lengths == [4, 8, 12, 4]
    client = fed.clients[1]
    view = fed.method.eval_state(fed.server, client)
    torch.testing.assert_close(view.prompt, client.private[LOCAL])
    assert not fed.method.eval_needs_global(client)
    # its accuracy is that of the local prompt's text features alone
    enc = fed.method.encoder_for(fed.encoder, 8)
    with torch.no_grad():
        logits = tiny_clip.gamma * client.data.test_features @ enc.encode(client.private[LOCAL]).t()
    expected = 100.0 * int((logits.argmax(-1) == client.data.test_labels).sum()) / len(client.data.test_labels)
    assert client.accuracy == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("value", ["", "0", "4,x", "same,4", "-1"])
def test_fedpha_bad_lengths_are_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match="fedpha_local_ctx="):
        make_config("synthetic", method="fedpha", fedpha_local_ctx=value)


# ------------------------------------------------------------------------------------------ FedTPG
def test_fedtpg_generator_is_the_published_size_at_vit_b16() -> None:
    """Q [4, 512] plus the generator's weights: 4,206,080 values down and up per client per round."""
    cfg = make_config("synthetic", method="fedtpg", model="ViT-B-16", n_ctx=4, pretrained="none")
    m = create_method(cfg)
    assert (m.width, m.dim) == (512, 512)
    server = SimpleNamespace(global_prompt=torch.zeros(4, 512), extras={})
    down = m.payload(server, {}, 0).tensors()
    assert sum(t.numel() for t in down.values()) == 4_206_080
    assert set(down) == {"global-prompt", *m.initial}
    assert m.check_extras(dict(m.initial)) is None  # its own weights pass its check
    bad = dict(m.initial)
    bad["tpg.ff_out.weight"] = torch.zeros(3)
    assert "has shape (3,)" in m.check_extras(bad)


def test_fedtpg_forward_is_its_stated_cross_attention_and_geglu() -> None:
    torch.manual_seed(0)
    width, dim, heads = 16, 12, 4
    gen = PromptTranslator(width, dim, heads)
    for p in gen.parameters():  # away from LayerNorm's identity start, so every weight matters
        torch.nn.init.normal_(p, std=0.3)
    q, t = torch.randn(4, width), torch.nn.functional.normalize(torch.randn(7, dim), dim=-1)
    got = gen(q, t)

    def layer_norm(x, ln):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    attn = gen.attn
    lq, lkv = layer_norm(q, gen.ln_q), layer_norm(t, gen.ln_kv)
    wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    dh = width // heads
    attended = torch.zeros(4, width)
    for i in range(4):
        out = []
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            qi = (lq[i] @ wq.t() + bq)[sl]
            scores = torch.stack([(qi * (lkv[j] @ wk.t() + bk)[sl]).sum() / math.sqrt(dh) for j in range(7)])
            probs = torch.softmax(scores, 0)
            out.append(sum(probs[j] * (lkv[j] @ wv.t() + bv)[sl] for j in range(7)))
        attended[i] = torch.cat(out) @ attn.out_proj.weight.t() + attn.out_proj.bias  # no residual
    hidden = layer_norm(attended, gen.ln_ff) @ gen.ff_in.weight.t() + gen.ff_in.bias
    value, gate = hidden[:, : 4 * width], hidden[:, 4 * width :]
    geglu = value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    ref = geglu @ gen.ff_out.weight.t() + gen.ff_out.bias + attended
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fedtpg_loss_reads_the_generated_context_and_trains_the_generator(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="fedtpg", n_ctx=4)
    m = fed.method
    queries = fed.server.global_prompt
    obj = GeneratorObjective(fed.cfg, fed.encoder, m.generator(m.initial), queries)
    feats, labels = batch(fed)
    loss = obj.loss(feats, labels)
    loss.backward()
    names = tiny_clip.tokenize(fed.encoder.classnames)
    t = torch.nn.functional.normalize(tiny_clip.text.encode_tokens(names).float(), dim=-1)
    with torch.no_grad():
        context = m.generator(m.initial)(queries, t)
        ref = loop_cross_entropy(tiny_clip.gamma * feats @ fed.encoder.encode(context).t(), labels)
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-5)
    assert obj.prompt.grad.abs().sum() > 0 and obj.generator.ff_in.weight.grad.abs().sum() > 0


def test_fedtpg_server_averages_every_generator_unweighted(tiny_clip, small_world) -> None:
    from pfedmoap.methods import Upload

    fed = build(tiny_clip, small_world, method="fedtpg", n_ctx=4)
    m, server = fed.method, fed.server
    server.train_sizes = [10, 30, 1, 1]  # FedAvg would weight these; FedTPG's server does not
    ups = {}
    for cid in (0, 1):
        ups[cid] = Upload(torch.full((4, tiny_clip.width), float(cid)), {k: v + cid for k, v in m.initial.items()})
    m.aggregate(server, ups)
    torch.testing.assert_close(server.global_prompt, torch.full((4, tiny_clip.width), 0.5))
    for k, v in m.initial.items():
        torch.testing.assert_close(server.extras[k], v + 0.5)
    assert server.global_version == 1 and m.eval_extras(server) == server.extras
