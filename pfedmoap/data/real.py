"""Real image datasets, read from disk with torchvision (no downloads at run time).

Every loader expects the dataset already on disk under ``--data-root``. When it is missing, the user gets
one line saying what is missing, where to get it, and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .registry import DatasetBundle, DatasetOptions, LabeledImages, register_dataset


def _root(opts: DatasetOptions, name: str, layout: str) -> Path:
    if not opts.root:
        raise ConfigError(f"dataset={name} needs --data-root DIR holding {layout}")
    return Path(opts.root).expanduser()


def _cifar(opts: DatasetOptions, name: str) -> DatasetBundle:
    from torchvision import datasets

    cls, folder = (
        (datasets.CIFAR10, "cifar-10-batches-py")
        if name == "cifar10"
        else (
            datasets.CIFAR100,
            "cifar-100-python",
        )
    )
    layout = f"{folder}/ (the python version of {name.upper()})"
    root = _root(opts, name, layout)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError:
        raise ConfigError(
            f"dataset={name}: not found or corrupted under {root} (expected {root / folder}/); get it with "
            f"torchvision.datasets.{cls.__name__}('{root}', download=True) on a machine with internet"
        ) from None

    def split(ds) -> LabeledImages:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        return LabeledImages(images, np.asarray(ds.targets, dtype=np.int64))

    # torchvision's class lists are in label order (read from the dataset's own meta file)
    return DatasetBundle(name=name, classnames=list(train.classes), train=split(train), test=split(test))


@register_dataset("cifar10")
def cifar10(opts: DatasetOptions) -> DatasetBundle:
    """CIFAR-10 (10 classes, 32x32), the paper's label-shift setting with Dirichlet(0.5) over 100 clients."""
    return _cifar(opts, "cifar10")


@register_dataset("cifar100")
def cifar100(opts: DatasetOptions) -> DatasetBundle:
    """CIFAR-100 (100 fine classes, 32x32)."""
    return _cifar(opts, "cifar100")
