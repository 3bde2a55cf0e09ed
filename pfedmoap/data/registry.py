"""Dataset registry: one ``create_dataset(name, ...)`` entry point over named builders.

A builder returns a :class:`DatasetBundle`: class names ordered by label id, train and test
:class:`LabeledImages`, and domain names when the dataset has domains. Real datasets (torchvision and
folder layouts) register here the same way the synthetic world does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..base.errors import ConfigError


@dataclass
class LabeledImages:
    """Images with integer labels (and domain ids). ``images`` is a uint8 tensor [N, 3, H, W] held in
    memory, or any indexable returning such [3, H, W] tensors (for datasets read from disk)."""

    images: torch.Tensor
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, rows: np.ndarray) -> LabeledImages:
        """These ``rows`` only, in that order (images on disk are not read: an index view of them)."""
        images = (
            self.images[torch.as_tensor(rows, dtype=torch.long)]
            if isinstance(self.images, torch.Tensor)
            else _Rows(self.images, rows)
        )
        domains = None if self.domains is None else np.asarray(self.domains)[rows]
        return LabeledImages(images=images, labels=np.asarray(self.labels)[rows], domains=domains)


class _Rows:
    """Some rows of an indexable of images (datasets read from disk are not tensors), without reading them."""

    def __init__(self, images, rows: np.ndarray):
        self.images = images
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[int(self.rows[i])]


@dataclass
class DatasetBundle:
    name: str
    classnames: list[str]
    train: LabeledImages
    test: LabeledImages
    domain_names: list[str] = field(default_factory=list)
    # the id that rows of each of ``domain_names`` carry (None: its position; the synthetic world: its style index)
    domain_ids: list[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def domain_id(self, name: str) -> int:
        """The id in ``train.domains`` / ``test.domains`` of the domain called ``name`` (one of ``domain_names``)."""
        i = self.domain_names.index(name)
        return i if self.domain_ids is None else self.domain_ids[i]


@dataclass
class DatasetOptions:
    """What a builder may use; builders ignore what does not apply to them."""

    root: str | None = None
    domains: list[str] | None = None
    train_per_class: int = 64
    test_per_class: int = 50
    image_size: int = 32
    seed: int = 0


Builder = Callable[[DatasetOptions], DatasetBundle]
_REGISTRY: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``create_dataset(name)`` call this builder."""

    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def create_dataset(name: str, options: DatasetOptions | None = None) -> DatasetBundle:
    if name not in _REGISTRY:
        raise ConfigError(f"dataset={name!r} is not one of: {', '.join(list_datasets())}")
    return _REGISTRY[name](options or DatasetOptions())
