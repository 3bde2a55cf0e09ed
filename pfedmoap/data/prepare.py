"""Getting the on-disk datasets into the layout the loaders read, and checking what is there.

``prepare`` downloads what torchvision can download (Flowers102, OxfordPets, Food101, Caltech101, DTD, SUN397,
EuroSAT, FGVCAircraft, and CIFAR-10/100 and Fashion-MNIST), checks each archive's md5, extracts it, and moves its
folders into CoOp's DATASETS.md layout. What has no public download (CoOp's ``split_zhou_*.json`` files on Google
Drive, StanfordCars, UCF101's mid-frames, ImageNet and its variants, PACS, Office-Home, Office-31, DomainNet) it
names, one line per file, with where it goes. ``check`` says for every dataset whether it is ready, incomplete or
absent, and compares the number of images per split with the published counts, reading only split files and
folder listings (no image is decoded).

Safety, because datasets take hours to download and users keep their own files beside them:

- The network is reached through one function, :func:`fetch` (tests pass their own ``downloader``).
- A download goes to ``NAME.partial`` and takes its real name only once whole and verified, so an archive under
  its real name is complete. An archive already there is not downloaded again; one whose md5 is wrong is refused
  and left as it is.
- Extraction happens in ``ROOT/.prepare-ARCHIVE.tmp/`` (a folder of ours); its folders are then renamed into place.
  A rename never replaces anything: what is already at the destination is kept, and a folder is merged entry by
  entry. An interrupted run leaves the temporary folder, which the next run reuses or redoes.
- Nothing the user put under the root is deleted or overwritten; the only things removed are our own temporary
  folders and ``.partial`` files.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..base.errors import RunFailed, UserError
from ..base.files import first_line, os_reason
from .domains import DOMAIN_DATASETS, DOMAINNET_DOMAINS, OFFICE_HOME_DOMAINS, PACS_DOMAINS

Downloader = Callable[[str, Path], None]
Log = Callable[[str], None]

DOWNLOADS = "downloads"  # the folder under the root that keeps the archives
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # the Debian package the loader also reads


def fetch(url: str, dest: Path) -> None:
    """Download ``url`` to the file ``dest``: the only place this module reaches the network (tests replace it).

    torchvision's ``download_url`` follows redirects and Google-Drive links and falls back from https to http.
    """
    from torchvision.datasets.utils import download_url

    download_url(url, str(dest.parent), dest.name)


# ------------------------------------------------------------------------------------------------ what is where
# md5 of each archive prepare downloads, by file name, as torchvision 0.29 checks them (flowers102.py, oxford_iiit_pet
# .py, food101.py, caltech.py, dtd.py, sun397.py, eurosat.py, cifar.py, mnist.py). None: no checksum is published
# (FGVC-Aircraft's tarball), so that archive is used unverified.
MD5: dict[str, str | None] = {
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
    "images.tar.gz": "5c4f3ee8e5d25df40f4fd59a7f44e54c",
    "annotations.tar.gz": "95a8c909bbe2e81eed6a22bccdf3f68f",
    "food-101.tar.gz": "85eeb15f3717b99a5da872d97d918f87",
    "caltech-101.zip": "3138e1922a9193bfa496528edbbc45d0",
    "dtd-r1.0.1.tar.gz": "fff73e5086ae6bdbea199a49dfb8a4c1",
    "SUN397.tar.gz": "8ca2778205c41d23104230ba66911c7a",
    "EuroSAT.zip": "c8fa014336c82ac7804f0398fcb19387",
    "fgvc-aircraft-2013b.tar.gz": None,
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

# Images per split that a complete copy has. The 11 CoOp datasets: the train/val/test sizes of CoOp's split files
# as the CoOp paper (IJCV 2022) tabulates them; each agrees with the dataset's official size and the split rule in
# CoOp's datasets/*.py (e.g. Pets 2944 + 736 = the 3680 official trainval, 80/20; DTD 60/24/36 of 120 per class).
# ImageNet: the ILSVRC-2012 train and val sets (CoOp tests on val). Variants: their papers' sizes. PACS, Office-31:
# Dassl's docstrings. Office-Home: its paper (Venkateswara et al. 2017), for the images of all four domains (Dassl's
# DG copy splits them into train/ and val/; that it keeps every image is assumed, not checked). DomainNet-345: the
# line totals of the cleaned split files (train 409,832 + test 176,743 = 586,575). Office-Caltech10: the usual
# per-domain sizes (Gong et al. 2012). The FedBN DomainNet subset has no published count: check only reports it.
EXPECTED_COUNTS: dict[str, dict[str, int]] = {
    "imagenet": {"train": 1281167, "test": 50000, "classes": 1000},
    "caltech101": {"train": 4128, "val": 1649, "test": 2465},
    "oxfordpets": {"train": 2944, "val": 736, "test": 3669},
    "stanfordcars": {"train": 6509, "val": 1635, "test": 8041},
    "flowers102": {"train": 4093, "val": 1633, "test": 2463},
    "food101": {"train": 50500, "val": 20200, "test": 30300},
    "fgvcaircraft": {"train": 3334, "val": 3333, "test": 3333},
    "sun397": {"train": 15880, "val": 3970, "test": 19850},
    "dtd": {"train": 2820, "val": 1128, "test": 1692},
    "eurosat": {"train": 13500, "val": 5400, "test": 8100},
    "ucf101": {"train": 7639, "val": 1898, "test": 3783},
    "imagenet-v2": {"test": 10000, "classes": 1000},
    "imagenet-sketch": {"test": 50889, "classes": 1000},
    "imagenet-a": {"test": 7500, "classes": 200},
    "imagenet-r": {"test": 30000, "classes": 200},
    "pacs": {"art_painting": 2048, "cartoon": 2344, "photo": 1670, "sketch": 3929, "total": 9991},
    "office-home": {"art": 2427, "clipart": 4365, "product": 4439, "real_world": 4357, "total": 15588},
    "office31": {"amazon": 2817, "dslr": 498, "webcam": 795, "total": 4110},
    "domainnet-345": {"train": 409832, "test": 176743},
    "office-caltech10": {"amazon": 958, "caltech": 1123, "dslr": 157, "webcam": 295},
    "cifar10": {"train": 50000, "test": 10000},
    "cifar100": {"train": 50000, "test": 10000},
    "fashion-mnist": {"train": 60000, "test": 10000},
}


@dataclass(frozen=True)
class Archive:
    """One download: where it comes from, and which of its paths go where under the root."""

    filename: str
    url: str
    moves: tuple[tuple[str, str], ...]  # (path inside the extracted tree, path under the root)
    provides: tuple[str, ...]  # paths under the root that say this archive's content is already in place
    inner: tuple[str, ...] = ()  # archives inside it, extracted where they lie (Caltech101's zip holds a tar.gz)
    extract: bool = True  # False: a plain file, placed as it is


@dataclass(frozen=True)
class Recipe:
    """How to prepare and check one dataset: where it lives under the root, what a complete copy holds, how to count
    it, what to download and what to place by hand (the loaders' one-line layouts are `pfedmoap.data.layouts`)."""

    name: str
    folders: tuple[str, ...]  # the dataset is "absent" while none of these exists
    required: tuple[str, ...]  # paths under the root the loader reads
    counter: Callable[[Path], dict[str, int]]
    archives: tuple[Archive, ...] = ()
    manual: dict[str, str] = field(default_factory=dict)  # required path -> where to get it (no download)


class _Incomplete(Exception):
    """Raised by a counter: the files are there but not usable (a damaged split file, listed images missing), or
    one of several alternatives is missing (``missing``: the paths to name when saying what to place by hand)."""

    def __init__(self, reason: str, missing: list[str] | None = None):
        super().__init__(reason)
        self.missing = missing or []


# ---------------------------------------------------------------------------------------------------- counting
def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _IMAGE_SUFFIXES and not name.startswith(".")


def _files_under(folder: Path) -> set[str]:
    """Every file under ``folder``, as POSIX paths relative to it (one directory listing per folder)."""
    found = set()
    for dirpath, _, files in os.walk(folder, followlinks=True):
        rel = os.path.relpath(dirpath, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        found.update(prefix + f for f in files)
    return found


def _count_images(folder: Path) -> int:
    """Image files under ``folder``, at any depth."""
    return sum(sum(map(_is_image, files)) for _, _, files in os.walk(folder, followlinks=True))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _some(items: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a list short enough for one line."""
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"


def _check_listed(listed: Iterable[str], folder: Path, source: str) -> None:
    """Every path a split file lists must be a file under ``folder``."""
    present = _files_under(folder)
    missing = sorted(p for p in set(listed) if p not in present)
    if missing:
        raise _Incomplete(f"{len(missing)} images {source} lists are missing under {folder.name}/, e.g. {missing[0]}")


def _coop_split(folder: str, image_dir: str, split_file: str) -> Callable[[Path], dict[str, int]]:
    """Counts of a CoOp ``split_zhou_*.json``: ``{"train": [[path, label, classname], ...], "val": ..., "test": ...}``
    with paths relative to the image folder."""

    def count(root: Path) -> dict[str, int]:
        path = root / folder / split_file
        try:
            splits = json.loads(path.read_text(encoding="utf-8"))
            rows = {key: splits[key] for key in ("train", "val", "test")}
            if not all(isinstance(part, list) for part in rows.values()):
                raise TypeError
            listed = [str(entry[0]) for part in rows.values() for entry in part]
        except (ValueError, KeyError, TypeError, IndexError):
            raise _Incomplete(f"{folder}/{split_file} is not a CoOp split file (damaged or another file)") from None
        _check_listed(listed, root / folder / image_dir, split_file)
        return {key: len(part) for key, part in rows.items()}

    return count


def _aircraft(root: Path) -> dict[str, int]:
    """FGVC-Aircraft's official variant splits: ``images_variant_{split}.txt`` lines ``<image id> <variant>``."""
    base = root / "fgvc_aircraft"
    counts, listed = {}, []
    for split in ("train", "val", "test"):
        lines = [ln for ln in (base / f"images_variant_{split}.txt").read_text().splitlines() if ln.strip()]
        listed += [f"{ln.split(' ', 1)[0]}.jpg" for ln in lines]
        counts[split] = len(lines)
    _check_listed(listed, base / "images", "images_variant_*.txt")
    return counts


def _classnames(path: Path, n_classes: int) -> None:
    """CoOp's ``classnames.txt``: one ``wnid name`` line per ImageNet class."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if len(lines) != n_classes:
        raise _Incomplete(
            f"{path.parent.name}/{path.name} has {len(lines)} lines, expected {n_classes} (one per class)"
        )


def _class_folders(split_dirs: dict[str, Path], classnames: Path) -> dict[str, int]:
    """Images in one folder per class (ImageNet and its variants), and the number of classes."""
    _classnames(classnames, 1000)
    counts, classes = {}, set()
    for key, folder in split_dirs.items():
        subs = _subfolders(folder)
        classes.update(p.name for p in subs)
        counts[key] = sum(_count_images(p) for p in subs)
    counts["classes"] = len(classes)
    return counts


def _imagenet(root: Path) -> dict[str, int]:
    base = root / "imagenet"
    return _class_folders(
        {"train": base / "images" / "train", "test": base / "images" / "val"}, base / "classnames.txt"
    )


def _variant(folder: str, images: str) -> Callable[[Path], dict[str, int]]:
    """A variant reads its own copy of classnames.txt, else ImageNet's (the loaders' fallback)."""

    def count(root: Path) -> dict[str, int]:
        names = next(
            (p for p in (root / folder / "classnames.txt", root / "imagenet" / "classnames.txt") if p.is_file()), None
        )
        if names is None:
            raise _Incomplete(
                f"missing {folder}/classnames.txt (or imagenet/classnames.txt)", missing=[f"{folder}/classnames.txt"]
            )
        return _class_folders({"test": root / folder / images}, names)

    return count


_PACS_SKIPPED = {"sketch/dog/n02103406_4068-1.png"}  # listed but faulty; Dassl skips it (dg/pacs.py)


def _pacs(root: Path) -> dict[str, int]:
    """PACS (Dassl's copy): images per domain, and every image its kfold split files list must be there."""
    base = root / "pacs"
    listed = []
    for domain in PACS_DOMAINS:
        for split in ("train", "crossval", "test"):
            lines = (base / "splits" / f"{domain}_{split}_kfold.txt").read_text().splitlines()
            listed += [ln.split()[0] for ln in lines if ln.strip() and ln.split()[0] not in _PACS_SKIPPED]
    _check_listed(listed, base / "images", "the kfold split files")
    counts = {d: _count_images(base / "images" / d) for d in PACS_DOMAINS}
    counts["total"] = sum(counts.values())
    return counts


def _domain_totals(folder: str, domains: tuple[str, ...], total: bool = True) -> Callable[[Path], dict[str, int]]:
    """Images per domain folder (at any depth: Office-Home's DG copy nests train/ and val/ in each domain)."""

    def count(root: Path) -> dict[str, int]:
        counts = {d: _count_images(root / folder / d) for d in domains}
        if total:
            counts["total"] = sum(counts.values())
        return counts

    return count


def _domain_classes(folder: str, domains: tuple[str, ...], classes: tuple[str, ...]) -> Callable:
    """Images per domain, counting only the given class folders (the 10-class subsets)."""

    def count(root: Path) -> dict[str, int]:
        return {d: sum(_count_images(root / folder / d / c) for c in classes) for d in domains}

    return count


def _domainnet_splits(root: Path) -> dict[str, int]:
    """DomainNet-345: lines ``clipart/aircraft_carrier/x.jpg 0`` of ``splits/<domain>_{train,test}.txt``."""
    base = root / "domainnet"
    counts = {"train": 0, "test": 0}
    listed = []
    for domain in DOMAINNET_DOMAINS:
        for split in counts:
            lines = [ln for ln in (base / "splits" / f"{domain}_{split}.txt").read_text().splitlines() if ln.strip()]
            counts[split] += len(lines)
            listed += [ln.split()[0] for ln in lines]
    _check_listed(listed, base, "the split files")
    return counts


# file -> md5, as torchvision's CIFAR classes check them (cifar.py): the loader refuses a file that fails
CIFAR_FILES: dict[str, dict[str, str]] = {
    "cifar-10-batches-py": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar-100-python": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}


def _cifar(folder: str) -> Callable[[Path], dict[str, int]]:
    """CIFAR's python pickles: each file's md5 (the sizes are fixed by the format: 10,000 images per batch)."""

    def count(root: Path) -> dict[str, int]:
        from torchvision.datasets.utils import check_integrity

        bad = [f for f, md5 in CIFAR_FILES[folder].items() if not check_integrity(str(root / folder / f), md5)]
        if bad:
            raise _Incomplete(f"{_some([f'{folder}/{f}' for f in bad])} fail their md5 check (damaged)")
        return {"train": 50000, "test": 10000}

    return count


FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _fashion_source(root: Path) -> tuple[Path, str] | None:
    """Where the loader finds Fashion-MNIST under ``root``: the four .gz files, or torchvision's raw/ folder."""
    names = [f for pair in FASHION_FILES.values() for f in pair]
    if all((root / "FashionMNIST" / "raw" / f).is_file() for f in names):
        return root / "FashionMNIST" / "raw", ""
    if all((root / f"{f}.gz").is_file() for f in names):
        return root, ".gz"
    return None


def _idx_count(path: Path) -> int:
    """The item count in an IDX file's header (bytes 4..8, big-endian), read without the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError) as exc:
        raise _Incomplete(f"{path.name} cannot be read ({first_line(exc)})") from None
    if len(head) < 8:
        raise _Incomplete(f"{path.name} is truncated")
    return int.from_bytes(head[4:8], "big")


def _fashion(root: Path) -> dict[str, int]:
    found = _fashion_source(root)
    if found is None:
        raise _Incomplete("needs all four *-idx?-ubyte.gz files, or FashionMNIST/raw/ with the four unpacked")
    folder, suffix = found
    counts = {}
    for split, (images, labels) in FASHION_FILES.items():
        n_images, n_labels = _idx_count(folder / f"{images}{suffix}"), _idx_count(folder / f"{labels}{suffix}")
        if n_images != n_labels:
            raise _Incomplete(f"{images}{suffix} holds {n_images} images but {labels}{suffix} {n_labels} labels")
        counts[split] = n_images
    return counts


# --------------------------------------------------------------------------------------------------- the table
def _gdrive(file_id: str) -> str:
    return f"https://drive.google.com/file/d/{file_id}/view"


def _split_note(split_file: str, file_id: str) -> str:
    return f"CoOp's split file {split_file}, only on Google Drive (no checksum published): {_gdrive(file_id)}"


_CLASSNAMES_NOTE = "CoOp's classnames.txt (CLIP's ImageNet class names), Google Drive: " + _gdrive(
    "1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"
)
_COPY_CLASSNAMES = (
    "a copy of imagenet/classnames.txt, as CoOp asks (prepare copies it when imagenet/classnames.txt is there; "
    "the loaders also fall back to that file)"
)
_OX = "https://www.robots.ox.ac.uk/~vgg/data"


def _coop(
    name: str,
    folder: str,
    image_dir: str,
    split_file: str,
    file_id: str,
    archives: tuple[Archive, ...] = (),
    extra: tuple[str, ...] = (),
    manual: dict[str, str] | None = None,
) -> Recipe:
    images = (f"{folder}/{image_dir}",) if image_dir else ()
    return Recipe(
        name=name,
        folders=(folder,),
        required=images + tuple(f"{folder}/{p}" for p in extra) + (f"{folder}/{split_file}",),
        counter=_coop_split(folder, image_dir, split_file),
        archives=archives,
        manual={**(manual or {}), f"{folder}/{split_file}": _split_note(split_file, file_id)},
    )


# the loaders' own domain and class lists (one source for both)
_DOMAINNET_10 = DOMAIN_DATASETS["domainnet"][2]
_OFFICE_CALTECH_DOMAINS, _OFFICE_CALTECH_CLASSES = DOMAIN_DATASETS["office-caltech10"][1:]
OFFICE31_DOMAINS = ("amazon", "dslr", "webcam")
_AIRCRAFT_FILES = tuple(f"images_variant_{s}.txt" for s in ("train", "val", "test"))


def _recipes() -> dict[str, Recipe]:
    """Every dataset check knows, in the order it lists them."""
    table = [
        Recipe(
            "imagenet",
            ("imagenet",),
            ("imagenet/images/train", "imagenet/images/val", "imagenet/classnames.txt"),
            _imagenet,
            manual={
                "imagenet/images/train": "the 1000 nXXXXXXXX folders of ILSVRC2012_img_train.tar (image-net.org, "
                "md5 1d675b47d978889d74fa0da5fadfb00e); torchvision.datasets.ImageNet(D, split='train'), with the tar "
                "and the devkit in D, unpacks them into D/train/: move or link that folder here",
                "imagenet/images/val": "ILSVRC2012_img_val.tar (md5 29b22e2961454d5413ddabcf34fc5622) sorted into the "
                "1000 nXXXXXXXX folders; torchvision.datasets.ImageNet(D, split='val') sorts it into D/val/ with the "
                "devkit (ILSVRC2012_devkit_t12.tar.gz, md5 fa75699e90414af021442c21a62c3abf)",
                "imagenet/classnames.txt": _CLASSNAMES_NOTE,
            },
        ),
        _coop(
            "caltech101",
            "caltech-101",
            "101_ObjectCategories",
            "split_zhou_Caltech101.json",
            "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN",
            archives=(
                Archive(
                    "caltech-101.zip",
                    "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                    moves=(("caltech-101/101_ObjectCategories", "caltech-101/101_ObjectCategories"),),
                    provides=("caltech-101/101_ObjectCategories",),
                    inner=("caltech-101/101_ObjectCategories.tar.gz",),
                ),
            ),
        ),
        _coop(
            "oxfordpets",
            "oxford_pets",
            "images",
            "split_zhou_OxfordPets.json",
            "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs",
            archives=(
                Archive(
                    "images.tar.gz",
                    f"{_OX}/pets/data/images.tar.gz",
                    moves=(("images", "oxford_pets/images"),),
                    provides=("oxford_pets/images",),
                ),
                Archive(
                    "annotations.tar.gz",
                    f"{_OX}/pets/data/annotations.tar.gz",
                    moves=(("annotations", "oxford_pets/annotations"),),
                    provides=("oxford_pets/annotations",),
                ),
            ),
        ),
        _coop(
            "stanfordcars",
            "stanford_cars",
            "",
            "split_zhou_StanfordCars.json",
            "1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT",
            extra=("cars_train", "cars_test"),
            manual={
                "stanford_cars/cars_train": "the folder of cars_train.tgz (Stanford's URL is offline and torchvision "
                "no longer downloads it; use a mirror of the original archive)",
                "stanford_cars/cars_test": "the folder of cars_test.tgz (same source as cars_train.tgz)",
            },
        ),
        _coop(
            "flowers102",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT",
            archives=(
                Archive(
                    "102flowers.tgz",
                    f"{_OX}/flowers/102/102flowers.tgz",
                    moves=(("jpg", "oxford_flowers/jpg"),),
                    provides=("oxford_flowers/jpg",),
                ),
                Archive(
                    "imagelabels.mat",
                    f"{_OX}/flowers/102/imagelabels.mat",
                    moves=(("imagelabels.mat", "oxford_flowers/imagelabels.mat"),),
                    provides=("oxford_flowers/imagelabels.mat",),
                    extract=False,
                ),
                Archive(
                    "setid.mat",
                    f"{_OX}/flowers/102/setid.mat",
                    moves=(("setid.mat", "oxford_flowers/setid.mat"),),
                    provides=("oxford_flowers/setid.mat",),
                    extract=False,
                ),
            ),
        ),
        _coop(
            "food101",
            "food-101",
            "images",
            "split_zhou_Food101.json",
            "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl",
            archives=(
                Archive(
                    "food-101.tar.gz",
                    "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                    moves=(("food-101", "food-101"),),
                    provides=("food-101/images", "food-101/meta"),
                ),
            ),
        ),
        Recipe(
            "fgvcaircraft",
            ("fgvc_aircraft",),
            ("fgvc_aircraft/images", "fgvc_aircraft/variants.txt")
            + tuple(f"fgvc_aircraft/{f}" for f in _AIRCRAFT_FILES),
            _aircraft,
            archives=(
                Archive(
                    "fgvc-aircraft-2013b.tar.gz",
                    f"{_OX}/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
                    moves=(("fgvc-aircraft-2013b/data", "fgvc_aircraft"),),
                    provides=("fgvc_aircraft/images", "fgvc_aircraft/variants.txt")
                    + tuple(f"fgvc_aircraft/{f}" for f in _AIRCRAFT_FILES),
                ),
            ),
        ),
        _coop(
            "sun397",
            "sun397",
            "SUN397",
            "split_zhou_SUN397.json",
            "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq",
            archives=(
                Archive(
                    "SUN397.tar.gz",
                    "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                    moves=(("SUN397", "sun397/SUN397"),),
                    provides=("sun397/SUN397",),
                ),
            ),
        ),
        _coop(
            "dtd",
            "dtd",
            "images",
            "split_zhou_DescribableTextures.json",
            "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x",
            archives=(
                Archive(
                    "dtd-r1.0.1.tar.gz",
                    f"{_OX}/dtd/download/dtd-r1.0.1.tar.gz",
                    moves=(("dtd", "dtd"),),
                    provides=("dtd/images",),
                ),
            ),
        ),
        _coop(
            "eurosat",
            "eurosat",
            "2750",
            "split_zhou_EuroSAT.json",
            "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o",
            archives=(
                Archive(
                    "EuroSAT.zip",
                    "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                    "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                    moves=(("2750", "eurosat/2750"),),
                    provides=("eurosat/2750",),
                ),
            ),
        ),
        _coop(
            "ucf101",
            "ucf101",
            "UCF-101-midframes",
            "split_zhou_UCF101.json",
            "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y",
            manual={
                "ucf101/UCF-101-midframes": "the folder of CoOp's UCF-101-midframes.zip (the middle frame of each "
                f"video), Google Drive only: {_gdrive('10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O')}",
            },
        ),
        Recipe(
            "imagenet-v2",
            ("imagenetv2",),
            ("imagenetv2/imagenetv2-matched-frequency-format-val",),
            _variant("imagenetv2", "imagenetv2-matched-frequency-format-val"),
            manual={
                "imagenetv2/imagenetv2-matched-frequency-format-val": "the folders 0..999 of "
                "https://s3-us-west-2.amazonaws.com/imagenetv2public/imagenetv2-matched-frequency.tar.gz",
                "imagenetv2/classnames.txt": _COPY_CLASSNAMES,
            },
        ),
        Recipe(
            "imagenet-sketch",
            ("imagenet-sketch",),
            ("imagenet-sketch/images",),
            _variant("imagenet-sketch", "images"),
            manual={
                "imagenet-sketch/images": "the 1000 nXXXXXXXX folders of ImageNet-Sketch "
                "(https://github.com/HaohanWang/ImageNet-Sketch)",
                "imagenet-sketch/classnames.txt": _COPY_CLASSNAMES,
            },
        ),
        Recipe(
            "imagenet-a",
            ("imagenet-adversarial",),
            ("imagenet-adversarial/imagenet-a",),
            _variant("imagenet-adversarial", "imagenet-a"),
            manual={
                "imagenet-adversarial/imagenet-a": "the imagenet-a/ folder (200 nXXXXXXXX folders) of imagenet-a.tar "
                "(https://github.com/hendrycks/natural-adv-examples)",
                "imagenet-adversarial/classnames.txt": _COPY_CLASSNAMES,
            },
        ),
        Recipe(
            "imagenet-r",
            ("imagenet-rendition",),
            ("imagenet-rendition/imagenet-r",),
            _variant("imagenet-rendition", "imagenet-r"),
            manual={
                "imagenet-rendition/imagenet-r": "the imagenet-r/ folder (200 nXXXXXXXX folders) of imagenet-r.tar "
                "(https://github.com/hendrycks/imagenet-r)",
                "imagenet-rendition/classnames.txt": _COPY_CLASSNAMES,
            },
        ),
        Recipe(
            "pacs",
            ("pacs",),
            tuple(f"pacs/images/{d}" for d in PACS_DOMAINS)
            + tuple(f"pacs/splits/{d}_{s}_kfold.txt" for d in PACS_DOMAINS for s in ("train", "crossval", "test")),
            _pacs,
            manual={
                "pacs/images": "Dassl's PACS (pacs.zip, Google Drive id 1m4X4fROCCXMO0lRLrr6Zz9Vb3974NWhE): "
                "images/<domain>/<class>/ and splits/",
                "pacs/splits": "the splits/ folder of Dassl's pacs.zip",
            },
        ),
        Recipe(
            "office-home",
            ("office_home_dg",),
            tuple(f"office_home_dg/{d}/{s}" for d in OFFICE_HOME_DOMAINS for s in ("train", "val")),
            _domain_totals("office_home_dg", OFFICE_HOME_DOMAINS),
            manual={
                "office_home_dg": "Dassl's Office-Home DG copy (office_home_dg.zip, Google Drive id "
                "1gkbf_KaxoBws-GWT3XIPZ7BnkqbAxIFa): office_home_dg/<domain>/{train,val}/<class>/",
            },
        ),
        Recipe(
            "office31",
            ("office31",),
            tuple(f"office31/{d}" for d in OFFICE31_DOMAINS),
            _domain_totals("office31", OFFICE31_DOMAINS),
            manual={
                "office31": "Office-31 (https://people.eecs.berkeley.edu/~jhoffman/domainadapt/) as "
                "office31/{amazon,dslr,webcam}/<class>/ (the class folders moved out of each images/)",
            },
        ),
        Recipe(
            "domainnet-345",
            ("domainnet",),
            tuple(f"domainnet/{d}" for d in DOMAINNET_DOMAINS)
            + tuple(f"domainnet/splits/{d}_{s}.txt" for d in DOMAINNET_DOMAINS for s in ("train", "test")),
            _domainnet_splits,
            manual={
                "domainnet": "DomainNet's six domain zips (http://ai.bu.edu/M3SDA/, the cleaned version) "
                "extracted as domainnet/<domain>/<class>/",
                "domainnet/splits": "the cleaned <domain>_{train,test}.txt split files (http://ai.bu.edu/M3SDA/)",
            },
        ),
        Recipe(
            "domainnet",
            ("domainnet",),
            tuple(f"domainnet/{d}/{c}" for d in DOMAINNET_DOMAINS for c in _DOMAINNET_10),
            _domain_classes("domainnet", DOMAINNET_DOMAINS, _DOMAINNET_10),
            manual={
                "domainnet": "DomainNet's domain zips (http://ai.bu.edu/M3SDA/) extracted as "
                "domainnet/<domain>/<class>/; this 10-class subset (FedBN's) needs only its 10 class folders",
            },
        ),
        Recipe(
            "office-caltech10",
            ("office_caltech_10",),
            tuple(f"office_caltech_10/{d}/{c}" for d in _OFFICE_CALTECH_DOMAINS for c in _OFFICE_CALTECH_CLASSES),
            _domain_classes("office_caltech_10", _OFFICE_CALTECH_DOMAINS, _OFFICE_CALTECH_CLASSES),
            manual={
                "office_caltech_10": "Office-Caltech10 as office_caltech_10/{amazon,caltech,dslr,webcam}/<class>/ "
                "(e.g. FedBN's copy)",
            },
        ),
        Recipe(
            "cifar10",
            ("cifar-10-batches-py",),
            tuple(f"cifar-10-batches-py/{f}" for f in CIFAR_FILES["cifar-10-batches-py"]),
            _cifar("cifar-10-batches-py"),
            archives=(
                Archive(
                    "cifar-10-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    moves=(("cifar-10-batches-py", "cifar-10-batches-py"),),
                    provides=tuple(f"cifar-10-batches-py/{f}" for f in CIFAR_FILES["cifar-10-batches-py"]),
                ),
            ),
        ),
        Recipe(
            "cifar100",
            ("cifar-100-python",),
            tuple(f"cifar-100-python/{f}" for f in CIFAR_FILES["cifar-100-python"]),
            _cifar("cifar-100-python"),
            archives=(
                Archive(
                    "cifar-100-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    moves=(("cifar-100-python", "cifar-100-python"),),
                    provides=tuple(f"cifar-100-python/{f}" for f in CIFAR_FILES["cifar-100-python"]),
                ),
            ),
        ),
        Recipe(
            "fashion-mnist",
            (),  # no folder of its own: decided by _fashion_status
            (),
            _fashion,
            archives=tuple(
                Archive(
                    f"{f}.gz",
                    f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}.gz",
                    moves=((f"{f}.gz", f"{f}.gz"),),
                    provides=(f"{f}.gz",),
                    extract=False,
                )
                for pair in FASHION_FILES.values()
                for f in pair
            ),
        ),
    ]
    return {layout.name: layout for layout in table}


RECIPES: dict[str, Recipe] = _recipes()


def dataset_names() -> list[str]:
    """The datasets prepare and check know, in listing order."""
    return list(RECIPES)


def _validate_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in RECIPES]
    if bad:
        raise UserError(f"dataset {bad[0]!r} is not one of: {', '.join(RECIPES)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------ check
@dataclass
class Status:
    """One dataset's state under a root: ``ready``, ``incomplete`` or ``absent``, with the detail for its line."""

    name: str
    state: str
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # required paths (relative to the root) that are not there

    def line(self) -> str:
        return f"{self.name + ':':<18}{self.state}{self.detail}"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def check_dataset(name: str, root: Path, expected: dict[str, int] | None = None) -> Status:
    """The state of one dataset under ``root`` (never raises for what it finds on disk)."""
    layout = RECIPES[name]
    want = EXPECTED_COUNTS.get(name, {}) if expected is None else expected
    try:
        if name == "fashion-mnist":
            if _fashion_source(root) is None:
                partial = [f for f in MD5 if f.endswith("ubyte.gz") and _exists(root / f)]
                if partial:
                    missing = [f for f in MD5 if f.endswith("ubyte.gz") and not _exists(root / f)]
                    return Status(name, "incomplete", f" (missing {_some(missing)})", missing=missing)
                note = ""
                if DEBIAN_FASHION_MNIST.is_dir():
                    note = f" (the loader uses the Debian package's copy in {DEBIAN_FASHION_MNIST} without --data-root)"
                return Status(name, "absent", note, missing=[f for f in MD5 if f.endswith("ubyte.gz")])
        elif not any(_exists(root / f) for f in layout.folders):
            return Status(name, "absent", missing=list(layout.required))
        missing = [p for p in layout.required if not _exists(root / p)]
        if missing:
            return Status(name, "incomplete", f" (missing {_some(missing)})", missing=missing)
        counts = layout.counter(root)
    except _Incomplete as exc:
        return Status(name, "incomplete", f" ({exc})", missing=exc.missing)
    except (OSError, UnicodeDecodeError) as exc:
        where = getattr(exc, "filename", None)
        what = f"{os.path.relpath(where, root)}: " if isinstance(where, str) else ""
        reason = os_reason(exc) if isinstance(exc, OSError) else "not text"
        return Status(name, "incomplete", f" (cannot read {what}{reason})")
    differ = [f"{k} {counts.get(k, 0)} (expected {v})" for k, v in want.items() if counts.get(k, 0) != v]
    if differ:
        return Status(name, "ready", f", but counts differ: {', '.join(differ)}", counts)
    return Status(name, "ready", f" ({_format_counts(counts)})", counts)


def _existing_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"root={str(root)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"root={str(root)!r} is a file, not a folder")
    try:
        next(os.scandir(path), None)
    except OSError as exc:
        raise UserError(f"root={str(root)!r} cannot be read ({os_reason(exc)})") from None
    return path


def check(
    root: str | os.PathLike, names: Iterable[str] | None = None, expected: dict[str, dict[str, int]] | None = None
) -> list[Status]:
    """The state of each named dataset (all when ``names`` is empty) under ``root``. ``expected`` overrides
    :data:`EXPECTED_COUNTS` per dataset (tests use small fixtures)."""
    chosen = _validate_names(names or [])
    path = _existing_root(root)
    overrides = expected or {}
    return [check_dataset(n, path, overrides.get(n)) for n in (chosen or list(RECIPES))]


# ---------------------------------------------------------------------------------------------------- prepare
def _say(message: str) -> None:
    """Progress goes to stdout: stderr is kept for the one line of an error."""
    print(message, flush=True)


def _obtain(archive: Archive, root: Path, downloader: Downloader, log: Log) -> tuple[Path, bool]:
    """The archive under ``ROOT/downloads/``, complete and verified: the one there, or a fresh download (then
    the flag is True)."""
    from torchvision.datasets.utils import calculate_md5, check_integrity

    md5 = MD5.get(archive.filename)
    dest = root / DOWNLOADS / archive.filename
    if _exists(dest):
        if not dest.is_file():
            raise UserError(f"archive {str(dest)!r} is not a file; move it away and run prepare again")
        if md5 is not None and not check_integrity(str(dest), md5):
            raise UserError(
                f"archive {str(dest)!r} has md5 {calculate_md5(str(dest))}, expected {md5} (damaged, or another "
                "file): it was left as it is and nothing was extracted; delete or replace it and run prepare again"
            )
        log(f"using {dest}" + ("" if md5 else " (no published checksum: not verified)"))
        return dest, False
    partial = dest.with_name(dest.name + ".partial")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)  # left by an interrupted download of ours: start over
    except OSError as exc:
        raise UserError(f"cannot write {str(partial)!r} ({os_reason(exc)})") from None
    log(f"downloading {archive.url} -> {dest}")
    try:
        downloader(archive.url, partial)
    except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, IncompleteRead, a library's own: all one line
        partial.unlink(missing_ok=True)
        raise RunFailed(
            f"could not download {archive.url} ({first_line(exc)}); nothing was placed: run prepare again to retry, "
            f"or put the file at {dest} yourself"
        ) from None
    if not partial.is_file():
        raise RunFailed(f"the download of {archive.url} wrote no file")
    if md5 is not None:
        got = calculate_md5(str(partial))
        if got != md5:
            partial.unlink(missing_ok=True)
            raise RunFailed(
                f"the download of {archive.url} has md5 {got}, expected {md5} (a damaged transfer or a changed file "
                "upstream); it was discarded: run prepare again to retry"
            )
    os.replace(partial, dest)  # only now does the archive carry its real name
    return dest, True


def _rename(src: Path, dest: Path) -> None:
    """Move ``src`` to the free path ``dest`` in one step; across file systems, copy beside ``dest`` then rename."""
    try:
        os.rename(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dest.with_name(f".{dest.name}.prepare-copy.tmp")  # ours: a copy an interrupted run left
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    elif _exists(tmp):
        tmp.unlink()
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, tmp, symlinks=True)
    else:
        shutil.copy2(src, tmp, follow_symlinks=False)
    os.rename(tmp, dest)


def _merge(src: Path, dest: Path) -> list[Path]:
    """Move ``src`` to ``dest`` without replacing anything: a free ``dest`` takes ``src`` whole; an existing folder
    takes the entries it lacks; anything else already there is kept. Returns the kept paths."""
    if not _exists(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        _rename(src, dest)
        return []
    if dest.is_dir() and src.is_dir() and not src.is_symlink():
        kept = []
        for child in sorted(src.iterdir()):
            kept += _merge(child, dest / child.name)
        return kept
    return [dest]


def _extract(archive: Archive, path: Path, tree: Path) -> None:
    """Unpack ``path`` (and its inner archives) into ``tree`` with torchvision's extractor."""
    import tarfile
    import zipfile
    import zlib

    from torchvision.datasets.utils import extract_archive

    tree.mkdir(parents=True)
    if not archive.extract:
        shutil.copyfile(path, tree / archive.filename)
        return
    current = path
    try:
        extract_archive(str(path), str(tree))
        for inner in archive.inner:
            current = tree / inner
            if not current.is_file():
                raise UserError(f"archive {str(path)!r} does not hold {inner} (another file?)")
            extract_archive(str(current), str(current.parent))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UserError(
            f"archive {str(current)!r} cannot be extracted ({first_line(exc)}): it is damaged; delete or replace it "
            "and run prepare again"
        ) from None


def _workdir(archive: Archive, root: Path) -> Path:
    """Our temporary folder for one archive: its extracted tree, and an ``extracted`` mark once that is whole."""
    return root / f".prepare-{archive.filename}.tmp"


def _place(archive: Archive, path: Path | None, root: Path, log: Log) -> None:
    """Extract ``archive`` into our temporary folder (or reuse a finished extraction there: then ``path`` may be
    None), then move its parts into place. Safe to interrupt anywhere: the next run redoes an unfinished
    extraction, or continues the moves."""
    work = _workdir(archive, root)
    tree, done = work / "tree", work / "extracted"
    path = path or root / DOWNLOADS / archive.filename
    try:
        if _exists(work) and not done.is_file():
            shutil.rmtree(work)  # an extraction of ours that did not finish
        if not done.is_file():
            log(f"extracting {path.name}")
            try:
                _extract(archive, path, tree)
            except Exception:
                shutil.rmtree(work, ignore_errors=True)  # half an extraction is of no use (Ctrl-C: the next run)
                raise
            done.touch()
        kept: list[Path] = []
        for src, dest in archive.moves:
            if _exists(tree / src):
                kept += _merge(tree / src, root / dest)
            elif not _exists(root / dest):
                raise UserError(f"archive {str(path)!r} does not hold {src} (another file?); nothing was placed")
        shutil.rmtree(work)
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        raise UserError(
            f"could not place the contents of {path.name} under {root}: {os_reason(exc)}{where}; what was placed is "
            "complete, and prepare continues from there when run again"
        ) from None
    if kept:
        log(f"kept {len(kept)} existing entries as they were (not replaced), e.g. {kept[0]}")
    log(f"placed {', '.join(dest for _, dest in archive.moves)}")


def _copy_classnames(layout: Recipe, root: Path, log: Log) -> None:
    """An ImageNet variant's classnames.txt is a copy of ImageNet's: make it when the variant's folder is there."""
    source = root / "imagenet" / "classnames.txt"
    for path, note in layout.manual.items():
        dest = root / path
        if note != _COPY_CLASSNAMES or _exists(dest) or not source.is_file() or not dest.parent.is_dir():
            continue
        tmp = dest.with_name(f".{dest.name}.prepare.tmp")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {str(dest)!r} ({os_reason(exc)})") from None
        log(f"copied {source} -> {dest}")


def _prepare_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser().absolute()
    if _exists(path) and not path.is_dir():
        raise UserError(f"root={str(root)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".prepare-probe-{os.getpid()}.tmp"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"root={str(root)!r} cannot be written ({os_reason(exc)})") from None
    return path


@dataclass
class Prepared:
    """What prepare did for one dataset, and what is left to do by hand (one line each)."""

    status: Status
    downloaded: list[str]
    by_hand: list[str]


def prepare_dataset(
    name: str,
    root: str | os.PathLike,
    downloader: Downloader | None = None,
    log: Log | None = None,
    expected: dict[str, int] | None = None,
) -> Prepared:
    """Download, verify, extract and arrange one dataset under ``root``; say what must be placed by hand.

    ``downloader(url, dest)`` fetches one file (default: :func:`fetch`, looked up when called, so patching the
    module's ``fetch`` reaches it). Raises :class:`UserError` for a damaged archive already on disk, and
    :class:`RunFailed` when a download fails.
    """
    (name,) = _validate_names([name])
    layout = RECIPES[name]
    path = _prepare_root(root)
    get = downloader if downloader is not None else fetch
    say = log or (lambda message: _say(f"{name}: {message}"))
    # an archive is needed while what it provides is missing, or while a run of ours left its work unfinished
    needed = [
        a for a in layout.archives if _exists(_workdir(a, path)) or not all(_exists(path / p) for p in a.provides)
    ]
    if layout.archives and not needed:
        say("already in place, nothing to download")
    # every archive is obtained and verified before anything is extracted: a bad one stops the run untouched. A
    # finished extraction of an interrupted run needs no archive: its moves are continued from our folder.
    obtained = [
        (a, (None, False) if (_workdir(a, path) / "extracted").is_file() else _obtain(a, path, get, say))
        for a in needed
    ]
    downloaded = [a.filename for a, (_, fetched) in obtained if fetched]
    for archive, (file, _) in obtained:
        _place(archive, file, path, say)
    _copy_classnames(layout, path, say)
    status = check_dataset(name, path, expected)
    return Prepared(status, downloaded, _by_hand(layout, path, status.missing))


def _by_hand(layout: Recipe, root: Path, missing: list[str]) -> list[str]:
    """One line per thing to place by hand: a missing path, or the folder of the manual entry that covers it."""
    lines: dict[str, str] = {}
    for rel in missing:
        key = next((k for k in layout.manual if rel == k or rel.startswith(k + "/")), None)
        note = layout.manual[key] if key else "see docs/datasets-prepare.md"
        lines.setdefault(key or rel, f"{layout.name}: by hand: {root / (key or rel)}  <- {note}")
    return list(lines.values())
