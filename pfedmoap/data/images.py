"""What every on-disk image dataset shares: lazy image files, the data root, folder listings, split-file lines, the
domain choice, and the one-line errors for each thing that can be missing or wrong.

The loaders (``coop``, ``imagenet``, ``domains``) only describe their layouts; the checks live here so that a
missing folder, a damaged split file or a listed image that is not on disk reads the same in every dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..base.errors import ConfigError
from ..base.files import first_line
from .layouts import LAYOUTS
from .registry import DatasetOptions, LabeledImages

COOP_IMAGE_SIZE = 224  # images are decoded to this square size (resize shorter side, centre crop) once read
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})


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


def labeled(paths: list[Path], labels: Sequence[int], domains: Sequence[int] | None = None) -> LabeledImages:
    """A split of lazily read images (an empty list gives the empty split of an evaluation-only dataset)."""
    doms = None if domains is None else np.asarray(domains, dtype=np.int64)
    return LabeledImages(ImageFiles(paths), np.asarray(labels, dtype=np.int64), doms)


def data_root(opts: DatasetOptions, name: str) -> Path:
    """``--data-root``, or one line saying that this dataset needs it and what it holds."""
    if not opts.root:
        raise ConfigError(f"dataset={name} needs --data-root DIR holding {LAYOUTS[name]}")
    return Path(opts.root).expanduser()


def not_found(name: str, root: Path, missing: Path | str) -> ConfigError:
    """The error for a dataset whose folder or file is not on disk (the CLI's presets match 'not found')."""
    return ConfigError(f"dataset={name}: not found under {root} (expected {LAYOUTS[name]}; missing {missing})")


def require(name: str, root: Path, *paths: Path) -> None:
    """Each path must exist, else :func:`not_found` naming the first one that does not."""
    for path in paths:
        if not path.exists():
            raise not_found(name, root, path)


def subfolders(folder: Path) -> list[str]:
    """The names of the folders in ``folder``, sorted (plain files such as README.txt are left out)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def image_files(folder: Path) -> list[Path]:
    """The image files in ``folder`` (not recursive), sorted by name: the order every loader lists a folder in."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(
                e.name
                for e in entries
                if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            )
    except OSError:
        return []
    return [folder / n for n in names]


def images_in(name: str, folder: Path) -> list[Path]:
    """The images of one class folder; a folder that is missing or holds no image is one line."""
    if not folder.is_dir():
        raise ConfigError(f"dataset={name}: class folder {folder} is missing (expected {LAYOUTS[name]})")
    files = image_files(folder)
    if not files:
        raise ConfigError(f"dataset={name}: no images (.jpg, .jpeg, .png, .bmp) in {folder}")
    return files


def check_listed(name: str, paths: Iterable[Path], source: Path | str) -> None:
    """Every image a split file lists must be a file on disk. Each folder is listed once (one ``scandir``, not a
    ``stat`` per image: DomainNet lists 600k images, ImageNet 1.3M)."""
    listing: dict[Path, set[str]] = {}
    for path in paths:
        names = listing.get(path.parent)
        if names is None:
            try:
                with os.scandir(path.parent) as entries:
                    names = {e.name for e in entries if e.is_file()}
            except OSError:
                names = set()
            listing[path.parent] = names
        if path.name not in names:
            raise ConfigError(f"dataset={name}: image listed in {source} is missing: {path}")


def read_lines(name: str, path: Path, what: str) -> list[tuple[int, str]]:
    """The non-empty lines of a text file with their 1-based numbers; unreadable or binary is one line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"dataset={name}: {what} {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"dataset={name}: {what} {path} cannot be read ({first_line(exc)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"dataset={name}: {what} {path} is not UTF-8 text") from None
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError(f"dataset={name}: {what} {path} is empty")
    return lines


def path_label_lines(name: str, path: Path, what: str) -> list[tuple[int, str, int]]:
    """Lines ``relative/path.jpg <int label>`` (the DomainNet and PACS split files): (line number, path, label)."""
    rows = []
    for number, line in read_lines(name, path, what):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(
                f"dataset={name}: {path} line {number} is not 'relative/path.jpg LABEL' (got {line[:80]!r})"
            )
        rows.append((number, parts[0], int(parts[1])))
    return rows


def pick_domains(name: str, requested: list[str] | None, valid: Sequence[str]) -> list[str]:
    """``--domains``: a subset of the dataset's domains in the order given (default: all, in the dataset's order).
    Domain ids are positions in the returned list."""
    if requested is None:
        return list(valid)
    unknown = [d for d in requested if d not in valid]
    if unknown or not requested or len(set(requested)) != len(requested):
        what = f"unknown domain {unknown[0]!r}" if unknown else "an empty or repeated domain list"
        raise ConfigError(f"dataset={name}: {what} in domains={requested!r}; valid domains: {', '.join(valid)}")
    return list(requested)
