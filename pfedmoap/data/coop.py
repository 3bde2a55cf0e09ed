"""CoOp's datasets in CoOp's on-disk layout (``DATASETS.md``): ten of the eleven (ImageNet is in ``imagenet.py``).

Nine read CoOp's ``split_zhou_*.json``: one object ``{"train": [...], "val": [...], "test": [...]}`` whose rows
are ``[path relative to the image folder, 0-based label, class name]``. The split file is the source of the
classes: label order is the split file's, names are its ``classname`` field as CoOp cleaned them (Caltech101's
renames and dropped classes, EuroSAT's descriptive names, SUN397's reordered names, UCF101's split CamelCase),
underscores kept (the prompt code turns ``_`` into a space). Train is the file's ``train`` list and test its
``test`` list; ``val`` is not read (the federated protocol has no validation split). FGVC-Aircraft has no JSON:
it reads the official ``images_variant_*.txt`` lists, as CoOp does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..base.errors import ConfigError
from ..base.files import first_line
from .images import check_listed, data_root, labeled, not_found, read_lines, require
from .registry import DatasetBundle, DatasetOptions, register_dataset

# name -> (folder under --data-root, image folder inside it ("" = the folder itself), split file, classes)
COOP_DATASETS: dict[str, tuple[str, str, str, int]] = {
    "flowers102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "oxfordpets": ("oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
    "food101": ("food-101", "images", "split_zhou_Food101.json", 101),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json", 47),
    "stanfordcars": ("stanford_cars", "", "split_zhou_StanfordCars.json", 196),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json", 397),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json", 10),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101),
}
SPLIT_SHAPE = '{"train": [[path, label, classname], ...], "val": [...], "test": [...]}'

Rows = list[tuple[str, int, str]]


def _read_split(name: str, path: Path) -> dict[str, Rows]:
    """The train and test rows of a CoOp split file; anything else in it is one line naming the file."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"dataset={name}: {path} is not a CoOp split file ({reason}; expected {SPLIT_SHAPE})")

    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"dataset={name}: split file {path} cannot be read ({first_line(exc)})") from None
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise bad("nested too deeply") from None
    if not isinstance(data, dict):
        raise bad(f"its top level is a JSON {type(data).__name__}, not an object")
    out: dict[str, Rows] = {}
    for key in ("train", "test"):
        rows = data.get(key)
        if not isinstance(rows, list):
            raise bad(f'no "{key}" list')
        for i, row in enumerate(rows):
            ok = isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[2], str)
            if not ok or type(row[1]) is not int:
                raise bad(f'"{key}" entry {i} is {json.dumps(row)[:80]}, not [path, label, classname]')
        out[key] = [(p, lab, c) for p, lab, c in rows]
    return out


def _coop(opts: DatasetOptions, name: str) -> DatasetBundle:
    folder, image_dir, split_file, n_classes = COOP_DATASETS[name]
    root = data_root(opts, name)
    base = root / folder
    for path in (base / split_file, base / image_dir):
        if not path.exists():
            raise ConfigError(
                f"{not_found(name, root, path)}; download the images and {split_file} as CoOp's DATASETS.md describes"
            )
    split_path = base / split_file
    splits = _read_split(name, split_path)
    names: dict[int, str] = {}
    for rows in splits.values():
        for _, label, classname in rows:
            if names.setdefault(label, classname) != classname:
                raise ConfigError(
                    f"dataset={name}: {split_path} names label {label} both {names[label]!r} and {classname!r}"
                )
    if sorted(names) != list(range(len(names))):
        found = f"{min(names)}..{max(names)}, {len(names)} distinct" if names else "none"
        raise ConfigError(f"dataset={name}: the labels in {split_path} are not 0..C-1 (found {found})")
    if len(names) != n_classes:
        raise ConfigError(f"dataset={name}: {split_path} has {len(names)} classes, expected {n_classes}")
    parts = {key: [base / image_dir / p for p, _, _ in rows] for key, rows in splits.items()}
    check_listed(name, parts["train"] + parts["test"], split_file)
    # class names in label order, as the split file gives them (underscores become spaces in prompts)
    return DatasetBundle(
        name=name,
        classnames=[names[i] for i in range(len(names))],
        train=labeled(parts["train"], [lab for _, lab, _ in splits["train"]]),
        test=labeled(parts["test"], [lab for _, lab, _ in splits["test"]]),
    )


@register_dataset("flowers102")
def flowers102(opts: DatasetOptions) -> DatasetBundle:
    """Oxford Flowers (102): labels are the official ids minus 1, names from ``cat_to_name.json`` (in the JSON);
    CoOp's 50/20/30 per-class split, not the official one."""
    return _coop(opts, "flowers102")


