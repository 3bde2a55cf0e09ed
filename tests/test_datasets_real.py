"""The field's on-disk datasets: tiny fixtures written in each real layout (real folder and file names, split files
in their real JSON / text structure, 8x8 images), loaded through ``create_dataset``; one line for each missing or
damaged thing. The CIFAR / Fashion-MNIST tests and the first CoOp and domain tests are in test_real_data.py."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pfedmoap.base.errors import ConfigError
from pfedmoap.data import DatasetOptions, create_dataset, list_datasets
from pfedmoap.data.coop import COOP_DATASETS
from pfedmoap.data.domains import DOMAIN_DATASETS
from pfedmoap.data.images import ImageFiles
from pfedmoap.data.layouts import FOLDERS, LAYOUTS


@functools.cache
def _image_bytes(suffix: str) -> bytes:
    """One tiny real image per format (encoded once; the fixtures write thousands of copies)."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG" if suffix == ".png" else "JPEG")
    return buf.getvalue()


def _put(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(path.suffix.lower()))
    return path


def _load(name: str, root: Path, **kw):
    return create_dataset(name, DatasetOptions(root=str(root), **kw))


def _fails(name: str, root: Path, match: str, **kw) -> str:
    """The load fails with one ConfigError line matching ``match``."""
    with pytest.raises(ConfigError, match=match) as info:
        _load(name, root, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ------------------------------------------------------------------------------ CoOp's split_zhou JSON datasets
EUROSAT = [
    ("AnnualCrop", "Annual Crop Land"),
    ("Forest", "Forest"),
    ("HerbaceousVegetation", "Herbaceous Vegetation Land"),
    ("Highway", "Highway or Road"),
    ("Industrial", "Industrial Buildings"),
    ("Pasture", "Pasture Land"),
    ("PermanentCrop", "Permanent Crop Land"),
    ("Residential", "Residential Buildings"),
    ("River", "River"),
    ("SeaLake", "Sea or Lake"),
]
# the first classes of each dataset as CoOp names them: (folder / file stem, class name in the JSON)
REAL_CLASSES = {
    "flowers102": [("", "pink primrose"), ("", "hard-leaved pocket orchid"), ("", "canterbury bells")],
    "oxfordpets": [("Abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog")],
    "food101": [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava")],
    "caltech101": [("Faces", "face"), ("Leopards", "leopard"), ("Motorbikes", "motorbike"), ("accordion", "accordion")],
    "dtd": [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided")],
    "stanfordcars": [("", "2000 AM General Hummer SUV"), ("", "2012 Acura RL Sedan")],
    "sun397": [
        ("a/abbey", "abbey"),
        ("a/airplane_cabin", "airplane_cabin"),
        ("a/apartment_building/outdoor", "outdoor apartment_building"),
    ],
    "eurosat": EUROSAT,
    "ucf101": [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Apply_Lipstick", "Apply_Lipstick"), ("Archery", "Archery")],
}
_OFFSET = {"train": 0, "val": 4, "test": 7}
PER_SPLIT = {"train": 1, "val": 1, "test": 1}


def _coop_entry(name: str, c: int, key: str, k: int) -> tuple[str, str]:
    """(path relative to the image folder, class name) of image k of class c in split ``key``, named the way the
    dataset names its files."""
    real = REAL_CLASSES[name]
    folder, classname = real[c] if c < len(real) else ("", "")
    n = 10 * c + _OFFSET[key] + k + 1  # unique over the dataset
    if name == "flowers102":
        return f"image_{n:05d}.jpg", classname or f"flower_{c:03d}"
    if name == "oxfordpets":
        folder = folder or f"breed_{c:02d}"
        return f"{folder}_{n}.jpg", classname or folder
    if name == "stanfordcars":
        return f"cars_{'test' if key == 'test' else 'train'}/{n:05d}.jpg", classname or f"2012 Make {c} Sedan"
    if name == "sun397":
        folder = folder or f"s/scene_{c:03d}"
        return f"{folder}/sun_{n:08d}.jpg", classname or folder.split("/")[1]
    if name == "ucf101":
        folder = folder or f"Action_{c:03d}"
        return f"{folder}/v_{folder.replace('_', '')}_g{n:02d}_c01.jpg", classname or folder
    folder = folder or f"class_{c:03d}"
    return f"{folder}/{folder.split('/')[-1]}_{n:04d}.jpg", classname or folder


def _write_coop_real(root: Path, name: str) -> tuple[Path, list[str]]:
    """The dataset in CoOp's layout: images and split_zhou_*.json with train / val / test rows (the val rows'
    images are not written: the loader neither reads nor checks the val split)."""
    folder, image_dir, split_file, n_classes = COOP_DATASETS[name]
    images = root / folder / image_dir
    splits: dict[str, list] = {key: [] for key in PER_SPLIT}
    for c in range(n_classes):
        for key, n in PER_SPLIT.items():
            for k in range(n):
                rel, classname = _coop_entry(name, c, key, k)
                if key != "val":
                    _put(images / rel)
                splits[key].append([rel, c, classname])
    (root / folder / split_file).write_text(json.dumps(splits, indent=4))
    return images, [_coop_entry(name, c, "train", 0)[1] for c in range(n_classes)]


@pytest.mark.parametrize("name", list(COOP_DATASETS))
def test_coop_split_file_datasets_in_their_real_layout(tmp_path, name):
    images, names = _write_coop_real(tmp_path, name)
    bundle = _load(name, tmp_path)
    n = COOP_DATASETS[name][3]
    assert bundle.classnames == names and len(names) == n  # the JSON's label order and classname field
    assert bundle.classnames[: len(REAL_CLASSES[name])] == [c for _, c in REAL_CLASSES[name]]
    assert len(bundle.train) == n and len(bundle.test) == n  # val is not read
    assert bundle.train.labels.tolist() == bundle.test.labels.tolist() == list(range(n))
    assert bundle.train.domains is None and bundle.domain_names == []
    assert bundle.test.images.paths[0] == images / _coop_entry(name, 0, "test", 0)[0]
    img = bundle.test.images[n - 1]
    assert img.dtype == torch.uint8 and img.shape == (3, 224, 224)
    if name == "stanfordcars":  # the JSON's paths are relative to stanford_cars/ itself
        assert bundle.train.images.paths[0] == tmp_path / "stanford_cars" / "cars_train" / "00001.jpg"
        assert bundle.test.images.paths[0] == tmp_path / "stanford_cars" / "cars_test" / "00008.jpg"


@pytest.mark.parametrize("name", ["stanfordcars", "sun397", "eurosat", "ucf101"])
def test_coop_split_file_dataset_errors_are_one_line(tmp_path, name):
    folder, image_dir, split_file, n = COOP_DATASETS[name]
    _fails(name, tmp_path, rf"dataset={name}: not found under .*{split_file}.*DATASETS.md")
    with pytest.raises(ConfigError, match="needs --data-root DIR holding"):
        create_dataset(name, DatasetOptions())
    images, _ = _write_coop_real(tmp_path, name)
    split = tmp_path / folder / split_file
    good = json.loads(split.read_text())
    assert len(_load(name, tmp_path).train) == n

    split.write_text("{not json")
    _fails(name, tmp_path, r"is not a CoOp split file \(not JSON: line 1, column 2")
    split.write_text(json.dumps({"train": good["train"]}))
    _fails(name, tmp_path, r'is not a CoOp split file \(no "test" list; expected \{"train"')
    split.write_text(json.dumps({**good, "train": [[good["train"][0][0], "0", good["train"][0][2]]]}))
    _fails(name, tmp_path, r'"train" entry 0 is .*not \[path, label, classname\]')
    shifted = {**good, "test": [[p, lab + 1, c] for p, lab, c in good["test"]]}
    split.write_text(json.dumps(shifted))
    _fails(name, tmp_path, "names label 1 both|are not 0..C-1")
    split.write_text(json.dumps({key: [r for r in rows if r[1] != n - 1] for key, rows in good.items()}))
    _fails(name, tmp_path, f"has {n - 1} classes, expected {n}")

    split.write_text(json.dumps(good))
    (images / good["test"][-1][0]).unlink()
    msg = _fails(name, tmp_path, f"image listed in {split_file} is missing: .*{good['test'][-1][0]}")
    assert str(images / good["test"][-1][0]) in msg


# ------------------------------------------------------------------------------------------------ FGVC-Aircraft
AIRCRAFT = ["707-320", "727-200", "737-200", "Cessna 172", "F-16A/B"] + [f"Variant-{i:02d}" for i in range(95)]


def _write_aircraft(root: Path) -> Path:
    """fgvc_aircraft/ = the tarball's data/ folder: images/<id>.jpg, variants.txt, images_variant_*.txt."""
    base = root / "fgvc_aircraft"
    _write_lines(base / "variants.txt", AIRCRAFT)
    for key, per in (("train", 2), ("val", 1), ("test", 1)):
        lines = []
        for c, variant in enumerate(AIRCRAFT):
            for k in range(per):
                image_id = f"{1000000 + 10 * c + _OFFSET[key] + k}"
                _put(base / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}")
        _write_lines(base / f"images_variant_{key}.txt", lines[::-1])  # any order: labels come from variants.txt
    return base


def test_fgvc_aircraft_labels_follow_variants_txt(tmp_path):
    base = _write_aircraft(tmp_path)
    bundle = _load("fgvcaircraft", tmp_path)
    assert bundle.classnames == AIRCRAFT  # variants.txt's line order and names ("Cessna 172", "F-16A/B")
    assert len(bundle.train) == 200 and len(bundle.test) == 100  # CoOp's train; val is not read
    assert bundle.train.images.paths[-1] == base / "images" / "1000000.jpg" and bundle.train.labels[-1] == 0
    cessna = bundle.test.images.paths.index(base / "images" / f"{1000000 + 30 + 7}.jpg")
    assert bundle.test.labels[cessna] == AIRCRAFT.index("Cessna 172") == 3
    assert bundle.test.images[cessna].shape == (3, 224, 224)


def test_fgvc_aircraft_errors_are_one_line(tmp_path):
    _fails("fgvcaircraft", tmp_path, r"dataset=fgvcaircraft: not found under .*missing .*fgvc_aircraft/images")
    base = _write_aircraft(tmp_path)
    (base / "images_variant_test.txt").unlink()
    _fails("fgvcaircraft", tmp_path, r"not found .*missing .*images_variant_test\.txt")
    _write_lines(base / "images_variant_test.txt", ["1000007 707-320", "1000017 Boeing 999"])
    _fails("fgvcaircraft", tmp_path, r"images_variant_test\.txt line 2: variant 'Boeing 999' is not in variants\.txt")
    _write_lines(base / "images_variant_test.txt", ["1000007"])
    _fails("fgvcaircraft", tmp_path, r"line 1 is not 'IMAGE_ID VARIANT'")
    _write_lines(base / "images_variant_test.txt", ["1000007 707-320", "9999999 707-320"])
    _fails("fgvcaircraft", tmp_path, r"image listed in images_variant_test\.txt is missing: .*9999999\.jpg")
    _write_lines(base / "variants.txt", AIRCRAFT[:-1])
    _fails("fgvcaircraft", tmp_path, "variants.txt has 99 variants, expected 100")


# ------------------------------------------------------------------------------------- ImageNet and its variants
def _imagenet_classes() -> list[tuple[str, str]]:
    """1000 (wnid, name) lines: three real ones, then made-up wnids in descending order, so that line order and
    sorted-wnid order differ (labels must follow the lines; ImageNet-A/R's the sorted folders)."""
    made_up = [(f"n{90000000 + i:08d}", f"object number {i}") for i in reversed(range(997))]
    return [("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"), *made_up]


CLASSES = _imagenet_classes()
WNIDS = [w for w, _ in CLASSES]
A_WNIDS, R_WNIDS = WNIDS[::5], WNIDS[1::5]  # 200 each


def _classnames_txt(path: Path, suffix: str = "") -> None:
    _write_lines(path, [f"{w} {n}{suffix}" for w, n in CLASSES])


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """ImageNet (1000 classes: 2 train images for class 0, 1 elsewhere; 1 val each) and the four variants."""
    root = tmp_path_factory.mktemp("imagenet")
    _classnames_txt(root / "imagenet" / "classnames.txt")
    for i, wnid in enumerate(WNIDS):
        for k in range(2 if i == 0 else 1):
            _put(root / "imagenet" / "images" / "train" / wnid / f"{wnid}_{10026 + k}.JPEG")
        _put(root / "imagenet" / "images" / "val" / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        _put(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i) / f"{i:040x}.jpeg")
        _put(root / "imagenet-sketch" / "images" / wnid / f"sketch_{i}.JPEG")
    _classnames_txt(root / "imagenetv2" / "classnames.txt", suffix=" (v2 copy)")  # its own copy wins
    _classnames_txt(root / "imagenet-adversarial" / "classnames.txt", suffix=" (A copy)")
    for wnid in reversed(A_WNIDS):
        _put(root / "imagenet-adversarial" / "imagenet-a" / wnid / f"0.000116_{wnid}_0.865662.jpg")
    (root / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("ImageNet-A\n")
    for wnid in R_WNIDS:  # no classnames.txt copy: imagenet/classnames.txt is read
        for k in range(2):
            _put(root / "imagenet-rendition" / "imagenet-r" / wnid / f"art_{k}.jpg")
    return root


def test_imagenet_labels_follow_classnames_txt(imagenet_root):
    bundle = _load("imagenet", imagenet_root)
    assert bundle.classnames == [n for _, n in CLASSES]  # line order, CLIP's names with spaces
    assert len(bundle.train) == 1001 and len(bundle.test) == 1000
    assert bundle.train.labels[:3].tolist() == [0, 0, 1] and bundle.test.labels[-1] == 999
    assert (
        bundle.test.images.paths[3] == imagenet_root / "imagenet/images/val" / WNIDS[3] / "ILSVRC2012_val_00000004.JPEG"
    )
    assert bundle.train.images[0].shape == (3, 224, 224)


def test_imagenet_v2_and_sketch_are_evaluation_only(imagenet_root):
    v2 = _load("imagenet-v2", imagenet_root)
    assert isinstance(v2.train.images, ImageFiles) and len(v2.train) == 0 and v2.train.labels.dtype == np.int64
    assert v2.classnames[:2] == ["tench (v2 copy)", "goldfish (v2 copy)"]  # its own classnames.txt
    assert len(v2.test) == 1000 and v2.test.labels.tolist() == list(range(1000))  # folder i is class i
    assert v2.test.images.paths[10].parent.name == "10"
    sketch = _load("imagenet-sketch", imagenet_root)
    assert sketch.classnames == [n for _, n in CLASSES]  # no copy in imagenet-sketch/: imagenet's
    assert len(sketch.train) == 0 and len(sketch.test) == 1000
    assert sketch.test.images.paths[5].parent.name == WNIDS[5] and sketch.test.labels[5] == 5


@pytest.mark.parametrize(
    ("name", "wnids", "suffix", "per_class"), [("imagenet-a", A_WNIDS, " (A copy)", 1), ("imagenet-r", R_WNIDS, "", 2)]
)
def test_imagenet_a_and_r_label_their_200_sorted_folders(imagenet_root, name, wnids, suffix, per_class):
    bundle = _load(name, imagenet_root)
    names = dict(CLASSES)
    assert bundle.num_classes == 200 and len(bundle.train) == 0 and len(bundle.test) == 200 * per_class
    assert bundle.classnames == [names[w] + suffix for w in sorted(wnids)]  # README.txt is not a class
    assert bundle.classnames[0] == ("tench" if name == "imagenet-a" else "goldfish") + suffix  # real wnids sort first
    first = sorted(wnids)[0]
    assert bundle.test.images.paths[0].parent.name == first and bundle.test.labels[-1] == 199


def test_imagenet_errors_are_one_line(tmp_path):
    _fails("imagenet", tmp_path, r"dataset=imagenet: not found under .*missing .*imagenet/classnames\.txt")
    base = tmp_path / "imagenet"
    (base / "images" / "train").mkdir(parents=True)
    (base / "images" / "val").mkdir(parents=True)
    _write_lines(base / "classnames.txt", ["n01440764 tench", "n01443537"])
    _fails("imagenet", tmp_path, r"classnames\.txt line 2 is not 'WNID class name'")
    _write_lines(base / "classnames.txt", [f"{w} {n}" for w, n in CLASSES[:999]])
    _fails("imagenet", tmp_path, "lists 999 classes, expected 1000")
    _write_lines(base / "classnames.txt", [f"{w} {n}" for w, n in [CLASSES[0], *CLASSES[:999]]])
    _fails("imagenet", tmp_path, "lists n01440764 twice")
    _classnames_txt(base / "classnames.txt")
    _fails("imagenet", tmp_path, r"class folder .*images/train/n01440764 is missing")
    (base / "images" / "train" / "n01440764").mkdir()
    _fails("imagenet", tmp_path, r"no images \(.*\) in .*images/train/n01440764")


def test_imagenet_variant_errors_are_one_line(tmp_path):
    _fails("imagenet-v2", tmp_path, r"not found .*imagenetv2-matched-frequency-format-val")
    (tmp_path / "imagenet-sketch" / "images").mkdir(parents=True)
    _fails("imagenet-sketch", tmp_path, r"missing .*imagenet-sketch/classnames\.txt \(and .*imagenet/classnames\.txt\)")
    _classnames_txt(tmp_path / "imagenet" / "classnames.txt")
    image_dir = tmp_path / "imagenet-adversarial" / "imagenet-a"
    for wnid in A_WNIDS[:199]:
        _put(image_dir / wnid / "x.jpg")
    _fails("imagenet-a", tmp_path, r"imagenet-a holds 199 class folders, expected 200")
    _put(image_dir / "n99999999" / "x.jpg")
    _fails("imagenet-a", tmp_path, r"folder .*n99999999 is not a wnid listed in classnames\.txt")


# ---------------------------------------------------------------------------------------------------------- PACS
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
PACS_FILE = {
    "art_painting": "pic_{n:03d}.jpg",
    "cartoon": "pic_{n:03d}.jpg",
    "photo": "{n:03d}_0001.jpg",
    "sketch": "n0000{n:04d}.png",
}


@pytest.fixture(scope="module")
def pacs_root(tmp_path_factory) -> Path:
    """pacs/images/<domain>/<class>/ and pacs/splits/<domain>_{train,crossval,test}_kfold.txt, 1-based labels;
    per (domain, class): 2 train, 1 crossval, 1 test. The sketch train list names the known broken image, which
    is not on disk."""
    root = tmp_path_factory.mktemp("pacs")
    for domain in PACS_DOMAINS:
        for kind, per in (("train", 2), ("crossval", 1), ("test", 1)):
            lines = ["sketch/dog/n02103406_4068-1.png 1"] if (domain, kind) == ("sketch", "train") else []
            for c, cls in enumerate(PACS_CLASSES):
                for k in range(per):
                    rel = f"{domain}/{cls}/" + PACS_FILE[domain].format(n=10 * c + _OFFSET.get(kind, 4) + k)
                    _put(root / "pacs" / "images" / rel)
                    lines.append(f"{rel} {c + 1}")
            _write_lines(root / "pacs" / "splits" / f"{domain}_{kind}_kfold.txt", lines)
    return root


def test_pacs_kfold_split_files(pacs_root):
    bundle = _load("pacs", pacs_root)
    assert bundle.classnames == PACS_CLASSES and bundle.domain_names == PACS_DOMAINS
    assert len(bundle.train) == 4 * 7 * 3 and len(bundle.test) == 4 * 7  # train = train + crossval
    assert (
        np.bincount(bundle.train.domains).tolist() == [21] * 4 and np.bincount(bundle.test.labels).tolist() == [4] * 7
    )
    assert not any("n02103406_4068-1" in p.name for p in bundle.train.images.paths)  # the known broken file
    i = bundle.test.images.paths.index(pacs_root / "pacs/images/photo/house" / "057_0001.jpg")
    assert bundle.test.labels[i] == 5 and bundle.test.domains[i] == 2
    assert bundle.train.images[-1].shape == (3, 224, 224)  # a PNG sketch


def test_pacs_domain_subset_and_order(pacs_root):
    bundle = _load("pacs", pacs_root, domains=["sketch", "photo"])
    assert bundle.domain_names == ["sketch", "photo"] and bundle.classnames == PACS_CLASSES
    assert len(bundle.train) == 2 * 21 and set(bundle.test.domains.tolist()) == {0, 1}
    assert all(
        p.parts[-3] == "sketch" for p, d in zip(bundle.test.images.paths, bundle.test.domains, strict=True) if d == 0
    )
    _fails(
        "pacs", pacs_root, r"unknown domain 'art'.*valid domains: art_painting, cartoon, photo, sketch", domains=["art"]
    )
    _fails("pacs", pacs_root, "empty or repeated", domains=["photo", "photo"])


def test_pacs_errors_are_one_line(tmp_path):
    _fails("pacs", tmp_path, r"dataset=pacs: not found under .*missing .*pacs/images")
    (tmp_path / "pacs" / "images" / "photo").mkdir(parents=True)
    (tmp_path / "pacs" / "splits").mkdir()
    _fails("pacs", tmp_path, r"not found .*missing .*photo_train_kfold\.txt", domains=["photo"])
    splits = tmp_path / "pacs" / "splits"
    _put(tmp_path / "pacs" / "images" / "photo" / "dog" / "001_0001.jpg")
    _write_lines(splits / "photo_train_kfold.txt", ["photo/dog/001_0001.jpg 1"])
    _write_lines(splits / "photo_crossval_kfold.txt", [])
    _fails("pacs", tmp_path, r"split file .*photo_crossval_kfold\.txt is empty", domains=["photo"])
    for kind in ("crossval", "test"):
        _write_lines(splits / f"photo_{kind}_kfold.txt", ["photo/dog/001_0001.jpg 1"])
    _write_lines(splits / "photo_train_kfold.txt", ["photo/dog/001_0001.jpg 0"])
    _fails(
        "pacs",
        tmp_path,
        r"photo_train_kfold\.txt line 1: label 0 is not in 1..7 \(PACS labels are 1-based\)",
        domains=["photo"],
    )
    _write_lines(splits / "photo_train_kfold.txt", ["photo/dog/001_0001.jpg"])
    _fails("pacs", tmp_path, r"line 1 is not 'relative/path.jpg LABEL'", domains=["photo"])
    _write_lines(splits / "photo_train_kfold.txt", ["photo/dog/001_0001.jpg 1", "photo/dog/002_0001.jpg 1"])
    _fails(
        "pacs",
        tmp_path,
        r"image listed in .*photo_train_kfold\.txt is missing: .*photo/dog/002_0001\.jpg",
        domains=["photo"],
    )
    _write_lines(splits / "photo_train_kfold.txt", ["photo/dog/001_0001.jpg 1"])
    _fails("pacs", tmp_path, "label 2 appears in no split file of domains photo", domains=["photo"])


# --------------------------------------------------------------------------------------------------- Office-Home
OFFICE_HOME = sorted(
    "alarm_clock backpack batteries bed bike bottle bucket calculator calendar candles chair clipboards computer "
    "couch curtains desk_lamp drill eraser exit_sign fan file_cabinet flipflops flowers folder fork glasses hammer "
    "helmet kettle keyboard knives lamp_shade laptop marker monitor mop mouse mug notebook oven pan paper_clip pen "
    "pencil postit_notes printer push_pin radio refrigerator ruler scissors screwdriver shelf sink sneakers soda "
    "speaker spoon tv table telephone toothbrush toys trash_can webcam".split()
)
OFFICE_HOME_DOMAINS = ["art", "clipart", "product", "real_world"]


def _title(name: str) -> str:
    return "_".join(p.capitalize() for p in name.split("_")) if name != "tv" else "TV"


@pytest.fixture(scope="module")
def office_home_root(tmp_path_factory) -> Path:
    """office_home_dg/<domain>/{train,val}/<class>/: 2 train and 1 val image per class; real_world's class folders
    in the original dataset's Title_Case (TV sorts before Table there, after it lower-cased)."""
    root = tmp_path_factory.mktemp("officehome")
    for domain in OFFICE_HOME_DOMAINS:
        for split, per in (("train", 2), ("val", 1)):
            for c, cls in enumerate(OFFICE_HOME):
                folder = _title(cls) if domain == "real_world" else cls
                for k in range(per):
                    _put(root / "office_home_dg" / domain / split / folder / f"{00000 + 10 * c + k:05d}.jpg")
    return root


def test_office_home_dg_layout(office_home_root):
    assert len(OFFICE_HOME) == 65
    bundle = _load("office-home", office_home_root)
    assert bundle.classnames == OFFICE_HOME and bundle.domain_names == OFFICE_HOME_DOMAINS
    assert bundle.classnames.index("tv") == bundle.classnames.index("trash_can") + 1  # sorted lower-case
    assert len(bundle.train) == 4 * 65 * 2 and len(bundle.test) == 4 * 65  # test = val
    tv = [
        p for p, lab in zip(bundle.test.images.paths, bundle.test.labels, strict=True) if lab == OFFICE_HOME.index("tv")
    ]
    assert [p.parent.name for p in tv] == ["tv", "tv", "tv", "TV"]
    sub = _load("office-home", office_home_root, domains=["real_world"])
    assert sub.domain_names == ["real_world"] and set(sub.train.domains.tolist()) == {0} and len(sub.test) == 65


def test_office_home_errors_are_one_line(tmp_path):
    _fails("office-home", tmp_path, r"dataset=office-home: not found under .*missing .*office_home_dg/art/train")
    for domain, split in (
        ("art", "train"),
        ("art", "val"),
        ("clipart", "train"),
        ("clipart", "val"),
        ("product", "train"),
    ):
        for cls in OFFICE_HOME[: 64 if (domain, split) in {("clipart", "val"), ("product", "train")} else 65]:
            _put(tmp_path / "office_home_dg" / domain / split / cls / "00001.jpg")
    _fails(
        "office-home",
        tmp_path,
        r"clipart/val and .*art/train hold different classes \(e\.g\. 'webcam'\)",
        domains=["art", "clipart"],
    )
    _fails("office-home", tmp_path, r"product/train holds 64 class folders, expected 65", domains=["product"])
    _fails(
        "office-home",
        tmp_path,
        r"not found under .*missing .*office_home_dg/real_world/train",
        domains=["art", "real_world"],
    )


# --------------------------------------------------------------- domain folders with our own split (Office-31 &c.)
def _write_domain_folders(root: Path, name: str, per_class: int = 5) -> None:
    folder, domains, classes = DOMAIN_DATASETS[name]
    for domain in domains:
        for cls in classes:
            for k in range(per_class):
                _put(root / folder / domain / cls / f"frame_{k:04d}.jpg")


def test_office31_own_seeded_split(tmp_path):
    _write_domain_folders(tmp_path, "office31")
    bundle = _load("office31", tmp_path)
    assert bundle.num_classes == 31 and bundle.classnames == sorted(bundle.classnames)
    assert bundle.classnames[:3] == ["back_pack", "bike", "bike_helmet"] and bundle.classnames[-1] == "trash_can"
    assert bundle.domain_names == ["amazon", "dslr", "webcam"]
    assert len(bundle.test) == 3 * 31 and len(bundle.train) == 3 * 31 * 4  # round(0.2 * 5) = 1 test image
    assert not set(bundle.train.images.paths) & set(bundle.test.images.paths)
    other = _load("office31", tmp_path, seed=3)
    assert other.test.images.paths != bundle.test.images.paths and len(other.test) == len(bundle.test)
    _fails("office31", tmp_path, r"unknown domain 'caltech'.*valid domains: amazon, dslr, webcam", domains=["caltech"])


@pytest.mark.parametrize("name", ["office31", "domainnet", "office-caltech10"])
def test_domain_subset_is_the_same_images_as_in_the_full_load(tmp_path, name):
    """--domains: the chosen domains in the order given, ids = positions; a domain's split does not depend on
    which other domains are loaded (a cross-domain target read alone is the same test set)."""
    _write_domain_folders(tmp_path, name)
    full = _load(name, tmp_path)
    chosen = [full.domain_names[-1], full.domain_names[0]]
    sub = _load(name, tmp_path, domains=chosen)
    assert sub.domain_names == chosen and sub.classnames == full.classnames
    for d, domain in enumerate(chosen):
        f = full.domain_names.index(domain)
        for split in ("train", "test"):
            a, b = getattr(full, split), getattr(sub, split)
            assert [p for p, x in zip(a.images.paths, a.domains, strict=True) if x == f] == [
                p for p, x in zip(b.images.paths, b.domains, strict=True) if x == d
            ]
    missing = tmp_path / DOMAIN_DATASETS[name][0] / chosen[1]
    for p in sorted(missing.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    missing.rmdir()
    _fails(name, tmp_path, rf"dataset={name}: not found under .*missing {missing}\)$", domains=chosen)
    assert len(_load(name, tmp_path, domains=[chosen[0]]).domain_names) == 1  # the others are not needed


def test_domain_folder_missing_class_and_empty_class_are_one_line(tmp_path):
    _write_domain_folders(tmp_path, "office31", per_class=2)
    cls = tmp_path / "office31" / "dslr" / "mug"
    for p in cls.iterdir():
        p.unlink()
    _fails("office31", tmp_path, r"no images \(\.jpg, .*\) in .*dslr/mug")
    cls.rmdir()
    _fails("office31", tmp_path, r"class folder .*dslr/mug is missing")


# ----------------------------------------------------------------------------------------- DomainNet, 345 classes
DN_DOMAINS = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]
DN_CLASSES = ["aircraft_carrier", "airplane", "alarm_clock", "ambulance", "angel"] + [
    "t-shirt" if i == 327 else f"object_{i:03d}" for i in range(5, 345)
]


@pytest.fixture(scope="module")
def domainnet_root(tmp_path_factory) -> Path:
    """domainnet/<domain>/<class>/ and splits/<domain>_{train,test}.txt (``clipart/aircraft_carrier/x.jpg 0``).
    Clipart and painting list one image per class in each split, and painting_train.txt lacks t-shirt (327) as the
    real one does; the other domains list the first 3 classes only (fewer files: the loader names classes from
    the union of the split files it reads)."""
    root = tmp_path_factory.mktemp("domainnet")
    for domain in DN_DOMAINS:
        for key in ("train", "test"):
            lines = []
            for c, cls in enumerate(DN_CLASSES if domain in ("clipart", "painting") else DN_CLASSES[:3]):
                if (domain, key, cls) == ("painting", "train", "t-shirt"):
                    continue
                rel = f"{domain}/{cls}/{domain}_{c:03d}_{_OFFSET[key]:06d}.jpg"
                _put(root / "domainnet" / rel)
                lines.append(f"{rel} {c}")
            _write_lines(root / "domainnet" / "splits" / f"{domain}_{key}.txt", lines)
    return root


def test_domainnet_345_split_files(domainnet_root):
    bundle = _load("domainnet-345", domainnet_root)
    assert bundle.classnames == DN_CLASSES and bundle.domain_names == DN_DOMAINS
    assert len(bundle.train) == 345 + 344 + 4 * 3 and len(bundle.test) == 2 * 345 + 4 * 3
    assert np.bincount(bundle.test.domains).tolist() == [345, 3, 345, 3, 3, 3]
    assert bundle.train.images.paths[0] == domainnet_root / "domainnet/clipart/aircraft_carrier/clipart_000_000000.jpg"
    assert bundle.test.labels[:345].tolist() == list(range(345))
    painting = _load("domainnet-345", domainnet_root, domains=["painting"])
    assert painting.classnames[327] == "t-shirt"  # named from painting_test.txt
    assert painting.domain_names == ["painting"] and len(painting.train) == 344
    assert set(painting.test.domains.tolist()) == {0}
    _fails("domainnet-345", domainnet_root, "label 3 appears in no split file of domains sketch", domains=["sketch"])
    pair = _load("domainnet-345", domainnet_root, domains=["painting", "clipart"])
    assert pair.test.images.paths[0].parts[-3] == "painting" and pair.test.domains[345] == 1


def test_domainnet_345_errors_are_one_line(tmp_path):
    _fails("domainnet-345", tmp_path, r"dataset=domainnet-345: not found under .*missing .*domainnet/splits")
    base = tmp_path / "domainnet"
    (base / "splits").mkdir(parents=True)
    (base / "clipart").mkdir()
    _fails("domainnet-345", tmp_path, r"not found .*missing .*clipart_train\.txt", domains=["clipart"])
    _put(base / "clipart" / "airplane" / "clipart_001_000001.jpg")
    _write_lines(base / "splits" / "clipart_test.txt", ["clipart/airplane/clipart_001_000001.jpg 1"])
    _write_lines(base / "splits" / "clipart_train.txt", ["clipart/airplane/clipart_001_000001.jpg 345"])
    _fails("domainnet-345", tmp_path, r"clipart_train\.txt line 1: label 345 is not in 0..344", domains=["clipart"])
    _write_lines(base / "splits" / "clipart_train.txt", ["clipart_001_000001.jpg 1"])
    _fails(
        "domainnet-345", tmp_path, r"line 1: 'clipart_001_000001.jpg' is not 'domain/class/file'", domains=["clipart"]
    )
    _write_lines(
        base / "splits" / "clipart_train.txt",
        ["clipart/airplane/clipart_001_000001.jpg 1", "clipart/angel/clipart_004_000001.jpg 1"],
    )
    _fails("domainnet-345", tmp_path, r"line 2 names label 1 'angel', elsewhere 'airplane'", domains=["clipart"])
    _write_lines(base / "splits" / "clipart_train.txt", ["clipart/airplane/clipart_001_000002.jpg 1"])
    _fails(
        "domainnet-345",
        tmp_path,
        r"image listed in .*clipart_train\.txt is missing: .*clipart_001_000002\.jpg",
        domains=["clipart"],
    )
    _write_lines(base / "splits" / "clipart_train.txt", ["clipart/airplane/clipart_001_000001.jpg 1"])
    _fails("domainnet-345", tmp_path, "label 0 appears in no split file of domains clipart", domains=["clipart"])
    (base / "splits" / "clipart_train.txt").write_bytes(b"\xff\xfe\x00binary")
    _fails("domainnet-345", tmp_path, r"split file .*clipart_train\.txt is not UTF-8 text", domains=["clipart"])


# --------------------------------------------------------------------------------------------------------- layouts
ON_DISK = sorted(set(list_datasets()) - {"synthetic", "synthetic-colours", "synthetic-shapes"})


def test_every_on_disk_dataset_has_its_layout():
    assert sorted(LAYOUTS) == sorted(FOLDERS) == ON_DISK
    for name, layout in LAYOUTS.items():
        assert "\n" not in layout and layout.startswith(FOLDERS[name] + "/"), name
    for name, (folder, *_) in {**COOP_DATASETS, **DOMAIN_DATASETS}.items():
        assert FOLDERS[name] == folder


@pytest.mark.parametrize("name", [n for n in ON_DISK if n not in ("cifar10", "cifar100", "fashion-mnist")])
def test_an_empty_root_says_where_the_files_go(tmp_path, name):
    msg = _fails(name, tmp_path, f"^dataset={name}: not found under {tmp_path} ")
    assert LAYOUTS[name] in msg
    with pytest.raises(ConfigError, match=f"^dataset={name} needs --data-root DIR holding"):
        create_dataset(name, DatasetOptions())
