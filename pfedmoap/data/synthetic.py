"""A procedurally drawn "synthetic world" of coloured shapes in several visual styles.

Each image shows one shape (8 kinds) in one colour (5 kinds), giving 40 classes named ``"{colour} {shape}"``
with ``label = colour_index * len(SHAPES) + shape_index``. The style (domain) changes how the shape is drawn
but not its class, so holding styles out of pretraining creates a domain shift that prompt learning can
close. Everything is drawn from a caller-supplied :class:`numpy.random.Generator`, hence deterministic, and
vectorised over images and pixels in float32 (fast enough to draw fresh images for every training step).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
STYLES: tuple[str, ...] = ("photo", "noisy", "striped", "cluttered", "outline", "faded")
PRETRAIN_STYLES: tuple[str, ...] = ("photo", "noisy", "striped", "cluttered")
HELD_OUT_STYLES: tuple[str, ...] = ("outline", "faded")
CLASSNAMES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
NUM_CLASSES = len(CLASSNAMES)

# Base RGB values in [0, 1]; per-image jitter is added on top.
_COLOUR_RGB = np.array(
    [
        [0.86, 0.16, 0.14],  # red
        [0.18, 0.72, 0.22],  # green
        [0.16, 0.32, 0.92],  # blue
        [0.95, 0.86, 0.16],  # yellow
        [0.60, 0.22, 0.78],  # purple
    ],
    dtype=np.float32,
)

_GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "there is a {} in the image.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a small {}.",
    "a large {}.",
    "a rendering of a {}.",
)
_STYLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a clean photo of a {}.", "a plain picture of a {}.", "a solid {}."),
    "noisy": ("a noisy photo of a {}.", "a grainy picture of a {}.", "a {} with noise."),
    "striped": ("a striped {}.", "a photo of a striped {}.", "a {} with stripes."),
    "cluttered": ("a cluttered photo of a {}.", "a {} among grey discs.", "a {} next to some grey circles."),
    "outline": ("an outline of a {}.", "a line drawing of a {}.", "a {} drawn as an outline."),
    "faded": ("a faded photo of a {}.", "a pale {}.", "a faded {}."),
}

_DISTRACTORS = 4  # upper bound on grey discs per cluttered image (drawn for every image, used by some)
_CHUNK = 1024  # images rasterised at once
_OUTLINE_WIDTH = (1.2, 2.2)  # pixels
_FADE = (0.3, 0.5)  # share of the fill colour kept over the background


def _regular_polygon(n: int, radius: float, phase: float = np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1).astype(np.float32)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1).astype(np.float32)


def _plus(arm: float, half_width: float) -> np.ndarray:
    a, w = arm, half_width
    pts = [
        (w, w),
        (a, w),
        (a, -w),
        (w, -w),
        (w, -a),
        (-w, -a),
        (-w, -w),
        (-a, -w),
        (-a, w),
        (-w, w),
        (-w, a),
        (w, a),
    ]
    return np.array(pts, dtype=np.float32)


# Polygon vertices in shape units (about unit circumradius); sizes are balanced by eye so that no shape
# is much larger than the others.
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, 0.95, np.pi / 4),
    "triangle": _regular_polygon(3, 1.0),
    "star": _star(5, 1.0, 0.45),
    "cross": _plus(0.95, 0.3),
    "hexagon": _regular_polygon(6, 0.9),
}


def _polygon_sdf(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact signed distance to a closed polygon (negative inside), vectorised over points."""
    d2 = (x - verts[0, 0]) ** 2 + (y - verts[0, 1]) ** 2
    inside = np.zeros(x.shape, dtype=bool)
    for i in range(len(verts)):
        vi, vj = verts[i], verts[i - 1]
        ex, ey = vj[0] - vi[0], vj[1] - vi[1]
        wx, wy = x - vi[0], y - vi[1]
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        bx, by = wx - ex * t, wy - ey * t
        np.minimum(d2, bx * bx + by * by, out=d2)
        # Crossing-number test: an edge straddling the point's row flips inside/outside.
        above_i, below_j, left = y >= vi[1], y < vj[1], ex * wy > ey * wx
        inside ^= (above_i & below_j & left) | (~above_i & ~below_j & ~left)
    return np.where(inside, -1.0, 1.0).astype(np.float32) * np.sqrt(d2)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (shape units, negative inside) of one shape kind at local coordinates ``x, y``."""
    if shape in _POLYGONS:
        return _polygon_sdf(x, y, _POLYGONS[shape])
    length = np.sqrt(x * x + y * y)
    if shape == "circle":
        return length - 0.85
    if shape == "ring":
        # Thick, with a small hole: the pretrained model reads hollow outlines (a held-out style) as "ring",
        # and a thin ring made that near-total (outline zero-shot 6% instead of 14%).
        return np.abs(length - 0.6) - 0.3
    if shape == "crescent":
        # A disc minus an offset disc; max() of SDFs is exact enough for a 1 px anti-aliased edge.
        bite = np.sqrt((x - 0.45) ** 2 + y * y) - 0.75
        return np.maximum(length - 0.9, -bite)
    raise ValueError(f"unknown shape {shape!r}")


def render(labels: np.ndarray, styles: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Draw one image per ``(label, style)`` pair.

    Args:
        labels: int array [N] of class indices into :data:`CLASSNAMES`.
        styles: int array [N] of style indices into :data:`STYLES`.
        rng: source of all randomness; the same generator state gives the same images. The number of draws
            depends only on N (not on labels or styles), so streams stay aligned across calls.
        size: image height and width in pixels.

    Returns:
        uint8 array [N, 3, size, size] (channels first).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    styles = np.asarray(styles, dtype=np.int64).reshape(-1)
    if labels.shape != styles.shape:
        raise ValueError(f"labels and styles differ in length: {labels.shape[0]} vs {styles.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES})")
    if styles.size and (styles.min() < 0 or styles.max() >= len(STYLES)):
        raise ValueError(f"styles must lie in [0, {len(STYLES)})")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    n = labels.shape[0]
    f32 = np.float32

    # All per-image parameters are drawn up front in a fixed order (see the docstring).
    radius = rng.uniform(0.24, 0.40, n).astype(f32) * size
    max_offset = np.maximum(size / 2 - radius - 1.0, 0.0)
    params = {
        "label": labels,
        "style": styles,
        "radius": radius,
        "cx": size / 2 + rng.uniform(-1.0, 1.0, n).astype(f32) * max_offset,
        "cy": size / 2 + rng.uniform(-1.0, 1.0, n).astype(f32) * max_offset,
        "theta": rng.uniform(0.0, 2 * np.pi, n).astype(f32),
    }
    dark = rng.random(n) < 0.5
    bg_level = np.where(dark, rng.uniform(0.0, 0.25, n), rng.uniform(0.72, 1.0, n)).astype(f32)
    params["bg_level"] = bg_level
    params["bg"] = np.clip(bg_level[:, None] + rng.normal(0.0, 0.03, (n, 3)), 0.0, 1.0).astype(f32)
    fg = _COLOUR_RGB[labels // len(SHAPES)] * rng.uniform(0.8, 1.1, (n, 1)) + rng.normal(0.0, 0.04, (n, 3))
    params["fg"] = np.clip(fg, 0.0, 1.0).astype(f32)
    params["stripe_angle"] = rng.uniform(0.0, np.pi, n).astype(f32)
    params["stripe_period"] = rng.uniform(3.0, 6.0, n).astype(f32)
    params["stripe_phase"] = rng.uniform(0.0, 2 * np.pi, n).astype(f32)
    params["disc_xy"] = rng.uniform(0.0, size, (n, _DISTRACTORS, 2)).astype(f32)
    params["disc_r"] = rng.uniform(0.08, 0.2, (n, _DISTRACTORS)).astype(f32) * size
    params["disc_grey"] = rng.uniform(0.3, 0.7, (n, _DISTRACTORS)).astype(f32)
    params["disc_count"] = rng.integers(2, _DISTRACTORS + 1, n)
    params["outline_width"] = rng.uniform(*_OUTLINE_WIDTH, n).astype(f32)
    params["fade"] = rng.uniform(*_FADE, n).astype(f32)
    noisy_sigma = rng.uniform(0.10, 0.18, n)
    params["noise_sigma"] = np.where(styles == STYLES.index("noisy"), noisy_sigma, 0.02).astype(f32)

    out = np.empty((n, 3, size, size), dtype=np.uint8)
    # Chunks bound the float32 temporaries (a few times the chunk's image size) for large N. The noise is
    # drawn chunk by chunk; consecutive draws give the same stream as one big draw.
    for start in range(0, n, _CHUNK):
        chunk = {k: v[start : start + _CHUNK] for k, v in params.items()}
        out[start : start + _CHUNK] = _draw(chunk, rng, size)
    return out


def _draw(p: dict[str, np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray:
    """Rasterise one chunk of images from their drawn parameters (plus fresh pixel noise from ``rng``)."""
    f32 = np.float32
    n = p["label"].shape[0]
    styles, shape_idx, radius = p["style"], p["label"] % len(SHAPES), p["radius"]
    # Uniform noise with unit variance: a quarter of the cost of Gaussian noise, and looks the same here.
    noise = rng.random((n, 3, size, size), dtype=f32)
    noise -= 0.5
    noise *= f32(np.sqrt(12.0))

    coords = np.arange(size, dtype=f32) + 0.5  # pixel centres
    px, py = coords[None, None, :], coords[None, :, None]  # broadcast to [n, H, W]

    # Signed distance in pixels: rotate and scale into shape units, evaluate per shape kind, scale back.
    dx, dy = px - p["cx"][:, None, None], py - p["cy"][:, None, None]
    cos, sin = np.cos(p["theta"])[:, None, None], np.sin(p["theta"])[:, None, None]
    inv_r = (1.0 / radius)[:, None, None]
    lx, ly = (cos * dx + sin * dy) * inv_r, (cos * dy - sin * dx) * inv_r
    dist = np.empty((n, size, size), dtype=f32)
    for s, shape in enumerate(SHAPES):
        sel = np.flatnonzero(shape_idx == s)
        if sel.size:
            dist[sel] = _shape_sdf(shape, lx[sel], ly[sel]) * radius[sel, None, None]

    outline = (styles == STYLES.index("outline"))[:, None, None]
    band = np.abs(dist) - p["outline_width"][:, None, None] / 2
    alpha = np.clip(0.5 - np.where(outline, band, dist), 0.0, 1.0)[:, None]  # [n, 1, H, W], ~1 px AA

    bg = p["bg"][:, :, None, None]
    img = np.broadcast_to(bg, (n, 3, size, size)).copy()

    cluttered = np.flatnonzero(styles == STYLES.index("cluttered"))
    if cluttered.size:
        # Grey discs go under the shape, so they clutter the scene without hiding the class.
        sub = img[cluttered]
        for k in range(_DISTRACTORS):
            ddx = px - p["disc_xy"][cluttered, k, 0, None, None]
            ddy = py - p["disc_xy"][cluttered, k, 1, None, None]
            disc_d = np.sqrt(ddx * ddx + ddy * ddy) - p["disc_r"][cluttered, k, None, None]
            a = np.clip(0.5 - disc_d, 0.0, 1.0) * (k < p["disc_count"][cluttered])[:, None, None]
            sub = sub * (1 - a[:, None]) + p["disc_grey"][cluttered, k, None, None, None] * a[:, None]
        img[cluttered] = sub

    fill = np.broadcast_to(p["fg"][:, :, None, None], (n, 3, size, size)).copy()
    striped = np.flatnonzero(styles == STYLES.index("striped"))
    if striped.size:
        ang = p["stripe_angle"][striped, None, None]
        proj = px * np.cos(ang) + py * np.sin(ang)
        period, offset = p["stripe_period"][striped, None, None], p["stripe_phase"][striped, None, None]
        phase = 2 * np.pi * proj / period + offset
        # Steep but finite slope keeps stripe edges anti-aliased.
        on = np.clip(np.sin(phase) * 2.0 + 0.5, 0.0, 1.0)[:, None]
        alt = (1.0 - p["bg_level"][striped])[:, None, None, None]  # opposite-brightness grey stripes
        fill[striped] = fill[striped] * on + alt * (1 - on)
    faded = np.flatnonzero(styles == STYLES.index("faded"))
    if faded.size:
        f = p["fade"][faded, None, None, None]
        fill[faded] = bg[faded] + f * (fill[faded] - bg[faded])

    img = img * (1 - alpha) + fill * alpha
    img += noise * p["noise_sigma"][:, None, None, None]
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def templates(style: int) -> tuple[str, ...]:
    """Caption templates (with one ``{}`` for the class name) available for images of ``style``."""
    return _GENERIC_TEMPLATES + _STYLE_TEMPLATES[STYLES[style]]


def caption(label: int, style: int, rng: np.random.Generator) -> str:
    """A caption for an image of class ``label`` in style ``style``, from a template picked at random."""
    options = templates(style)
    return options[int(rng.integers(len(options)))].format(CLASSNAMES[label])


def to_model_input(
    images: np.ndarray | torch.Tensor,
    image_size: int,
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN,
    std: tuple[float, float, float] = OPENAI_DATASET_STD,
) -> torch.Tensor:
    """Turn uint8 images [N, 3, H, W] into normalised float32 model input [N, 3, image_size, image_size].

    Images are resized (bilinear, anti-aliased) only when their size differs from ``image_size``.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {x.dtype} {tuple(x.shape)}")
    x = x.to(torch.float32).div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        size = (image_size, image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
