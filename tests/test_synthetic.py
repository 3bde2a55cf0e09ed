"""Tests of the synthetic world: constants, deterministic rendering, styles, captions and model input."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from pfedmoap.data import synthetic
from pfedmoap.data.synthetic import (
    CLASSNAMES,
    COLOURS,
    HELD_OUT_STYLES,
    PRETRAIN_STYLES,
    SHAPES,
    STYLES,
    caption,
    render,
    templates,
    to_model_input,
)


def _batch(n: int, seed: int, style: int | None = None, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSNAMES)
    styles = np.full(n, style) if style is not None else np.arange(n) % len(STYLES)
    return render(labels, styles, rng, size)


def test_classnames_count_and_order() -> None:
    assert len(SHAPES) == 8 and len(COLOURS) == 5
    assert len(CLASSNAMES) == 40 == len(set(CLASSNAMES))
    assert CLASSNAMES[0] == "red circle"
    assert CLASSNAMES[1] == "red square"
    assert CLASSNAMES[len(SHAPES)] == "green circle"
    assert CLASSNAMES[-1] == "purple crescent"
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            assert CLASSNAMES[c * len(SHAPES) + s] == f"{colour} {shape}"


def test_style_partition() -> None:
    assert STYLES == ("photo", "noisy", "striped", "cluttered", "outline", "faded")
    assert set(PRETRAIN_STYLES) | set(HELD_OUT_STYLES) == set(STYLES)
    assert not set(PRETRAIN_STYLES) & set(HELD_OUT_STYLES)


@pytest.mark.parametrize("size", [32, 48])
def test_render_shape_and_dtype(size: int) -> None:
    images = _batch(12, seed=0, size=size)
    assert images.shape == (12, 3, size, size)
    assert images.dtype == np.uint8
    assert images.std() > 20  # not blank


def test_render_empty_batch() -> None:
    images = render(np.zeros(0, dtype=int), np.zeros(0, dtype=int), np.random.default_rng(0))
    assert images.shape == (0, 3, 32, 32) and images.dtype == np.uint8


def test_render_is_deterministic() -> None:
    a, b = _batch(64, seed=3), _batch(64, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _batch(64, seed=4))


def test_render_consumes_rng_independently_of_styles() -> None:
    # The same generator state and labels give the same geometry whatever the styles, and leave the
    # generator in the same state, so streams stay aligned across domains.
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    labels = np.arange(20)
    render(labels, np.zeros(20, dtype=int), rng_a)
    render(labels, np.full(20, STYLES.index("cluttered")), rng_b)
    assert rng_a.integers(1 << 30) == rng_b.integers(1 << 30)


def test_render_chunking_does_not_change_images(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _batch(50, seed=7)
    monkeypatch.setattr(synthetic, "_CHUNK", 7)  # many chunks, with a ragged last one
    np.testing.assert_array_equal(whole, _batch(50, seed=7))


def test_every_style_renders_distinct_images() -> None:
    by_style = [_batch(40, seed=11, style=s).astype(np.float32) for s in range(len(STYLES))]
    for i in range(len(STYLES)):
        for j in range(i + 1, len(STYLES)):
            diff = np.abs(by_style[i] - by_style[j]).mean()
            assert diff > 2.0, f"{STYLES[i]} vs {STYLES[j]} differ by only {diff:.2f} grey levels"


def test_styles_have_their_character() -> None:
    # The same seed gives the same geometry and background in every style, so styles compare pixel-wise.
    photo, outline, faded, noisy = (
        _batch(80, seed=2, style=STYLES.index(name)).astype(np.float32)
        for name in ("photo", "outline", "faded", "noisy")
    )
    corner = photo[:, :, :1, :1]  # shapes keep a margin, so the corner pixel is background

    def strong_pixels(img: np.ndarray) -> float:
        return float((np.abs(img - corner).max(axis=1) > 60).mean())

    # an outline covers fewer pixels than the filled shape, a faded fill contrasts less with the background
    assert strong_pixels(outline) < 0.8 * strong_pixels(photo)
    assert strong_pixels(faded) < 0.8 * strong_pixels(photo)

    def roughness(img: np.ndarray) -> float:
        return float(np.abs(np.diff(img, axis=-1)).mean())

    assert roughness(noisy) > 2 * roughness(photo)


def test_render_validates_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        render(np.arange(3), np.zeros(2, dtype=int), rng)
    with pytest.raises(ValueError):
        render(np.array([40]), np.array([0]), rng)
    with pytest.raises(ValueError):
        render(np.array([0]), np.array([len(STYLES)]), rng)


def test_captions() -> None:
    rng = np.random.default_rng(0)
    for style in range(len(STYLES)):
        seen = {caption(9, style, rng) for _ in range(300)}
        assert all("green square" in text for text in seen)
        assert seen == {t.format("green square") for t in templates(style)}
    assert "a photo of a {}." in templates(0)
    assert any("noisy" in t for t in templates(STYLES.index("noisy")))
    same = [caption(3, 1, np.random.default_rng(42)) for _ in range(2)]
    assert same[0] == same[1]


def test_to_model_input_shapes_and_stats() -> None:
    images = _batch(16, seed=1)
    x = to_model_input(images, 32)
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    torch.testing.assert_close(x, to_model_input(torch.from_numpy(images), 32))
    assert torch.isfinite(x).all()
    assert -2.0 < x.min() and x.max() < 2.3  # (0 - mean) / std and (1 - mean) / std bound the range
    assert abs(x.mean().item()) < 1.0

    resized = to_model_input(images, 64)
    assert resized.shape == (16, 3, 64, 64)


def test_to_model_input_normalisation() -> None:
    white = np.full((2, 3, 8, 8), 255, dtype=np.uint8)
    x = to_model_input(white, 8)
    expected = (1 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    # resizing a constant image keeps it constant
    torch.testing.assert_close(to_model_input(white, 16)[0, :, 5, 5], expected)


def test_to_model_input_rejects_float_images() -> None:
    with pytest.raises(ValueError):
        to_model_input(np.zeros((1, 3, 32, 32), dtype=np.float32), 32)
