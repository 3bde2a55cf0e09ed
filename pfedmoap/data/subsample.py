"""Base-to-novel class splits, following CoOp's protocol (``subsample_classes`` in CoOp / CoCoOp).

The label space, in label order, splits into *base* classes (the first half, ceil(C / 2) of them) and *novel*
classes (the rest). Clients train on base classes only; a model is then scored on the base classes' test images
over the base label space and on the novel classes' test images over the novel label space. Each subsample is
relabelled from 0, so a subsampled dataset is an ordinary :class:`~pfedmoap.data.DatasetBundle`.
"""

from __future__ import annotations

import math

import numpy as np

from ..base.errors import ConfigError
from .registry import DatasetBundle, LabeledImages

SUBSAMPLES = ("all", "base", "new")


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """Label ids of the base classes (the first ceil(C / 2)) and of the novel ones (the rest)."""
    if num_classes < 2:
        raise ConfigError(
            f"subsample=base / new (a base-to-novel split) needs at least 2 classes, the dataset has {num_classes}"
        )
    cut = math.ceil(num_classes / 2)
    return list(range(cut)), list(range(cut, num_classes))


def _keep(split: LabeledImages, classes: list[int]) -> LabeledImages:
    labels = np.asarray(split.labels)
    rows = np.flatnonzero(np.isin(labels, classes))
    relabel = np.full(int(labels.max(initial=0)) + 1, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    kept = split.rows(rows)
    kept.labels = relabel[kept.labels]
    return kept


def subsample_classes(bundle: DatasetBundle, which: str) -> DatasetBundle:
    """``bundle`` restricted to its base classes ("base"), its novel classes ("new"), or unchanged ("all")."""
    if which not in SUBSAMPLES:
        raise ConfigError(f"subsample={which!r} is not one of: {', '.join(SUBSAMPLES)}")
    if which == "all":
        return bundle
    base, novel = base_novel_classes(bundle.num_classes)
    classes = base if which == "base" else novel
    return DatasetBundle(
        name=bundle.name,
        classnames=[bundle.classnames[c] for c in classes],
        train=_keep(bundle.train, classes),
        test=_keep(bundle.test, classes),
        domain_names=list(bundle.domain_names),
        domain_ids=None if bundle.domain_ids is None else list(bundle.domain_ids),
    )
