"""Every file the library reads, damaged in each way a file gets damaged, through the real command line: one line
on stderr naming the file, exit code 2, and nothing already written changed. The files are real: random bytes, a
truncated copy of a good file, a text file, an empty file, a folder where the file should be, and files that parse
but are of another shape or version. Where a file is the library's own cache (the feature cache, a Flower node's
state), a damaged one is not an error: it is rebuilt or skipped with one log line, and that is tested too."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from pfedmoap.base import files
from pfedmoap.base.errors import UserError
from pfedmoap.train import main

SMALL = ["--pretrained", "none", "--rounds", "2", "--clients", "3", "--experts", "1", "--local-epochs", "1",
         "--train-per-class", "6", "--test-per-class", "2", "--shots", "4", "--d-gate", "16", "--no-progress",
         "--threads", "1"]  # fmt: skip
KINDS = ["random", "truncated", "text", "empty", "folder"]


def damage(path: Path, kind: str, good: bytes | None = None) -> None:
    """Replace ``path`` with a bad file of ``kind`` (``truncated``: the first half of ``good``, or of the file)."""
    good = path.read_bytes() if good is None and path.is_file() else good
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if kind == "folder":
        path.mkdir(parents=True)
        (path / "inside.txt").write_text("a folder where a file should be")
        return
    data = {
        "random": random.Random(str(path)).randbytes(4096),
        "truncated": (good or b"")[: len(good or b"") // 2],
        "text": b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
        "empty": b"",
    }[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder``: path -> bytes (None for a folder)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def one_line_exit_2(argv: list[str], capsys, *needles: str, command=main) -> str:
    assert command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real 2-round run directory (config.json, metrics.jsonl, summary.json, checkpoints/last.pt)."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert main([*SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def stopped_run(finished_run, tmp_path) -> Path:
    """A copy of the finished run without its summary: a run that --resume accepts."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "summary.json").unlink()
    return out


# ------------------------------------------------------------------------------------------ the readers themselves
@pytest.mark.parametrize("kind", KINDS)
def test_the_readers_say_what_is_wrong_in_one_line(tmp_path, kind):
    good_json = tmp_path / "good.json"
    good_json.write_text('{"a": 1}\n')
    path = tmp_path / "bad"
    damage(path, kind, good_json.read_bytes())
    for read in (files.read_json, files.read_jsonl, files.load_torch):
        if read is files.read_jsonl and kind == "empty":
            assert read(path, "a thing") == []  # an empty JSON-lines file holds no records: valid
            continue
        with pytest.raises(UserError, match=rf"^a thing '{path}' cannot be used: ") as info:
            read(path, "a thing")
        assert "\n" not in str(info.value)


def test_json_of_another_shape_and_a_torn_last_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a JSON array, not a JSON object"):
        files.read_json(path, "x")
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert files.read_jsonl(path, "x", torn_tail=True) == [{"round": 1}, {"round": 2}]
    with pytest.raises(UserError, match="line 3 is not JSON"):
        files.read_jsonl(path, "x")
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')  # a broken line in the middle is damage, not a kill
    with pytest.raises(UserError, match="line 2 is not JSON"):
        files.read_jsonl(path, "x", torn_tail=True)
    path.write_text("[" * 100_000)
    with pytest.raises(UserError, match="cannot be used"):
        files.read_json(path, "x")


# ------------------------------------------------------------------------------------------ --pretrained FILE
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("kind", ["random", "truncated", "text", "empty"])
def test_pretrained_weights_that_are_not_weights(tmp_path, capsys, kind, suffix):
    from pfedmoap.model.pretraining import shipped_path

    path = tmp_path / f"weights{suffix}"
    damage(path, kind, shipped_path().read_bytes())
    out = tmp_path / "out"
    one_line_exit_2([*SMALL, "--pretrained", str(path), "--out", str(out)], capsys, f"pretrained={str(path)!r}")
    assert not out.exists()