@register_dataset("oxfordpets")
def oxfordpets(opts: DatasetOptions) -> DatasetBundle:
    """Oxford-IIIT Pets (37): label order and lower-case breed names as in the JSON; test = the official test."""
    return _coop(opts, "oxfordpets")


@register_dataset("food101")
def food101(opts: DatasetOptions) -> DatasetBundle:
    """Food-101 (101): sorted folder names (``apple_pie``, ...) as the JSON labels them; CoOp's 50/20/30 split,
    so its test set is not the official one."""
    return _coop(opts, "food101")


@register_dataset("caltech101")
def caltech101(opts: DatasetOptions) -> DatasetBundle:
    """Caltech101 as CoOp uses it (100 classes: ``BACKGROUND_Google`` and ``Faces_easy`` dropped, ``airplanes`` ->
    ``airplane`` etc. renamed in the JSON); label order = the JSON's (sorted folders)."""
    return _coop(opts, "caltech101")


@register_dataset("dtd")
def dtd(opts: DatasetOptions) -> DatasetBundle:
    """Describable Textures (47): sorted folder names, the JSON's label order; CoOp's 50/20/30 split."""
    return _coop(opts, "dtd")


@register_dataset("stanfordcars")
def stanfordcars(opts: DatasetOptions) -> DatasetBundle:
    """Stanford Cars (196): the JSON's paths (``cars_train/00001.jpg``) are relative to ``stanford_cars/`` itself;
    label order = the meta file's class order, names with the year moved to the front ("2012 Tesla Model S Sedan")
    as the JSON gives them; test = the official test."""
    return _coop(opts, "stanfordcars")


@register_dataset("sun397")
def sun397(opts: DatasetOptions) -> DatasetBundle:
    """SUN397 (397): partition 01's test; label order = the JSON's, names as CoOp reordered them
    (``a/apartment_building/outdoor`` -> "outdoor apartment_building")."""
    return _coop(opts, "sun397")


@register_dataset("eurosat")
def eurosat(opts: DatasetOptions) -> DatasetBundle:
    """EuroSAT RGB (10): sorted folder order (the JSON's labels) with CoOp's descriptive names ("Annual Crop Land",
    "Sea or Lake", ...) already in the JSON; CoOp's 50/20/30 split."""
    return _coop(opts, "eurosat")


@register_dataset("ucf101")
def ucf101(opts: DatasetOptions) -> DatasetBundle:
    """UCF101 middle frames (101): the JSON's label order, CamelCase names split with ``_`` (``Apply_Eye_Makeup``);
    test = ``testlist01``."""
    return _coop(opts, "ucf101")


# ----------------------------------------------------------------------------------------------- FGVC-Aircraft
FGVC_CLASSES = 100


@register_dataset("fgvcaircraft")
def fgvcaircraft(opts: DatasetOptions) -> DatasetBundle:
    """FGVC-Aircraft (100 variants): label = line order of ``variants.txt`` (its names, e.g. "707-320", as class
    names); train = ``images_variant_train.txt`` (CoOp's train; CoOp's val is the official val, not read), test =
    ``images_variant_test.txt``. Each list line is ``IMAGE_ID VARIANT NAME`` for ``images/IMAGE_ID.jpg``."""
    name = "fgvcaircraft"
    root = data_root(opts, name)
    base = root / "fgvc_aircraft"
    lists = {key: base / f"images_variant_{key}.txt" for key in ("train", "test")}
    require(name, root, base / "images", base / "variants.txt", *lists.values())
    variants = [line for _, line in read_lines(name, base / "variants.txt", "class list")]
    if len(set(variants)) != len(variants):
        raise ConfigError(f"dataset={name}: {base / 'variants.txt'} lists a variant twice")
    if len(variants) != FGVC_CLASSES:
        raise ConfigError(f"dataset={name}: {base / 'variants.txt'} has {len(variants)} variants, expected 100")
    index = {v: i for i, v in enumerate(variants)}
    splits = {}
    for key, path in lists.items():
        paths, labels = [], []
        for number, line in read_lines(name, path, "split file"):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ConfigError(f"dataset={name}: {path} line {number} is not 'IMAGE_ID VARIANT' (got {line!r})")
            if parts[1] not in index:
                raise ConfigError(f"dataset={name}: {path} line {number}: variant {parts[1]!r} is not in variants.txt")
            paths.append(base / "images" / f"{parts[0]}.jpg")
            labels.append(index[parts[1]])
        check_listed(name, paths, path.name)
        splits[key] = labeled(paths, labels)
    return DatasetBundle(name=name, classnames=variants, train=splits["train"], test=splits["test"])
