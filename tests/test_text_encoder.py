import pytest
import torch

from pfedmoap.clip import load_clip
from pfedmoap.errors import ConfigError
from pfedmoap.prompt import PromptEncoder, init_prompt

NAMES = ["red circle", "a_very_long_class_name with several words in it", "x", "yellow crescent moon shape"]


def _check_truncation(clip, names, n_ctx=16):
    g = torch.Generator().manual_seed(0)
    ctx = torch.stack([init_prompt(n_ctx, clip.width, 0.02, g) for _ in range(3)])
    full = PromptEncoder(clip, names, n_ctx, truncate=False)
    short = PromptEncoder(clip, names, n_ctx, truncate=True)
    assert full.length == clip.text.context_length
    assert short.length == int(short.eot.max()) + 1 < full.length
    a, b = full.encode(ctx), short.encode(ctx)
    rel = (a - b).norm() / a.norm()
    assert rel < 1e-5, rel
    # gradients w.r.t. the context agree as well
    c1, c2 = ctx.clone().requires_grad_(), ctx.clone().requires_grad_()
    w = torch.randn_like(a)
    (full.encode(c1) * w).sum().backward()
    (short.encode(c2) * w).sum().backward()
    assert (c1.grad - c2.grad).norm() / c1.grad.norm() < 1e-5


def test_truncated_equals_full_tiny(tiny_clip):
    _check_truncation(tiny_clip, NAMES)


def test_single_and_stacked_contexts_agree(tiny_clip):
    enc = PromptEncoder(tiny_clip, NAMES, 16)
    ctx = torch.randn(2, 16, tiny_clip.width) * 0.02
    both = enc.encode(ctx)
    assert both.shape == (2, len(NAMES), tiny_clip.embed_dim)
    torch.testing.assert_close(enc.encode(ctx[1]), both[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(2, len(NAMES)))


def test_class_name_that_fills_the_context(tiny_clip):
    long_name = " ".join(["purple"] * 40)  # far more tokens than the 32-token context holds
    enc = PromptEncoder(tiny_clip, ["red circle", long_name], 16)
    assert int(enc.eot[1]) == tiny_clip.text.context_length - 1
    assert enc.length == tiny_clip.text.context_length
    assert torch.isfinite(enc.encode(torch.zeros(16, tiny_clip.width))).all()


def test_plain_text_path_matches_open_clip(tiny_clip):
    tokens = tiny_clip.tokenize(["a photo of a red circle.", "a blue star"])
    ours = tiny_clip.encode_text_tokens(tokens)
    ref = tiny_clip.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["RN50", "ViT-B-16"])
def test_truncated_equals_full_real_towers(arch):
    clip = load_clip(arch, "none", torch.device("cpu"), progress=False)
    _check_truncation(clip, NAMES[:2])


def test_refuses_unknown_model():
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        load_clip("NoSuchNet-99", "none", torch.device("cpu"))


def test_refuses_tower_without_causal_mask(tiny_clip):
    from pfedmoap.clip import TextTower

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
