"""``python -m pfedmoap.data prepare / check``: downloads through a fake server of tiny archives with the real inner
folder names, the CoOp layout they are arranged into, and everything that must not happen to a user's files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from pfedmoap.base.errors import RunFailed, UserError
from pfedmoap.data import __main__ as cli
from pfedmoap.data import prepare as prep

REAL_FETCH = prep.fetch  # the fixture below replaces the module's fetch with a fake server

# ------------------------------------------------------------------------------------------- fixture archives
# archive -> {member path: bytes}; "*.tar.gz" members that are themselves archives are built first (Caltech101)
_JPG = b"\xff\xd8\xff\xe0 not decoded by prepare or check"
ARCHIVE_MEMBERS: dict[str, dict[str, bytes]] = {
    "102flowers.tgz": {f"jpg/image_{i:05d}.jpg": _JPG for i in range(1, 5)},
    "imagelabels.mat": {},  # plain files: their bytes are below
    "setid.mat": {},
    "images.tar.gz": {"images/Abyssinian_1.jpg": _JPG, "images/beagle_1.jpg": _JPG},
    "annotations.tar.gz": {"annotations/list.txt": b"Abyssinian_1 1 1 1\n"},
    "food-101.tar.gz": {
        "food-101/images/apple_pie/1.jpg": _JPG,
        "food-101/images/apple_pie/2.jpg": _JPG,
        "food-101/meta/classes.txt": b"apple_pie\n",
        "food-101/README.txt": b"readme",
    },
    "caltech-101.zip": {"caltech-101/Annotations.tar": b"not needed", "caltech-101/show_annotation.m": b"%"},
    "dtd-r1.0.1.tar.gz": {
        "dtd/images/banded/banded_0001.jpg": _JPG,
        "dtd/images/banded/banded_0002.jpg": _JPG,
        "dtd/images/woven/woven_0001.jpg": _JPG,
        "dtd/labels/train1.txt": b"banded/banded_0001.jpg\n",
        "dtd/imdb/imdb.mat": b"mat",
    },
    "SUN397.tar.gz": {"SUN397/a/abbey/sun_a.jpg": _JPG, "SUN397/ClassName.txt": b"/a/abbey\n"},
    "EuroSAT.zip": {"2750/AnnualCrop/AnnualCrop_1.jpg": _JPG, "2750/Forest/Forest_1.jpg": _JPG},
    "fgvc-aircraft-2013b.tar.gz": {
        "fgvc-aircraft-2013b/README.md": b"readme",
        "fgvc-aircraft-2013b/data/images/0000001.jpg": _JPG,
        "fgvc-aircraft-2013b/data/images/0000002.jpg": _JPG,
        "fgvc-aircraft-2013b/data/images/0000003.jpg": _JPG,
        "fgvc-aircraft-2013b/data/variants.txt": b"707-320\nA300B4\n",
        "fgvc-aircraft-2013b/data/images_variant_train.txt": b"0000001 707-320\n0000002 A300B4\n",
        "fgvc-aircraft-2013b/data/images_variant_val.txt": b"0000003 A300B4\n",
        "fgvc-aircraft-2013b/data/images_variant_test.txt": b"0000001 707-320\n",
    },
}
_CALTECH_INNER = {
    "101_ObjectCategories/accordion/image_0001.jpg": _JPG,
    "101_ObjectCategories/ant/image_0001.jpg": _JPG,
}

# dataset -> the files prepare must have put under the root (CoOp's layout)
PLACED = {
    "flowers102": ["oxford_flowers/jpg/image_00001.jpg", "oxford_flowers/imagelabels.mat", "oxford_flowers/setid.mat"],
    "oxfordpets": ["oxford_pets/images/Abyssinian_1.jpg", "oxford_pets/annotations/list.txt"],
    "food101": ["food-101/images/apple_pie/1.jpg", "food-101/meta/classes.txt"],
    "caltech101": ["caltech-101/101_ObjectCategories/accordion/image_0001.jpg"],
    "dtd": ["dtd/images/banded/banded_0001.jpg", "dtd/labels/train1.txt", "dtd/imdb/imdb.mat"],
    "sun397": ["sun397/SUN397/a/abbey/sun_a.jpg"],
    "eurosat": ["eurosat/2750/AnnualCrop/AnnualCrop_1.jpg"],
    "fgvcaircraft": ["fgvc_aircraft/images/0000001.jpg", "fgvc_aircraft/images_variant_train.txt"],
}


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _archive_bytes(filename: str) -> bytes:
    members = dict(ARCHIVE_MEMBERS[filename])
    if filename == "caltech-101.zip":
        members["caltech-101/101_ObjectCategories.tar.gz"] = _tar(_CALTECH_INNER)
    if filename.endswith(".mat"):
        return b"MATLAB 5.0 " + filename.encode()
    return _zip(members) if filename.endswith(".zip") else _tar(members)


class FakeServer:
    """Serves the fixture archives by URL basename; counts what was fetched."""

    def __init__(self, folder: Path):
        self.folder, self.calls = folder, []
        folder.mkdir()
        for name in ARCHIVE_MEMBERS:
            (folder / name).write_bytes(_archive_bytes(name))

    def md5(self, name: str) -> str:
        return hashlib.md5((self.folder / name).read_bytes()).hexdigest()

    def __call__(self, url: str, dest: Path) -> None:
        self.calls.append(url.rsplit("/", 1)[-1])
        shutil.copyfile(self.folder / url.rsplit("/", 1)[-1], dest)


@pytest.fixture
def server(tmp_path, monkeypatch) -> FakeServer:
    """The fake downloader, installed as the module's ``fetch`` (so the CLI uses it too); the md5 table is set to
    the fixtures' md5s (Aircraft keeps None: no published checksum)."""
    srv = FakeServer(tmp_path / "server")
    for name in ARCHIVE_MEMBERS:
        if prep.MD5[name] is not None:
            monkeypatch.setitem(prep.MD5, name, srv.md5(name))
    monkeypatch.setattr(prep, "fetch", srv)
    return srv


