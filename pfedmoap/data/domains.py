"""Datasets with domains (feature shift), in Dassl's layouts (``DATASETS.md``) and the FedBN subsets.

Every loader honours ``opts.domains`` (``--domains``): a subset of the dataset's domains, in the order given, default
all of them; ``domain_names`` is that list and each row's domain id is its position in it. A domain's images and
its train/test split never depend on which other domains are loaded, so a domain read alone (a cross-domain
target) is the same set of images as in a run over all domains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.errors import ConfigError
from .images import (
    check_listed,
    data_root,
    image_files,
    images_in,
    labeled,
    path_label_lines,
    pick_domains,
    require,
    subfolders,
)
from .registry import DatasetBundle, DatasetOptions, register_dataset

Split = tuple[list[Path], list[int], list[int]]  # paths, labels, domain ids


def _bundle(name: str, classnames: list[str], domains: list[str], parts: dict[str, Split]) -> DatasetBundle:
    train, test = (labeled(*parts[key]) for key in ("train", "test"))
    return DatasetBundle(name=name, classnames=classnames, train=train, test=test, domain_names=domains)


def _new_parts() -> dict[str, Split]:
    return {"train": ([], [], []), "test": ([], [], [])}


# ------------------------------------------------------------------ domain folders without split files (own split)
# folder under --data-root, its domains (default order), its classes (label = position, sorted)
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
    "office31": (
        "office31",
        ("amazon", "dslr", "webcam"),
        (
            "back_pack",
            "bike",
            "bike_helmet",
            "bookcase",
            "bottle",
            "calculator",
            "desk_chair",
            "desk_lamp",
            "desktop_computer",
            "file_cabinet",
            "headphones",
            "keyboard",
            "laptop_computer",
            "letter_tray",
            "mobile_phone",
            "monitor",
            "mouse",
            "mug",
            "paper_notebook",
            "pen",
            "phone",
            "printer",
            "projector",
            "punchers",
            "ring_binder",
            "ruler",
            "scissors",
            "speaker",
            "stapler",
            "tape_dispenser",
            "trash_can",
        ),
    ),
}
TEST_FRACTION = 0.2  # per (domain, class), drawn with the data seed when no split files are given


def _domain_folders(opts: DatasetOptions, name: str) -> DatasetBundle:
    """Our own split of ``<folder>/<domain>/<class>/``: per (domain, class), ``round(TEST_FRACTION * n)`` images
    (at least one when the class has two or more) go to test, drawn with a generator seeded by (``opts.seed``, the
    domain's position in the dataset's full domain list), so a domain's split is the same whichever domains are
    loaded with it; every file is listed in name order first."""
    folder, all_domains, classes = DOMAIN_DATASETS[name]
    domains = pick_domains(name, opts.domains, all_domains)
    root = data_root(opts, name)
    base = root / folder
    require(name, root, *(base / d for d in domains))
    parts = _new_parts()
    for d, domain in enumerate(domains):
        rng = np.random.default_rng([opts.seed, 17, all_domains.index(domain)])
        for c, cls in enumerate(classes):
            files = images_in(name, base / domain / cls)
            order = rng.permutation(len(files))
            n_test = max(1, int(round(TEST_FRACTION * len(files)))) if len(files) > 1 else 0
            for key, idx in (("test", order[:n_test]), ("train", order[n_test:])):
                for i in sorted(idx):
                    parts[key][0].append(files[i])
                    parts[key][1].append(c)
                    parts[key][2].append(d)
    # class names in label order; the reference code built them from a Python set, which scrambled them
    return _bundle(name, list(classes), domains, parts)


@register_dataset("domainnet")
def domainnet(opts: DatasetOptions) -> DatasetBundle:
    """FedBN's 10-class DomainNet subset (6 domains; classes in the fixed sorted order of ``DOMAIN_DATASETS``), our
    seeded 80/20 split per (domain, class). Not the 345-class benchmark: that is ``domainnet-345``."""
    return _domain_folders(opts, "domainnet")


@register_dataset("office-caltech10")
def office_caltech10(opts: DatasetOptions) -> DatasetBundle:
    """Office-Caltech10 (4 domains, 10 classes in sorted order), our seeded 80/20 split per (domain, class)."""
    return _domain_folders(opts, "office-caltech10")


@register_dataset("office31")
def office31(opts: DatasetOptions) -> DatasetBundle:
    """Office-31 (domains amazon, dslr, webcam; 31 classes, sorted folder names). It has no official split, so
    ours: a seeded 80/20 split per (domain, class) as for Office-Caltech10 (``TEST_FRACTION``, ``opts.seed``)."""
    return _domain_folders(opts, "office31")


# -------------------------------------------------------------------------------------------- split-file helpers
def _name_label(name: str, names: dict[int, str], label: int, classname: str, path: Path, number: int) -> None:
    """Record ``label``'s class name; one label named two ways in the split files is one line."""
    if names.setdefault(label, classname) != classname:
        raise ConfigError(
            f"dataset={name}: {path} line {number} names label {label} {classname!r}, elsewhere {names[label]!r}"
        )


def _all_named(name: str, names: dict[int, str], n_classes: int, domains: list[str], first: int = 0) -> list[str]:
    """The class names in label order; a label no split file of these domains uses has no name: one line."""
    missing = [i for i in range(n_classes) if i not in names]
    if missing:
        raise ConfigError(
            f"dataset={name}: label {missing[0] + first} appears in no split file of domains {', '.join(domains)}, "
            "so its class name is unknown"
        )
    return [names[i] for i in range(n_classes)]