def test_pretrained_etc_passwd_and_weights_of_another_model(tmp_path, capsys):
    one_line_exit_2([*SMALL, "--pretrained", "/etc/passwd"], capsys, "cannot be loaded as pfedmoap-tiny weights")
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3, 3)}, other)
    one_line_exit_2([*SMALL, "--pretrained", str(other)], capsys, "cannot be loaded as pfedmoap-tiny weights")


# ------------------------------------------------------------------------------------------ the shipped weights
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_shipped_weights_are_a_damaged_install(tmp_path, capsys, monkeypatch, kind):
    """Not a fallback to minutes of pretraining (which would give this machine another model): one line."""
    from pfedmoap.model import pretraining as pt

    good = pt.shipped_path()
    monkeypatch.setattr(pt, "SHIPPED_DIR", tmp_path / "weights")
    monkeypatch.setattr(pt, "_verified", {})
    monkeypatch.setattr(pt, "installed_copy", lambda path: None)
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("must not pretrain over a damaged install"))
    damage(pt.shipped_path(), kind, good.read_bytes())
    argv = [a for a in SMALL if a != "none"]
    argv.remove("--pretrained")
    needle = "fail their SHA-256 check" if kind != "folder" else "it is a folder"
    one_line_exit_2([*argv, "--out", str(tmp_path / "out")], capsys, "shipped tiny-CLIP weights", needle)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ --resume RUN_DIR
@pytest.mark.parametrize("kind", [*KINDS, "format-1", "another-dict", "a-list", "other-shapes"])
def test_resume_with_a_damaged_checkpoint(stopped_run, capsys, kind, tmp_path):
    ckpt = stopped_run / "checkpoints" / "last.pt"
    if kind == "format-1":
        torch.save({**torch.load(ckpt, weights_only=True), "format": 1}, ckpt)
    elif kind == "another-dict":
        torch.save({"format": 2, "hello": torch.zeros(2)}, ckpt)
    elif kind == "a-list":
        torch.save([1, 2, 3], ckpt)
    elif kind == "other-shapes":  # another run's checkpoint: 3 clients too, but another prompt length
        other = tmp_path / "other"
        assert main([*SMALL, "--rounds", "1", "--n-ctx", "4", "--out", str(other)]) == 0
        capsys.readouterr()
        shutil.copy(other / "checkpoints" / "last.pt", ckpt)
    else:
        damage(ckpt, kind)
    before = snapshot(stopped_run)
    needle = {"format-1": "format 1", "a-list": "a list, not a checkpoint"}.get(kind, "cannot be used")
    one_line_exit_2(["--resume", str(stopped_run), "--no-progress"], capsys, "checkpoint", needle)
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize("kind", [*KINDS, "an-array", "no-meta", "bad-field"])
def test_resume_with_a_damaged_config_json(stopped_run, capsys, kind):
    path = stopped_run / "config.json"
    data = json.loads(path.read_text())
    if kind == "an-array":
        path.write_text("[1, 2, 3]")
    elif kind == "no-meta":
        path.write_text(json.dumps({k: v for k, v in data.items() if k != "_meta"}))
    elif kind == "bad-field":
        path.write_text(json.dumps({**data, "experts": "nine"}))
    else:
        damage(path, kind)
    before = snapshot(stopped_run)
    if kind == "folder":  # a folder named config.json: the folder holds no run
        one_line_exit_2(["--resume", str(stopped_run)], capsys, "holds no run")
    else:
        one_line_exit_2(["--resume", str(stopped_run)], capsys, "config")
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize("kind", [*KINDS, "another-run", "objects-without-rounds"])
def test_resume_with_a_damaged_metrics_jsonl(stopped_run, capsys, kind):
    path = stopped_run / "metrics.jsonl"
    if kind == "another-run":  # the same rounds with other accuracies
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "mean_acc": r["mean_acc"] + 1}) + "\n" for r in lines))
    elif kind == "objects-without-rounds":
        path.write_text('{"a": 1}\n{"b": 2}\n')
    else:
        damage(path, kind)
    before = snapshot(stopped_run)
    one_line_exit_2(["--resume", str(stopped_run), "--no-progress"], capsys, "metrics.jsonl")
    assert snapshot(stopped_run) == before