def _leftovers(root: Path) -> list[str]:
    """Temporary files of ours that must not survive a finished run."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith((".partial", ".tmp")) or ".prepare-" in p.name
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _coop_split(root: Path, folder: str, image_dir: str, split_file: str, parts: dict[str, list[str]]) -> None:
    """A CoOp split file over the given image paths (relative to the image folder), label = class folder order."""
    classes = sorted({p.split("/")[0] for rows in parts.values() for p in rows})
    doc = {k: [[p, classes.index(p.split("/")[0]), p.split("/")[0]] for p in rows] for k, rows in parts.items()}
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / split_file).write_text(json.dumps(doc))
    for rows in parts.values():
        for p in rows:
            (root / folder / image_dir / p).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / image_dir / p).write_bytes(_JPG)


def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


# ------------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("name", sorted(PLACED))
def test_prepare_arranges_the_coop_layout(name, server, tmp_path):
    """Each downloadable dataset: fetched, verified, extracted and moved into the folders the loaders read; the
    archives stay in downloads/; no temporary file is left; what is still missing is one line each."""
    root = tmp_path / "data"
    done = prep.prepare_dataset(name, root, log=lambda m: None)
    for rel in PLACED[name]:
        assert (root / rel).is_file(), rel
    archives = [a.filename for a in prep.RECIPES[name].archives]
    assert sorted(server.calls) == sorted(archives) == sorted(done.downloaded)
    assert all((root / "downloads" / a).is_file() for a in archives)
    assert _leftovers(root) == []
    if name == "fgvcaircraft":  # no split file to place by hand: ready, counted from the official split lists
        assert done.status.state == "ready" and done.by_hand == []
        assert done.status.counts == {"train": 2, "val": 1, "test": 1}
    else:  # only CoOp's split file is left, named with where it goes and where it comes from
        assert done.status.state == "incomplete"
        (line,) = done.by_hand
        split = next(p for p in prep.RECIPES[name].manual if p.endswith(".json"))
        assert str(root / split) in line and "drive.google.com" in line


def test_prepare_twice_downloads_nothing_and_changes_nothing(server, tmp_path, capsys):
    root = tmp_path / "data"
    assert _run(capsys, "prepare", "dtd", "--root", str(root))[0] == 0
    before = _snapshot(root)
    inode = (root / "dtd" / "images").stat().st_ino
    rc, out, err = _run(capsys, "prepare", "dtd", "--root", str(root))
    assert rc == 0 and server.calls == ["dtd-r1.0.1.tar.gz"]  # the first run's download only
    assert err == [] and out[0] == "dtd: already in place, nothing to download"
    assert _snapshot(root) == before and (root / "dtd" / "images").stat().st_ino == inode
    assert out[1] == "dtd:              incomplete (missing dtd/split_zhou_DescribableTextures.json)"


def test_an_archive_already_there_is_used_not_downloaded(server, tmp_path):
    root = tmp_path / "data"
    (root / "downloads").mkdir(parents=True)
    shutil.copyfile(server.folder / "EuroSAT.zip", root / "downloads" / "EuroSAT.zip")
    prep.prepare_dataset("eurosat", root, log=lambda m: None)
    assert server.calls == [] and (root / "eurosat" / "2750" / "Forest" / "Forest_1.jpg").is_file()


def test_an_archive_with_the_wrong_md5_is_refused_in_one_line_and_nothing_is_lost(server, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "downloads").mkdir(parents=True)
    bad = root / "downloads" / "102flowers.tgz"
    bad.write_bytes(b"half of an archive")
    (root / "oxford_flowers").mkdir()
    (root / "oxford_flowers" / "imagelabels.mat").write_bytes(b"the user's own copy")  # already extracted
    (root / "oxford_flowers" / "split_zhou_OxfordFlowers.json").write_text("{}")
    before = _snapshot(root)
    rc, out, err = _run(capsys, "prepare", "flowers102", "--root", str(root))
    assert rc == 2 and out == [] and len(err) == 1
    got = hashlib.md5(b"half of an archive").hexdigest()
    assert str(bad) in err[0] and got in err[0] and prep.MD5["102flowers.tgz"] in err[0]
    assert err[0].startswith("pfedmoap.data: error: ")
    assert _snapshot(root) == before and server.calls == []  # not deleted, nothing extracted, nothing fetched
    assert _leftovers(root) == []


def test_an_interrupted_download_is_started_over(server, tmp_path, capsys):
    """A stale .partial is ours and is replaced; a download that fails midway leaves no archive under its real
    name (exit 1, one line), and the next run completes."""
    root = tmp_path / "data"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "SUN397.tar.gz.partial").write_bytes(b"the first 3 bytes of 37 GB")

    def dies_midway(url: str, dest: Path) -> None:
        dest.write_bytes(b"some bytes")
        raise ConnectionResetError("Connection reset by peer")

    with pytest.raises(RunFailed, match="could not download .*SUN397.tar.gz .*Connection reset"):
        prep.prepare_dataset("sun397", root, downloader=dies_midway, log=lambda m: None)
    assert list((root / "downloads").iterdir()) == [] and not (root / "sun397").exists()

    (root / "downloads" / "SUN397.tar.gz.partial").write_bytes(b"stale")
    rc, out, err = _run(capsys, "prepare", "sun397", "--root", str(root))
    assert rc == 0 and server.calls == ["SUN397.tar.gz"]
    assert (root / "sun397" / "SUN397" / "a" / "abbey" / "sun_a.jpg").is_file()
    assert hashlib.md5((root / "downloads" / "SUN397.tar.gz").read_bytes()).hexdigest() == prep.MD5["SUN397.tar.gz"]
    assert _leftovers(root) == []


def test_the_default_fetch_downloads_over_http(server, tmp_path):
    """The module's own ``fetch`` (torchvision's download_url) against a server on this machine: nothing leaves it."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(server.folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    dest = tmp_path / "EuroSAT.zip.partial"
    try:
        REAL_FETCH(f"http://127.0.0.1:{httpd.server_address[1]}/EuroSAT.zip", dest)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert dest.read_bytes() == (server.folder / "EuroSAT.zip").read_bytes()


