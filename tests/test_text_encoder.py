import pytest
import torch

from pfedmoap.base.errors import ConfigError
from pfedmoap.federated.prompt import PromptEncoder, init_prompt
from pfedmoap.model.clip import load_clip

NAMES = ["red circle", "a_very_long_class_name with several words in it", "x", "yellow crescent moon shape"]


def _check_modes(clip, names, n_ctx=16):
    """truncated and shared-prefix give the full 77/32-token encoder's features and context gradients."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.stack([init_prompt(n_ctx, clip.width, 0.02, g) for _ in range(3)])
    full = PromptEncoder(clip, names, n_ctx, mode="full")
    assert full.length == clip.text.context_length
    ref = full.encode(ctx)
    w = torch.randn_like(ref)
    c_ref = ctx.clone().requires_grad_()
    (full.encode(c_ref) * w).sum().backward()
    for mode in ("truncated", "shared-prefix"):
        enc = PromptEncoder(clip, names, n_ctx, mode=mode)
        assert enc.length == int(enc.eot.max()) + 1 < full.length
        got = enc.encode(ctx)
        rel = (got - ref).norm() / ref.norm()
        assert rel < 1e-5, (mode, float(rel))
        c = ctx.clone().requires_grad_()
        (enc.encode(c) * w).sum().backward()
        rel_grad = (c.grad - c_ref.grad).norm() / c_ref.grad.norm()
        assert rel_grad < 1e-5, (mode, float(rel_grad))


def test_modes_equal_full_tiny(tiny_clip):
    _check_modes(tiny_clip, NAMES)


def test_modes_equal_full_random_context_scale(tiny_clip):
    """Large context vectors (as after many SGD steps) keep the equality."""
    enc_full = PromptEncoder(tiny_clip, NAMES, 4, mode="full")
    enc_sp = PromptEncoder(tiny_clip, NAMES, 4, mode="shared-prefix")
    ctx = torch.randn(2, 4, tiny_clip.width)
    a, b = enc_full.encode(ctx), enc_sp.encode(ctx)
    assert (a - b).norm() / a.norm() < 1e-5


@pytest.mark.parametrize("mode", ["truncated", "shared-prefix"])
def test_single_and_stacked_contexts_agree(tiny_clip, mode):
    enc = PromptEncoder(tiny_clip, NAMES, 16, mode=mode)
    ctx = torch.randn(2, 16, tiny_clip.width) * 0.02
    both = enc.encode(ctx)
    assert both.shape == (2, len(NAMES), tiny_clip.embed_dim)
    torch.testing.assert_close(enc.encode(ctx[1]), both[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(2, len(NAMES)))


def test_class_name_that_fills_the_context(tiny_clip):
    long_name = " ".join(["purple"] * 40)  # far more tokens than the 32-token context holds
    names = ["red circle", long_name]
    ctx = torch.randn(16, tiny_clip.width) * 0.02
    ref = PromptEncoder(tiny_clip, names, 16, mode="full").encode(ctx)
    for mode in ("truncated", "shared-prefix"):
        enc = PromptEncoder(tiny_clip, names, 16, mode=mode)
        assert int(enc.eot[1]) == tiny_clip.text.context_length - 1
        assert enc.length == tiny_clip.text.context_length
        torch.testing.assert_close(enc.encode(ctx), ref, rtol=1e-5, atol=1e-6)


def test_plain_text_path_matches_open_clip(tiny_clip):
    tokens = tiny_clip.tokenize(["a photo of a red circle.", "a blue star"])
    ours = tiny_clip.encode_text_tokens(tokens)
    ref = tiny_clip.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["RN50", "ViT-B-16"])
def test_modes_equal_full_real_towers(arch):
    clip = load_clip(arch, "none", torch.device("cpu"), progress=False)
    _check_modes(clip, NAMES[:2])


def test_refuses_unknown_model():
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        load_clip("NoSuchNet-99", "none", torch.device("cpu"))


def test_refuses_tower_without_causal_mask(tiny_clip):
    from pfedmoap.model.text_encoder import TextTower

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = tiny_clip.model.token_embedding
            self.positional_embedding = tiny_clip.model.positional_embedding
            self.transformer = tiny_clip.model.transformer
            self.ln_final = tiny_clip.model.ln_final
            self.attn_mask = None

    with pytest.raises(ConfigError, match="causal"):
        TextTower.from_model(Fake(), "fake")


def test_shared_prefix_refused_for_unsupported_blocks(tiny_clip, monkeypatch):
    monkeypatch.setattr(type(tiny_clip.text), "shared_prefix_blocks", lambda self: None)
    with pytest.raises(ConfigError, match="use --text-encoder truncated"):
        PromptEncoder(tiny_clip, NAMES, 16, mode="shared-prefix")
    assert PromptEncoder(tiny_clip, NAMES, 16, mode="truncated").encode(torch.zeros(16, tiny_clip.width)).shape[0] == 4