def _class_of(name: str, rel: str, path: Path, number: int) -> str:
    """The class folder of a split file's ``domain/class/file.jpg`` path."""
    pieces = rel.split("/")
    if len(pieces) < 3 or not all(pieces):
        raise ConfigError(f"dataset={name}: {path} line {number}: {rel!r} is not 'domain/class/file'")
    return pieces[-2]


# --------------------------------------------------------------------------------------------------------- PACS
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = 7
PACS_BAD_FILES = frozenset({"sketch/dog/n02103406_4068-1.png"})  # listed, but a broken image (Dassl skips it too)


@register_dataset("pacs")
def pacs(opts: DatasetOptions) -> DatasetBundle:
    """PACS (4 domains, 7 classes): the official k-fold split files, lines ``domain/class/file LABEL`` with 1-based
    labels; label order = those labels minus 1 (dog, elephant, giraffe, guitar, horse, house, person), names =
    the class folders. Train = ``train`` + ``crossval`` lists, test = ``test`` list of each domain."""
    name = "pacs"
    domains = pick_domains(name, opts.domains, PACS_DOMAINS)
    root = data_root(opts, name)
    base = root / "pacs"
    require(name, root, base / "images", base / "splits")
    names: dict[int, str] = {}
    parts = _new_parts()
    for d, domain in enumerate(domains):
        require(name, root, base / "images" / domain)
        for key, lists in (("train", ("train", "crossval")), ("test", ("test",))):
            for kind in lists:
                path = base / "splits" / f"{domain}_{kind}_kfold.txt"
                require(name, root, path)
                paths = []
                for number, rel, label in path_label_lines(name, path, "split file"):
                    if rel in PACS_BAD_FILES:
                        continue
                    if not 1 <= label <= PACS_CLASSES:
                        raise ConfigError(
                            f"dataset={name}: {path} line {number}: label {label} is not in 1..{PACS_CLASSES} "
                            "(PACS labels are 1-based)"
                        )
                    _name_label(name, names, label - 1, _class_of(name, rel, path, number), path, number)
                    paths.append(base / "images" / rel)
                    parts[key][1].append(label - 1)
                    parts[key][2].append(d)
                check_listed(name, paths, path)
                parts[key][0].extend(paths)
    return _bundle(name, _all_named(name, names, PACS_CLASSES, domains, first=1), domains, parts)


# -------------------------------------------------------------------------------------------------- Office-Home
OFFICE_HOME_DOMAINS = ("art", "clipart", "product", "real_world")
OFFICE_HOME_CLASSES = 65


@register_dataset("office-home")
def office_home(opts: DatasetOptions) -> DatasetBundle:
    """Office-Home, Dassl's DG copy (4 domains, 65 classes): ``<domain>/{train,val}/<class>/``. Label order = the
    class folders sorted by their lower-cased names, names lower-cased (Dassl's, for its lower-case folders);
    every domain and split must hold the same 65 classes. Train = ``train``, test = ``val``."""
    name = "office-home"
    domains = pick_domains(name, opts.domains, OFFICE_HOME_DOMAINS)
    root = data_root(opts, name)
    base = root / "office_home_dg"
    classes: list[str] = []
    reference = base
    parts = _new_parts()
    for d, domain in enumerate(domains):
        for key, split in (("train", "train"), ("test", "val")):
            folder = base / domain / split
            require(name, root, folder)
            found = {sub.lower(): sub for sub in subfolders(folder)}
            if not classes:
                classes, reference = sorted(found), folder
                if len(classes) != OFFICE_HOME_CLASSES:
                    raise ConfigError(
                        f"dataset={name}: {folder} holds {len(classes)} class folders, expected {OFFICE_HOME_CLASSES}"
                    )
            elif sorted(found) != classes:
                odd = sorted(set(found).symmetric_difference(classes))[0]
                raise ConfigError(f"dataset={name}: {folder} and {reference} hold different classes (e.g. {odd!r})")
            for label, cls in enumerate(classes):
                files = image_files(folder / found[cls])  # a class may have no val image in a small domain
                parts[key][0].extend(files)
                parts[key][1].extend([label] * len(files))
                parts[key][2].extend([d] * len(files))
    return _bundle(name, classes, domains, parts)


# ---------------------------------------------------------------------------------------- DomainNet, 345 classes
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = 345


@register_dataset("domainnet-345")
def domainnet_345(opts: DatasetOptions) -> DatasetBundle:
    """DomainNet, all 345 classes (6 domains): the (cleaned) ``splits/<domain>_{train,test}.txt`` files, lines
    ``domain/class/file.jpg LABEL`` with labels 0..344; label order = those labels, names = the class folders
    (``aircraft_carrier``, ...). Train = ``train`` list, test = ``test`` list of each domain."""
    name = "domainnet-345"
    domains = pick_domains(name, opts.domains, DOMAINNET_DOMAINS)
    root = data_root(opts, name)
    base = root / "domainnet"
    require(name, root, base / "splits")
    names: dict[int, str] = {}
    parts = _new_parts()
    for d, domain in enumerate(domains):
        require(name, root, base / domain)
        for key in ("train", "test"):
            path = base / "splits" / f"{domain}_{key}.txt"
            require(name, root, path)
            paths = []
            for number, rel, label in path_label_lines(name, path, "split file"):
                if not 0 <= label < DOMAINNET_CLASSES:
                    raise ConfigError(
                        f"dataset={name}: {path} line {number}: label {label} is not in 0..{DOMAINNET_CLASSES - 1}"
                    )
                _name_label(name, names, label, _class_of(name, rel, path, number), path, number)
                paths.append(base / rel)
                parts[key][1].append(label)
                parts[key][2].append(d)
            check_listed(name, paths, path)
            parts[key][0].extend(paths)
    return _bundle(name, _all_named(name, names, DOMAINNET_CLASSES, domains), domains, parts)