def test_a_download_with_the_wrong_md5_is_discarded(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prep.MD5, "EuroSAT.zip", "0" * 32)  # the server now sends "another file"
    root = tmp_path / "data"
    rc, out, err = _run(capsys, "prepare", "eurosat", "--root", str(root))
    assert rc == 1 and len(err) == 1 and "expected " + "0" * 32 in err[0] and "discarded" in err[0]
    assert list((root / "downloads").iterdir()) == [] and not (root / "eurosat").exists()


def test_a_half_finished_extraction_is_redone(server, tmp_path):
    """Our temporary folder without its 'extracted' mark is an extraction that was cut short: it is redone."""
    root = tmp_path / "data"
    work = root / ".prepare-102flowers.tgz.tmp" / "tree" / "jpg"
    work.mkdir(parents=True)
    (work / "image_00001.jpg").write_bytes(b"truncated")
    prep.prepare_dataset("flowers102", root, log=lambda m: None)
    assert (root / "oxford_flowers" / "jpg" / "image_00001.jpg").read_bytes() == _JPG
    assert len(list((root / "oxford_flowers" / "jpg").iterdir())) == 4
    assert _leftovers(root) == []


def test_moves_cut_short_are_continued_and_user_files_kept(server, tmp_path, monkeypatch):
    """Killed between two renames: the next run reuses the finished extraction (no download, no extraction) and
    places the rest; the user's own split file in the same folder is never touched."""
    root = tmp_path / "data"
    _coop_split(
        root,
        "dtd",
        "images",
        "split_zhou_DescribableTextures.json",
        {"train": ["banded/banded_0001.jpg"], "val": ["banded/banded_0002.jpg"], "test": ["woven/woven_0001.jpg"]},
    )
    shutil.rmtree(root / "dtd" / "images")  # only the split file is there, as a user places it first
    mine = (root / "dtd" / "split_zhou_DescribableTextures.json").read_bytes()
    real_rename, calls = prep._rename, []

    def killed_on_second(src: Path, dest: Path) -> None:
        calls.append(dest.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dest)

    monkeypatch.setattr(prep, "_rename", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_dataset("dtd", root, log=lambda m: None)
    assert (root / "dtd" / "images").is_dir() and not (root / "dtd" / "labels").exists()
    assert (root / ".prepare-dtd-r1.0.1.tar.gz.tmp" / "extracted").is_file()
    (root / "downloads" / "dtd-r1.0.1.tar.gz").unlink()  # the user freed the space: the extraction is enough

    monkeypatch.setattr(prep, "_rename", real_rename)
    monkeypatch.setattr(prep, "_extract", lambda *a: pytest.fail("the finished extraction must be reused"))
    done = prep.prepare_dataset("dtd", root, log=lambda m: None, expected={"train": 1, "val": 1, "test": 1})
    assert server.calls == ["dtd-r1.0.1.tar.gz"]
    assert (root / "dtd" / "labels" / "train1.txt").is_file() and (root / "dtd" / "imdb" / "imdb.mat").is_file()
    assert (root / "dtd" / "split_zhou_DescribableTextures.json").read_bytes() == mine
    assert done.status.line() == "dtd:              ready (train 1, val 1, test 1)" and done.by_hand == []
    assert _leftovers(root) == []


def test_a_folder_already_there_is_merged_never_overwritten(server, tmp_path):
    root = tmp_path / "data"
    mine = root / "food-101" / "images" / "apple_pie" / "1.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"the user's own image")
    logged = []
    prep.prepare_dataset("food101", root, log=logged.append)
    assert mine.read_bytes() == b"the user's own image"  # kept as it was
    assert (root / "food-101" / "images" / "apple_pie" / "2.jpg").read_bytes() == _JPG  # what it lacked: added
    assert (root / "food-101" / "meta" / "classes.txt").is_file()
    assert any("kept 1 existing" in m for m in logged) and _leftovers(root) == []


def test_what_cannot_be_downloaded_is_named_one_line_each(server, tmp_path, capsys):
    root = tmp_path / "data"
    rc, out, err = _run(capsys, "prepare", "stanfordcars", "imagenet", "--root", str(root))
    assert rc == 0 and server.calls == []
    assert err == [] and out[0] == "stanfordcars:     absent" and out[4] == "imagenet:         absent"
    cars, imagenet = out[1:4], out[5:]
    assert [line.split("  <- ")[0] for line in cars] == [
        f"stanfordcars: by hand: {root / 'stanford_cars' / p}"
        for p in ("cars_train", "cars_test", "split_zhou_StanfordCars.json")
    ]
    assert [line.split("  <- ")[0].rsplit("/", 1)[-1] for line in imagenet] == ["train", "val", "classnames.txt"]


def test_an_imagenet_variant_gets_a_copy_of_the_class_names(tmp_path):
    root = tmp_path / "data"
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("".join(f"n{i:08d} class {i}\n" for i in range(1000)))
    images = root / "imagenet-adversarial" / "imagenet-a"
    for wnid in ("n00000001", "n00000002"):
        (images / wnid).mkdir(parents=True)
        (images / wnid / "a.jpg").write_bytes(_JPG)
    done = prep.prepare_dataset(
        "imagenet-a", root, downloader=pytest.fail, log=lambda m: None, expected={"test": 2, "classes": 2}
    )
    copied = root / "imagenet-adversarial" / "classnames.txt"
    assert copied.read_bytes() == (root / "imagenet" / "classnames.txt").read_bytes()
    assert done.status.state == "ready" and done.by_hand == []
    (root / "imagenet" / "classnames.txt").write_text("changed\n")  # a copy already there is never replaced
    prep.prepare_dataset("imagenet-a", root, downloader=pytest.fail, log=lambda m: None)
    assert copied.read_text().startswith("n00000000 class 0")


def test_an_imagenet_variant_without_any_class_names_says_so(tmp_path):
    """The loaders fall back to imagenet/classnames.txt; with neither file, the one line to do by hand names it."""
    root = tmp_path / "data"
    (root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "0").mkdir(parents=True)
    done = prep.prepare_dataset("imagenet-v2", root, downloader=pytest.fail, log=lambda m: None)
    assert done.status.line() == (
        "imagenet-v2:      incomplete (missing imagenetv2/classnames.txt (or imagenet/classnames.txt))"
    )
    (line,) = done.by_hand
    assert line.startswith(f"imagenet-v2: by hand: {root / 'imagenetv2' / 'classnames.txt'}  <- a copy of ")


def test_the_folders_are_the_ones_the_loaders_read():
    """Each dataset's folder here is the one pfedmoap.data.layouts gives the loaders (Fashion-MNIST aside: its
    files may sit in the root itself)."""
    layouts = pytest.importorskip("pfedmoap.data.layouts")
    assert set(prep.RECIPES) == set(layouts.FOLDERS)
    for name, layout in prep.RECIPES.items():
        if name != "fashion-mnist":
            assert layout.folders == (layouts.FOLDERS[name],), name


# --------------------------------------------------------------------------------------------------- check
def test_check_on_an_empty_root_says_absent_for_every_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prep, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")
    rc, out, err = _run(capsys, "check", "--root", str(tmp_path))
    assert rc == 0 and err == [] and len(out) == len(prep.RECIPES)
    assert [line.split(":")[0] for line in out] == list(prep.RECIPES)
    assert all(line.split(":", 1)[1].strip() == "absent" for line in out)


def test_check_on_a_half_built_root_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "oxford_flowers" / "jpg").mkdir(parents=True)
    (tmp_path / "pacs" / "images" / "photo").mkdir(parents=True)
    (tmp_path / "imagenet" / "images" / "train").mkdir(parents=True)
    rc, out, _ = _run(capsys, "check", "flowers102", "pacs", "imagenet", "--root", str(tmp_path))
    assert rc == 0
    assert out[0] == "flowers102:       incomplete (missing oxford_flowers/split_zhou_OxfordFlowers.json)"
    assert out[1].startswith("pacs:             incomplete (missing pacs/images/art_painting, pacs/images/cartoon, ")
    assert out[1].endswith(" and 12 more)")
    assert out[2] == "imagenet:         incomplete (missing imagenet/images/val, imagenet/classnames.txt)"


