"""Real image datasets, read from disk with torchvision (no downloads at run time): CIFAR and Fashion-MNIST here;
CoOp's datasets in ``coop.py`` and ``imagenet.py``, the domain datasets in ``domains.py``, their layouts in
``layouts.py`` and the lazy :class:`ImageFiles` in ``images.py`` (the names below are kept importable from here).

Every loader expects the dataset already on disk under ``--data-root``. When it is missing, the user gets
one line saying what is missing, where to get it, and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.errors import ConfigError
from .coop import COOP_DATASETS  # noqa: F401  (older imports name these here)
from .domains import DOMAIN_DATASETS, TEST_FRACTION  # noqa: F401
from .images import COOP_IMAGE_SIZE, ImageFiles, data_root  # noqa: F401
from .registry import DatasetBundle, DatasetOptions, LabeledImages, register_dataset


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
    root = data_root(opts, name)
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


# --------------------------------------------------------------------------------------------- Fashion-MNIST
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _fashion_root(opts: DatasetOptions) -> Path:
    """A root in torchvision's FashionMNIST layout (ROOT/FashionMNIST/raw/<idx files>).

    Accepted sources, in order: --data-root already in that layout; --data-root holding the four .gz files;
    the Debian package's folder. Gzipped files are unpacked once into the pfedmoap cache.
    """
    import gzip
    import os
    import shutil

    from ..base.files import cache_dir

    given = Path(opts.root).expanduser() if opts.root else None
    if given is not None and all((given / "FashionMNIST" / "raw" / f).is_file() for f in _FASHION_FILES):
        return given
    sources = [given] if given is not None else [DEBIAN_FASHION_MNIST]
    for src in sources:
        if all((src / f"{f}.gz").is_file() for f in _FASHION_FILES):
            root = cache_dir() / "fashion-mnist"
            raw = root / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in _FASHION_FILES:
                if not (raw / f).is_file():
                    tmp = raw / f"{f}.tmp"
                    with gzip.open(src / f"{f}.gz", "rb") as fin, open(tmp, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                    os.replace(tmp, raw / f)  # never a half-written file under the real name
            return root
    looked = given if given is not None else DEBIAN_FASHION_MNIST
    raise ConfigError(
        f"dataset=fashion-mnist: not found in {looked} (expected the four *-idx?-ubyte.gz files, or "
        "FashionMNIST/raw/ as torchvision writes it); on Debian: apt-get install dataset-fashion-mnist"
    )


@register_dataset("fashion-mnist")
def fashion_mnist(opts: DatasetOptions) -> DatasetBundle:
    """Fashion-MNIST (10 classes, 28x28 grey, shown to CLIP as 3 equal channels); offline from Debian."""
    from torchvision import datasets

    root = _fashion_root(opts)
    try:
        train = datasets.FashionMNIST(str(root), train=True, download=False)
        test = datasets.FashionMNIST(str(root), train=False, download=False)
    except RuntimeError:
        raise ConfigError(f"dataset=fashion-mnist: the files under {root} could not be read") from None

    def split(ds) -> LabeledImages:
        # a broadcast view: rows are copied only when a client's images are gathered
        images = ds.data[:, None].expand(-1, 3, -1, -1)
        return LabeledImages(images, ds.targets.numpy().astype(np.int64))

    names = [c.replace("/", " or ") for c in datasets.FashionMNIST.classes]  # "T-shirt/top" reads oddly
    return DatasetBundle(name="fashion-mnist", classnames=names, train=split(train), test=split(test))
