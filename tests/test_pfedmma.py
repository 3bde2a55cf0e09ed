"""pFedMMA: the upper blocks run on cached token states give the frozen model's features exactly; an adapted block is
its paper's statement; the gradient-scale ops; the cached path equals the whole towers; sizes at ViT-B/16; both
engines agree; evaluation reads each client's own adapters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config
from test_flower_strategy import FakeGrid, _task_identity, run_flower  # noqa: F401  (the fixture, for Flower)

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.plan import make_config
from pfedmoap.methods import create_method
from pfedmoap.methods.pfedmma import (
    PRIVATE,
    AdapterObjective,
    GradScale,
    MultiModalAdapters,
    adapted_blocks,
)
from pfedmoap.model import towers
from pfedmoap.model.clip import load_clip

VIT = "pfedmoap-tiny-vit"


@pytest.fixture(scope="module")
def tiny_vit():
    return load_clip(VIT, "none", torch.device("cpu"), progress=False)


def vit_config(**overrides):
    base = dict(model=VIT, method="pfedmma", clients=4, rounds=2, threads=1, pfedmma_lr=0.05)
    return small_config(**{**base, **overrides})


# ------------------------------------------------------------------------------------------ the towers
def test_cached_states_through_the_upper_blocks_give_the_frozen_features(tiny_vit) -> None:
    images = torch.randn(5, 3, tiny_vit.image_size, tiny_vit.image_size)
    reference = tiny_vit.encode_images(images)
    for start in range(len(towers.vision_blocks(tiny_vit)) + 1):
        states = towers.vision_states(tiny_vit, images, start)
        torch.testing.assert_close(towers.vision_from_states(tiny_vit, states, start), reference, rtol=0, atol=1e-6)
    names = ["red circle", "blue star", "green crescent"]
    zero_shot = tiny_vit.zero_shot_text_features(names)
    for start in range(len(towers.text_blocks(tiny_vit)) + 1):
        states, eot = towers.text_states(tiny_vit, [f"a photo of a {n}." for n in names], start)
        got = towers.text_from_states(tiny_vit, states, eot, start)
        torch.testing.assert_close(got, zero_shot, rtol=0, atol=1e-6)


def test_a_resnet_tower_is_refused_in_one_line(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="image tower is not a ViT"):
        towers.vision_blocks(tiny_clip)
    with pytest.raises(ConfigError, match="method=pfedmma .* needs a ViT.*--model pfedmoap-tiny-vit"):
        make_config("synthetic", method="pfedmma")


# ------------------------------------------------------------------------------------------ the adapters
def test_an_adapted_block_is_its_statement(tiny_vit) -> None:
    torch.manual_seed(0)
    blk = towers.vision_blocks(tiny_vit)[-1]
    width = blk.ln_1.normalized_shape[0]
    module = MultiModalAdapters(1, tiny_vit.width, width, 8, alpha=0.001)
    x = torch.randn(3, 17, width)
    got = towers.run_block(blk, x, None, module.adapter("image", 0))
    # the statement: h = x + Attn(LN1 x); out = h + MLP(LN2 h) + alpha W_u ReLU(W_s ReLU(W_d LN1 x))
    ln1 = blk.ln_1(x)
    h = x + blk.attn(ln1, ln1, ln1, need_weights=False)[0]
    down, shared, up = module.image_down[0], module.shared[0], module.image_up[0]
    y = torch.zeros_like(x)
    for i in range(3):
        for t in range(17):
            z = torch.relu(down.weight @ ln1[i, t] + down.bias)
            z = torch.relu(shared.weight @ z + shared.bias)
            y[i, t] = 0.001 * (up.weight @ z + up.bias)
    ref = h + blk.mlp(blk.ln_2(h)) + y
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_gradient_scaling_multiplies_the_adapters_gradients_by_one_over_alpha_and_leaves_the_input_s(tiny_vit) -> None:
    torch.manual_seed(1)
    alpha = 0.01
    module = MultiModalAdapters(1, 16, 16, 4, alpha=alpha)
    x = torch.randn(5, 16, requires_grad=True)
    target = torch.randn(5, 16)
    (module.adapter("image", 0)(x) * target).sum().backward()
    scaled = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grad_x = x.grad.clone()
    module.zero_grad()
    x.grad = None
    # the same adapter without the gradient-scale ops
    down, shared, up = module.image_down[0], module.shared[0], module.image_up[0]
    (alpha * up(F.relu(shared(F.relu(down(x))))) * target).sum().backward()
    for name, p in module.named_parameters():
        if name in scaled:
            torch.testing.assert_close(scaled[name], p.grad / alpha, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-8)
    assert GradScale.apply(x, 3.0) is not x


def test_sizes_at_vit_b16_are_the_published_ones() -> None:
    """Blocks 5-12 of 12: 8,448 shared values each way per client per round, 666,112 private, 674,560 in all."""
    cfg = make_config("synthetic", method="pfedmma", model="ViT-B-16", pretrained="none")
    assert adapted_blocks(cfg) == 8
    module = MultiModalAdapters(8, 512, 768, 32, alpha=0.001)
    shared = sum(v.numel() for v in module.shared_state().values())
    private = sum(v.numel() for v in module.private_state().values())
    assert (shared, private, shared + private) == (8448, 666_112, 674_560)
    m = create_method(cfg)
    assert sum(v.numel() for v in m.initial_shared().values()) == 8448


# ------------------------------------------------------------------------------------------ the method
def test_the_cached_path_is_the_whole_towers_with_adapters(tiny_vit, small_world) -> None:
    fed = Federation(vit_config(), clip=tiny_vit, dataset=small_world, log=lambda m: None)
    m, client = fed.method, fed.clients[0]
    adapters = m.client_adapters(tiny_vit, client, m.initial_shared())
    for p in adapters.parameters():  # away from the start, so the adapters change the features
        p.data.normal_(0, 0.5)
    obj = AdapterObjective(fed.cfg, tiny_vit, fed.encoder, adapters, m.text_for(tiny_vit, fed.encoder))
    n = adapted_blocks(fed.cfg)
    images = small_world.train.images[:6]
    from pfedmoap.data.synthetic import to_model_input

    x = to_model_input(images, tiny_vit.image_size, tiny_vit.mean, tiny_vit.std)
    # the whole image tower from the pixels, adapters on its top n blocks
    image_depth = len(towers.vision_blocks(tiny_vit))
    start = image_depth - n
    whole = towers.vision_from_states(
        tiny_vit, towers.vision_states(tiny_vit, x, 0), 0, [None] * start + adapters.adapters("image")
    )
    text_depth = len(towers.text_blocks(tiny_vit))
    sentences = [f"a photo of a {c}." for c in fed.encoder.classnames]
    states, eot = towers.text_states(tiny_vit, sentences, 0)
    text = towers.text_from_states(tiny_vit, states, eot, 0, [None] * (text_depth - n) + adapters.adapters("text"))
    cached = obj.logits(towers.vision_states(tiny_vit, x, start))
    torch.testing.assert_close(cached, tiny_vit.gamma * whole @ text.t(), rtol=1e-4, atol=1e-4)
    assert (cached - tiny_vit.gamma * tiny_vit.encode_images(x) @ fed.encoder.zero_shot().t()).abs().max() > 1e-2


def test_only_the_shared_projections_travel_and_each_client_is_judged_with_its_own(tiny_vit, small_world) -> None:
    fed = Federation(vit_config(rounds=2), clip=tiny_vit, dataset=small_world, log=lambda m: None)
    history = fed.run()
    n = adapted_blocks(fed.cfg)
    values = n * (32 * 32 + 32)
    assert history.rounds[0].bytes_up == 4 * values * 4 == history.rounds[0].bytes_down
    assert fed.server.pool == {} and set(fed.server.extras) == set(fed.method.initial_shared())
    a, b = fed.clients[0], fed.clients[1]
    assert any(k.startswith(PRIVATE) for k in a.private)
    assert not torch.equal(a.private[PRIVATE + "text_down.0.weight"], b.private[PRIVATE + "text_down.0.weight"])
    # each client's evaluation runs its own text adapters (the released code reuses the first client's)
    text_a, text_b = (
        towers.text_from_states(
            tiny_vit, *fed.method.text_for(tiny_vit, fed.encoder)[:3],
            fed.method.client_adapters(tiny_vit, c, fed.server.extras).adapters("text"),
        )
        for c in (a, b)
    )  # fmt: skip
    assert not torch.allclose(text_a, text_b)
    view = fed.method.eval_state(fed.server, a)
    scorer = fed.method.scorer(fed.runtime.context, a, view, fed.encoder, lambda k, p: None)
    logits, _ = scorer(a.data.test_features, False)
    expected = 100.0 * int((logits.argmax(-1) == a.data.test_labels).sum()) / len(a.data.test_labels)
    assert a.accuracy == pytest.approx(expected, abs=1e-9)
    assert math.isfinite(history.rounds[-1].mean_acc)


@pytest.mark.parametrize(
    "overrides", [{}, {"subsample": "base", "eval_split": "base2novel", "frac": 0.5}], ids=["full", "base2novel"]
)
@pytest.mark.usefixtures("_task_identity")
def test_flower_gives_the_same_numbers_as_in_process(tiny_vit, small_world, overrides) -> None:
    cfg = vit_config(**overrides)
    flower = run_flower(cfg, FakeGrid(cfg.clients, node_seed=3))
    local = Federation(cfg, clip=tiny_vit, dataset=small_world, log=lambda m: None).run()
    for f, r in zip(flower.rounds, local.rounds, strict=True):
        for key in ("client_acc", "sampled", "bytes_down", "bytes_up", "client_split_acc"):
            assert getattr(f, key) == getattr(r, key), key
    for name, tensor in local.federation.server.extras.items():
        assert torch.equal(flower.server.extras[name], tensor)