def test_check_counts_a_complete_fixture_and_reports_a_mismatch(tmp_path, capsys, monkeypatch):
    parts = {"train": ["a/1.jpg", "a/2.jpg", "b/1.jpg"], "val": ["a/3.jpg", "b/2.jpg"], "test": ["b/3.jpg"]}
    _coop_split(tmp_path, "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", parts)
    monkeypatch.setitem(prep.EXPECTED_COUNTS, "flowers102", {"train": 3, "val": 2, "test": 1})
    rc, out, _ = _run(capsys, "check", "--root", str(tmp_path), "flowers102")
    assert (rc, out) == (0, ["flowers102:       ready (train 3, val 2, test 1)"])
    monkeypatch.setitem(prep.EXPECTED_COUNTS, "flowers102", {"train": 4093, "val": 2, "test": 2463})
    rc, out, _ = _run(capsys, "check", "--root", str(tmp_path), "flowers102")
    assert (rc, out) == (
        0,
        ["flowers102:       ready, but counts differ: train 3 (expected 4093), test 1 (expected 2463)"],
    )


def test_check_finds_listed_images_missing_and_damaged_split_files(tmp_path):
    parts = {"train": ["a/1.jpg"], "val": ["a/2.jpg"], "test": ["a/3.jpg"]}
    _coop_split(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json", parts)
    (tmp_path / "dtd" / "images" / "a" / "2.jpg").unlink()
    (status,) = prep.check(tmp_path, ["dtd"])
    assert status.line() == (
        "dtd:              incomplete (1 images split_zhou_DescribableTextures.json lists are missing under images/, "
        "e.g. a/2.jpg)"
    )
    for damaged in ("", "[1, 2]", '{"train": 3, "val": [], "test": []}', "\x00\xff binary"):
        (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(damaged, errors="surrogateescape")
        (status,) = prep.check(tmp_path, ["dtd"])
        assert status.state == "incomplete" and "is not a CoOp split file" in status.detail, damaged


def test_check_domain_datasets_and_fashion_mnist(tmp_path):
    for domain, n in zip(prep.OFFICE31_DOMAINS, (2, 1, 3), strict=True):
        for i in range(n):
            (tmp_path / "office31" / domain / "mug").mkdir(parents=True, exist_ok=True)
            (tmp_path / "office31" / domain / "mug" / f"{i}.jpg").write_bytes(_JPG)
    (tmp_path / "office31" / "amazon" / "mug" / "notes.txt").write_text("not an image")
    want = {"amazon": 2, "dslr": 1, "webcam": 3, "total": 6}
    (status,) = prep.check(tmp_path, ["office31"], expected={"office31": want})
    assert status.line() == "office31:         ready (amazon 2, dslr 1, webcam 3, total 6)"

    for split, n in (("train", 5), ("t10k", 2)):
        for kind, magic in (("images-idx3", 2051), ("labels-idx1", 2049)):
            header = magic.to_bytes(4, "big") + n.to_bytes(4, "big")
            (tmp_path / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(header))
    (status,) = prep.check(tmp_path, ["fashion-mnist"], expected={"fashion-mnist": {"train": 5, "test": 2}})
    assert status.line() == "fashion-mnist:    ready (train 5, test 2)"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (status,) = prep.check(tmp_path, ["fashion-mnist"])
    assert status.line() == "fashion-mnist:    incomplete (missing t10k-labels-idx1-ubyte.gz)"


def test_check_reports_an_unreadable_file_instead_of_crashing(tmp_path):
    _coop_split(tmp_path, "eurosat", "2750", "split_zhou_EuroSAT.json", {"train": ["A/1.jpg"], "val": [], "test": []})
    split = tmp_path / "eurosat" / "split_zhou_EuroSAT.json"
    split.unlink()
    split.mkdir()  # a folder where the split file belongs
    (status,) = prep.check(tmp_path, ["eurosat"])
    assert status.line() == (
        "eurosat:          incomplete (cannot read eurosat/split_zhou_EuroSAT.json: it is a folder, not a file)"
    )


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--root", "{root}", "cifar11"], "dataset 'cifar11' is not one of: imagenet, caltech101, "),
        (["prepare", "flowers102", "nope", "--root", "{root}"], "dataset 'nope' is not one of: "),
        (["check", "--root", "{file}"], "root='{file}' is a file, not a folder"),
        (["prepare", "dtd", "--root", "{file}"], "root='{file}' is a file, not a folder"),
        (["check", "--root", "{root}/no/such/folder"], "root='{root}/no/such/folder' does not exist"),
        (["check"], "the following arguments are required: --root"),
        (["prepare", "--root", "{root}"], "the following arguments are required: NAME"),
        ([], "the following arguments are required: {prepare,check}"),
        (["download", "dtd"], "argument {prepare,check}: invalid choice: 'download'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(argv, message, tmp_path, capsys, server):
    (tmp_path / "a-file").write_text("x")
    fill = {"root": str(tmp_path), "file": str(tmp_path / "a-file")}
    argv = [a.replace("{root}", fill["root"]).replace("{file}", fill["file"]) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (OneLineParser: still one line and code 2)
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, err
    assert message.replace("{root}", fill["root"]).replace("{file}", fill["file"]) in err
    assert server.calls == []


def test_library_calls_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not one of"):
        prep.prepare_dataset("imagenet-xxl", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        prep.check(tmp_path / "missing")


def test_the_module_runs_as_a_command(tmp_path):
    """The real entry point (one interpreter start, the slow part of this file): a mistake is one line on stderr,
    with no warning or traceback around it, and exit code 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pfedmoap.data", "check", "--root", str(tmp_path), "dtd", "nope"]
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("pfedmoap.data: error: dataset 'nope' is not one of: imagenet, caltech101, ")
