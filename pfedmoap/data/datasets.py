"""Registered datasets. The synthetic world is the embedded default (offline, deterministic from a seed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..base.errors import ConfigError
from . import synthetic
from .registry import DatasetBundle, DatasetOptions, LabeledImages, register_dataset


def _styles(requested: list[str] | None, default: list[str]) -> list[int]:
    names = default if requested is None else requested
    bad = [s for s in names if s not in synthetic.STYLES]
    if bad or not names:
        raise ConfigError(f"domains={names!r}: each must be one of {', '.join(synthetic.STYLES)}")
    return [synthetic.STYLES.index(s) for s in names]


@register_dataset("synthetic")
def synthetic_world(opts: DatasetOptions) -> DatasetBundle:
    """40 classes ("red circle", ...) drawn in the requested styles (default: "faded", a style the tiny
    CLIP never saw in pretraining, so prompt learning has a domain gap to close).

    Domain ids are style indices into ``synthetic.STYLES``; ``domain_names`` lists the styles in use, and
    domain-aware partitioners treat each style as one domain.
    """
    return _class_set(opts, "synthetic", list(synthetic.CLASSNAMES), lambda labels, rng: labels, (0, 1))


WorldLabel = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _class_set_split(
    classes: int, per_class: int, styles: list[int], rng: np.random.Generator, size: int, world_label: WorldLabel
) -> LabeledImages:
    """``classes`` labels in ``styles``, each image drawn as the world class ``world_label(labels, rng)`` picks."""
    labels = np.repeat(np.arange(classes), per_class * len(styles))
    domains = np.tile(np.repeat(np.asarray(styles), per_class), classes)
    images = synthetic.render(world_label(labels, rng), domains, rng, size=size)
    return LabeledImages(torch.from_numpy(images), labels.astype(np.int64), domains.astype(np.int64))


def _class_set(
    opts: DatasetOptions, name: str, classnames: list[str], world_label: WorldLabel, streams: tuple[int, int]
) -> DatasetBundle:
    """A class set over the synthetic world's images, in the requested styles (default "faded"); ``streams``: the
    generators' keys for train and test (separate: changing the test size never changes the train images)."""
    styles = _styles(opts.domains, ["faded"])
    train_rng, test_rng = (np.random.default_rng([opts.seed, k]) for k in streams)
    n = len(classnames)
    return DatasetBundle(
        name=name,
        classnames=classnames,
        train=_class_set_split(n, opts.train_per_class, styles, train_rng, opts.image_size, world_label),
        test=_class_set_split(n, opts.test_per_class, styles, test_rng, opts.image_size, world_label),
        domain_names=[synthetic.STYLES[s] for s in styles],
        domain_ids=list(styles),
    )


@register_dataset("synthetic-shapes")
def synthetic_shapes(opts: DatasetOptions) -> DatasetBundle:
    """The synthetic world's 8 shapes as classes ("circle", ...), each image in one of the 5 colours at random: a
    second class set for the cross-dataset protocol (other class names, the same kind of images)."""
    n_shapes, n_colours = len(synthetic.SHAPES), len(synthetic.COLOURS)
    return _class_set(
        opts,
        "synthetic-shapes",
        list(synthetic.SHAPES),
        lambda labels, rng: rng.integers(0, n_colours, len(labels)) * n_shapes + labels,
        (10, 11),
    )


@register_dataset("synthetic-colours")
def synthetic_colours(opts: DatasetOptions) -> DatasetBundle:
    """The synthetic world's 5 colours as classes ("red shape", ...), each image one of the 8 shapes at random: a
    third class set for the cross-dataset protocol."""
    n_shapes = len(synthetic.SHAPES)
    return _class_set(
        opts,
        "synthetic-colours",
        [f"{c} shape" for c in synthetic.COLOURS],
        lambda labels, rng: labels * n_shapes + rng.integers(0, n_shapes, len(labels)),
        (20, 21),
    )