def test_resume_drops_the_half_line_a_kill_left_in_metrics_jsonl(stopped_run, capsys):
    """The one damage a kill does make (half of the next round's line, appended before the checkpoint) resumes."""
    path = stopped_run / "metrics.jsonl"
    first = path.read_text().splitlines()[0]
    path.write_text(path.read_text() + first[: len(first) // 2])
    config = json.loads((stopped_run / "config.json").read_text())
    config["rounds"] = 3
    (stopped_run / "config.json").write_text(json.dumps(config))
    assert main(["--resume", str(stopped_run), "--no-progress"]) == 0, capsys.readouterr().err
    assert [json.loads(line)["round"] for line in path.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ presets and suites
@pytest.mark.parametrize("kind", [*KINDS, "an-array"])
def test_a_damaged_preset_file(tmp_path, capsys, monkeypatch, kind):
    from pfedmoap import config

    folder = tmp_path / "presets"
    shutil.copytree(config.presets_dir(), folder)
    monkeypatch.setattr(config, "presets_dir", lambda: folder)
    if kind == "an-array":
        (folder / "synthetic.json").write_text("[]")
    else:
        damage(folder / "synthetic.json", kind)
    one_line_exit_2(["--preset", "synthetic", "--print-config"], capsys, "preset file", "synthetic.json")
    one_line_exit_2(["--list-presets"], capsys, "preset file", "synthetic.json")


@pytest.mark.parametrize("kind", [*KINDS, "an-array"])
def test_a_damaged_suite_file(tmp_path, capsys, kind):
    from pfedmoap.experiments import main as experiments

    suite = tmp_path / "grid.json"
    suite.write_text(json.dumps({"studies": [{"name": "k", "vary": {"experts": [1, 2]}}]}))
    if kind == "an-array":
        suite.write_text("[]")
    else:
        damage(suite, kind)
    out = tmp_path / "out"
    one_line_exit_2(["--suite", str(suite), "--out", str(out)], capsys, command=experiments)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ read back by reports
@pytest.mark.parametrize("kind", KINDS)
def test_reports_read_damaged_metrics_and_summaries_in_one_line(finished_run, tmp_path, kind):
    from pfedmoap.engine.rundir import read_metrics

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "metrics.jsonl", kind)
    damage(run / "summary.json", kind)
    if kind == "empty":
        assert read_metrics(run) == []  # callers that need a round say so themselves
    else:
        with pytest.raises(UserError, match="metrics file .* cannot be used"):
            read_metrics(run)
    with pytest.raises(UserError, match="summary.json .* cannot be used"):
        files.read_json(run / "summary.json", "summary.json")


# ------------------------------------------------------------------------------------------ the library's own caches
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_feature_cache_file_is_rebuilt_with_one_log_line(tmp_path, kind):
    from pfedmoap.engine.feature_cache import FeatureCache

    said: list[str] = []
    cache = FeatureCache(tmp_path / "cache", said.append)
    cache.store(0, "key", {"train": torch.ones(2, 3), "test": None})
    assert torch.equal(cache.load(0, "key")["train"], torch.ones(2, 3))
    damage(cache.path(0), kind)
    assert cache.load(0, "key") is None
    assert len(said) == 1, said
    cache.store(0, "key", {"train": torch.ones(2, 3), "test": None})  # the rebuild replaces it ...
    if kind != "folder":
        assert "re-encoding client 0" in said[0]
        assert cache.load(0, "key") is not None
    else:  # ... but not a folder in its place: the run goes on uncached
        assert "is not a file" in said[0] and cache.path(0).is_dir()
        assert (cache.path(0) / "inside.txt").is_file()


@pytest.mark.parametrize("kind", ["random", "truncated", "text", "empty", "header-array"])
def test_a_damaged_node_state_file_is_skipped_and_said(tmp_path, kind):
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from pfedmoap.flower.node_state import NodeStateStore

    store = NodeStateStore(tmp_path, "a1b2c3d4e5f6", 0)
    state = RecordDict({"pfedmoap.client.x": ConfigRecord({"a": 1})})
    older = store.save(state, (1, 0))
    newer = store.save(state, (2, 0))
    if kind == "header-array":
        newer.write_bytes(b"[1, 2]\n" + newer.read_bytes().partition(b"\n")[2])
    else:
        damage(newer, kind)
    loaded = store.load_before((3, 0))
    assert loaded.tag == (1, 0) and older.is_file()  # the newest whole state before it
    assert len(loaded.problems) == 1 and newer.name in loaded.problems[0]


# ------------------------------------------------------------------------------------------ dataset files
@pytest.mark.parametrize("kind", ["random", "truncated", "text", "empty", "folder"])
def test_a_damaged_image_in_a_dataset_is_one_line(tmp_path, kind):
    from test_real_data import _write_coop

    from pfedmoap.base.errors import ConfigError
    from pfedmoap.data import DatasetOptions, create_dataset
    from pfedmoap.data.real import COOP_DATASETS

    _write_coop(tmp_path, "dtd", train_per_class=1, test_per_class=1)
    folder, image_dir, _, _ = COOP_DATASETS["dtd"]
    image = sorted((tmp_path / folder / image_dir).rglob("*.jpg"))[0]
    damage(image, kind)
    bundle = create_dataset("dtd", DatasetOptions(root=str(tmp_path))) if kind != "folder" else None
    if bundle is None:  # the loader checks every listed image is a file
        with pytest.raises(ConfigError, match="is missing"):
            create_dataset("dtd", DatasetOptions(root=str(tmp_path)))
        return
    for images in (bundle.train.images, bundle.test.images):
        if image in images.paths:
            with pytest.raises(ConfigError, match=r"^image .* cannot be read .*; replace it") as info:
                images[images.paths.index(image)]
            assert "\n" not in str(info.value)
            return
    pytest.fail(f"{image} is not in the dataset")


def test_a_file_this_user_may_not_read(tmp_path, capsys, monkeypatch):
    """Permission denied, as a user who is not root meets it (root reads every file, and CI runs as root: the error
    the operating system would give is raised where the file is read)."""
    path = tmp_path / "secret.json"
    path.write_text("{}")
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match=rf"^x '{path}' cannot be used: permission denied$"):
        files.read_json(path, "x")
    from pfedmoap.experiments import main as experiments

    one_line_exit_2(
        ["--suite", str(path), "--out", str(tmp_path / "o")], capsys, "permission denied", command=experiments
    )


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "in-process-checkpoint", "metrics"])
def test_flower_resume_checks_its_files_before_flower_starts(stopped_run, capsys, monkeypatch, kind):
    """``--engine flower --resume``: the checkpoint and metrics.jsonl the ServerApp would read are checked first, in
    this process: one line, exit 2, no SuperLink started."""
    pytest.importorskip("flwr")
    from pfedmoap.flower import local_link

    monkeypatch.setattr(local_link.LocalSuperLink, "__enter__", lambda self: pytest.fail("Flower must not start"))
    config = json.loads((stopped_run / "config.json").read_text())
    config["_meta"]["engine"] = "flower"
    (stopped_run / "config.json").write_text(json.dumps(config))
    if kind == "metrics":  # killed before its first checkpoint, with a damaged metrics.jsonl
        (stopped_run / "checkpoints" / "last.pt").unlink()
        damage(stopped_run / "metrics.jsonl", "text")
    elif kind != "in-process-checkpoint":  # as it is: a checkpoint of the in-process engine
        damage(stopped_run / "checkpoints" / "last.pt", kind)
    before = snapshot(stopped_run)
    needle = "metrics.jsonl" if kind == "metrics" else "checkpoint"
    one_line_exit_2(["--engine", "flower", "--resume", str(stopped_run)], capsys, needle)
    assert snapshot(stopped_run) == before
