"""Real image datasets, read from disk with torchvision (no downloads at run time).

Every loader expects the dataset already on disk under ``--data-root``. When it is missing, the user gets
one line saying what is missing, where to get it, and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.errors import ConfigError
from ..base.files import first_line
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


# ------------------------------------------------------------------------- CoOp-layout datasets (split_zhou)
# folder under --data-root, image folder inside it, CoOp's split file, number of classes, where to get it
COOP_DATASETS: dict[str, tuple[str, str, str, int]] = {
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "oxfordpets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
    "food101": ("food-101", "images", "split_zhou_Food101.json", 101),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", 47),
}
COOP_IMAGE_SIZE = 224  # images are decoded to this square size (resize shorter side, centre crop) once read


class ImageFiles:
    """Images read lazily from disk: ``files[i]`` is a uint8 tensor [3, S, S] (RGB, resized, centre-cropped)."""

    def __init__(self, paths: list[Path], size: int = COOP_IMAGE_SIZE):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        try:
            with Image.open(self.paths[i]) as img:
                t = TF.pil_to_tensor(img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, truncated, not an image
            raise ConfigError(
                f"image {str(self.paths[i])!r} cannot be read ({first_line(exc)}); replace it, or take it out of the "
                "dataset's split"
            ) from None
        t = TF.resize(t, self.size, antialias=True)
        return TF.center_crop(t, [self.size, self.size])


def _coop(opts: DatasetOptions, name: str) -> DatasetBundle:
    import json

    folder, image_dir, split_file, n_classes = COOP_DATASETS[name]
    layout = f"{folder}/{image_dir}/ and {folder}/{split_file} (CoOp's DATASETS.md layout)"
    base = _root(opts, name, layout) / folder
    if not (base / split_file).is_file() or not (base / image_dir).is_dir():
        raise ConfigError(
            f"dataset={name}: not found under {base.parent} (expected {layout}); download the images and "
            f"{split_file} as CoOp's DATASETS.md describes"
        )
    try:
        splits = json.loads((base / split_file).read_text())
        names: dict[int, str] = {}
        parts = {}
        for key in ("train", "test"):
            rows = splits[key]
            for _, label, classname in rows:
                names.setdefault(int(label), classname)
            parts[key] = (
                [base / image_dir / path for path, _, _ in rows],
                np.asarray([int(label) for _, label, _ in rows], dtype=np.int64),
            )
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"dataset={name}: {base / split_file} is not a CoOp split file") from None
    if sorted(names) != list(range(len(names))):
        raise ConfigError(f"dataset={name}: labels in {split_file} are not 0..C-1")
    if len(names) != n_classes:
        raise ConfigError(f"dataset={name}: {split_file} has {len(names)} classes, expected {n_classes}")
    missing = next((p for p in parts["train"][0] + parts["test"][0] if not p.is_file()), None)
    if missing is not None:
        raise ConfigError(f"dataset={name}: image listed in {split_file} is missing: {missing}")
    # class names in label order, as the split file gives them (underscores become spaces in prompts)
    classnames = [names[i] for i in range(len(names))]
    train = LabeledImages(ImageFiles(parts["train"][0]), parts["train"][1])
    test = LabeledImages(ImageFiles(parts["test"][0]), parts["test"][1])
    return DatasetBundle(name=name, classnames=classnames, train=train, test=test)


def _register_coop(name: str) -> None:
    register_dataset(name)(lambda opts: _coop(opts, name))


for _name in COOP_DATASETS:
    _register_coop(_name)


# ------------------------------------------------------------------------------ domain folders (feature shift)
# folder under --data-root, its domains (domain id = position), its classes (label = position, sorted)
DOMAIN_DATASETS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    # the FedBN 10-class subset of DomainNet
    "domainnet": (
        "domainnet",
        ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
        ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill", "wine_glass", "zebra"),
    ),
    "office-caltech10": (
        "office_caltech_10",
        ("amazon", "caltech", "dslr", "webcam"),
        (
            "back_pack",
            "bike",
            "calculator",
            "headphones",
            "keyboard",
            "laptop_computer",
            "monitor",
            "mouse",
            "mug",
            "projector",
        ),
    ),
}
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
TEST_FRACTION = 0.2  # per (domain, class), drawn with the data seed when no split files are given


def _domain_folders(opts: DatasetOptions, name: str) -> DatasetBundle:
    folder, domains, classes = DOMAIN_DATASETS[name]
    layout = f"{folder}/<domain>/<class>/*.jpg for domains {', '.join(domains)}"
    base = _root(opts, name, layout) / folder
    missing = [d for d in domains if not (base / d).is_dir()]
    if missing:
        raise ConfigError(f"dataset={name}: not found under {base.parent} (expected {layout}; missing {missing[0]})")
    rng = np.random.default_rng([opts.seed, 17])
    parts: dict[str, tuple[list[Path], list[int], list[int]]] = {"train": ([], [], []), "test": ([], [], [])}
    for d, domain in enumerate(domains):
        for c, cls in enumerate(classes):
            files = sorted(p for p in (base / domain / cls).glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
            if not files:
                raise ConfigError(f"dataset={name}: no images in {base / domain / cls}")
            order = rng.permutation(len(files))
            n_test = max(1, int(round(TEST_FRACTION * len(files)))) if len(files) > 1 else 0
            for key, idx in (("test", order[:n_test]), ("train", order[n_test:])):
                for i in sorted(idx):
                    parts[key][0].append(files[i])
                    parts[key][1].append(c)
                    parts[key][2].append(d)

    def split(key: str) -> LabeledImages:
        paths, labels, doms = parts[key]
        return LabeledImages(ImageFiles(paths), np.asarray(labels, np.int64), np.asarray(doms, np.int64))

    # class names in label order; the reference code built them from a Python set, which scrambled them
    return DatasetBundle(
        name=name, classnames=list(classes), train=split("train"), test=split("test"), domain_names=list(domains)
    )


def _register_domains(name: str) -> None:
    register_dataset(name)(lambda opts: _domain_folders(opts, name))


for _name in DOMAIN_DATASETS:
    _register_domains(_name)
