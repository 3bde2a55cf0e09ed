"""ImageNet and its four evaluation-only variants, in CoOp's layout (``DATASETS.md``).

Class names are CLIP's cleaned ImageNet names from ``classnames.txt`` (one ``wnid name`` line per class, in the
official wnid order). The variants are test sets only: their train split is empty and their test split is every
image. Each variant reads the copy of ``classnames.txt`` in its own folder, as CoOp asks for, and falls back to
``imagenet/classnames.txt`` when that copy is absent (the file is the same).
"""

from __future__ import annotations

from pathlib import Path

from ..base.errors import ConfigError
from .images import data_root, images_in, labeled, not_found, read_lines, require, subfolders
from .registry import DatasetBundle, DatasetOptions, LabeledImages, register_dataset

IMAGENET_CLASSES = 1000
SUBSET_CLASSES = 200  # ImageNet-A and ImageNet-R: 200 of the 1000 classes, one folder each


def read_classnames(name: str, path: Path) -> list[tuple[str, str]]:
    """``classnames.txt`` as (wnid, class name) pairs in line order; it must list the 1000 classes once each."""
    rows = []
    for number, line in read_lines(name, path, "class list"):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ConfigError(f"dataset={name}: {path} line {number} is not 'WNID class name' (got {line[:80]!r})")
        rows.append((parts[0], parts[1]))
    wnids = [w for w, _ in rows]
    if len(set(wnids)) != len(wnids):
        twice = next(w for w in wnids if wnids.count(w) > 1)
        raise ConfigError(f"dataset={name}: {path} lists {twice} twice")
    if len(rows) != IMAGENET_CLASSES:
        raise ConfigError(f"dataset={name}: {path} lists {len(rows)} classes, expected {IMAGENET_CLASSES}")
    return rows


def _variant_classnames(name: str, root: Path, folder: str) -> list[tuple[str, str]]:
    """The variant's own ``classnames.txt``, else ImageNet's."""
    own, shared = root / folder / "classnames.txt", root / "imagenet" / "classnames.txt"
    for path in (own, shared):
        if path.is_file():
            return read_classnames(name, path)
    raise not_found(name, root, f"{own} (and {shared})")


def _class_folders(name: str, folder: Path, subdirs: list[str]) -> LabeledImages:
    """Label i = the images of ``folder/subdirs[i]``."""
    paths, labels = [], []
    for label, sub in enumerate(subdirs):
        files = images_in(name, folder / sub)
        paths += files
        labels += [label] * len(files)
    return labeled(paths, labels)


def _evaluation_only(name: str, classnames: list[str], test: LabeledImages) -> DatasetBundle:
    return DatasetBundle(name=name, classnames=classnames, train=labeled([], []), test=test)


@register_dataset("imagenet")
def imagenet(opts: DatasetOptions) -> DatasetBundle:
    """ImageNet-1k: label = line order of ``imagenet/classnames.txt`` (the sorted wnid order, so the same labels as
    CoOp's sorted folders); train = ``images/train/``, test = ``images/val/`` (CoOp tests on the official val)."""
    name = "imagenet"
    root = data_root(opts, name)
    base = root / "imagenet"
    require(name, root, base / "classnames.txt", base / "images" / "train", base / "images" / "val")
    classes = read_classnames(name, base / "classnames.txt")
    wnids = [w for w, _ in classes]
    train = _class_folders(name, base / "images" / "train", wnids)
    test = _class_folders(name, base / "images" / "val", wnids)
    return DatasetBundle(name=name, classnames=[c for _, c in classes], train=train, test=test)


@register_dataset("imagenet-v2")
def imagenet_v2(opts: DatasetOptions) -> DatasetBundle:
    """ImageNetV2 matched-frequency (1000 classes, evaluation only): folder ``i`` holds class i, named by line i
    of ``classnames.txt`` (``imagenetv2/classnames.txt``, else ``imagenet/classnames.txt``)."""
    name = "imagenet-v2"
    root = data_root(opts, name)
    image_dir = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    require(name, root, image_dir)
    classes = _variant_classnames(name, root, "imagenetv2")
    test = _class_folders(name, image_dir, [str(i) for i in range(IMAGENET_CLASSES)])
    return _evaluation_only(name, [c for _, c in classes], test)


@register_dataset("imagenet-sketch")
def imagenet_sketch(opts: DatasetOptions) -> DatasetBundle:
    """ImageNet-Sketch (1000 classes, evaluation only): ``images/<wnid>/``, label = line order of
    ``classnames.txt`` (``imagenet-sketch/classnames.txt``, else ``imagenet/classnames.txt``)."""
    name = "imagenet-sketch"
    root = data_root(opts, name)
    image_dir = root / "imagenet-sketch" / "images"
    require(name, root, image_dir)
    classes = _variant_classnames(name, root, "imagenet-sketch")
    test = _class_folders(name, image_dir, [w for w, _ in classes])
    return _evaluation_only(name, [c for _, c in classes], test)


def _subset(opts: DatasetOptions, name: str, folder: str, image_folder: str) -> DatasetBundle:
    """ImageNet-A / -R: labels 0..199 over the sorted wnid folders present (CoOp's rule: no masked 1000-way head,
    the classifier holds only these 200 names), names looked up by wnid."""
    root = data_root(opts, name)
    image_dir = root / folder / image_folder
    require(name, root, image_dir)
    names = dict(_variant_classnames(name, root, folder))
    wnids = subfolders(image_dir)
    if len(wnids) != SUBSET_CLASSES:
        raise ConfigError(
            f"dataset={name}: {image_dir} holds {len(wnids)} class folders, expected {SUBSET_CLASSES} (one per wnid)"
        )
    unknown = next((w for w in wnids if w not in names), None)
    if unknown is not None:
        raise ConfigError(f"dataset={name}: folder {image_dir / unknown} is not a wnid listed in classnames.txt")
    return _evaluation_only(name, [names[w] for w in wnids], _class_folders(name, image_dir, wnids))


@register_dataset("imagenet-a")
def imagenet_a(opts: DatasetOptions) -> DatasetBundle:
    """ImageNet-A (200 classes, evaluation only): ``imagenet-adversarial/imagenet-a/<wnid>/``; labels over the
    sorted wnids; names from ``imagenet-adversarial/classnames.txt``, else ``imagenet/classnames.txt``."""
    return _subset(opts, "imagenet-a", "imagenet-adversarial", "imagenet-a")


@register_dataset("imagenet-r")
def imagenet_r(opts: DatasetOptions) -> DatasetBundle:
    """ImageNet-R (200 classes, evaluation only): ``imagenet-rendition/imagenet-r/<wnid>/``; labels over the
    sorted wnids; names from ``imagenet-rendition/classnames.txt``, else ``imagenet/classnames.txt``."""
    return _subset(opts, "imagenet-r", "imagenet-rendition", "imagenet-r")
