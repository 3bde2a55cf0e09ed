"""Tests of tiny-CLIP pretraining, caching and the command line (tiny step counts, 1 thread)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pfedmoap.base import files
from pfedmoap.base.errors import UserError
from pfedmoap.model import pretraining as pt
from pfedmoap.model.model_configs import CONFIG_DIR, TINY_MODEL, TINY_VIT_MODEL, register_model_configs
from pfedmoap.model.pretraining import PretrainConfig, default_pretrain_config, ensure_tiny_clip, zero_shot_accuracy
from pfedmoap.model.text_encoder import TextTower
from pfedmoap.pretrain import main as pretrain_cli

REPO = Path(__file__).resolve().parents[1]
# 1 thread: tests may share the CPU with other processes, and oversubscribed torch threads are very slow
TINY = PretrainConfig(steps=2, batch_size=8, warmup=1, threads=1)
TINY_VIT = PretrainConfig(steps=2, batch_size=8, warmup=1, threads=1, image_size=32, model=TINY_VIT_MODEL)


def test_register_model_configs_is_idempotent() -> None:
    register_model_configs()
    register_model_configs()
    assert TINY_MODEL in open_clip.list_models()
    cfg = open_clip.get_model_config(TINY_MODEL)
    assert cfg["embed_dim"] == 64 and cfg["vision_cfg"]["image_size"] == 64
    assert cfg["vision_cfg"]["layers"] == [1, 1, 1, 1]  # ModifiedResNet tower
    assert open_clip.factory._MODEL_CONFIG_PATHS.count(CONFIG_DIR) == 1
    vit = open_clip.get_model_config(TINY_VIT_MODEL)
    assert vit["embed_dim"] == 64 and vit["vision_cfg"]["patch_size"] > 0  # VisionTransformer tower
    assert vit["vision_cfg"]["layers"] >= 4  # pFedMMA adapts the upper blocks


def test_config_validation() -> None:
    for bad in (
        {"steps": 0},
        {"batch_size": 1},
        {"lr": 0.0},
        {"seed": -1},
        {"threads": 0},
        {"image_size": 40},
        {"styles": ("photo", "sketch")},
        {"styles": ()},
        {"model": "RN50"},
    ):
        with pytest.raises(ValueError):
            PretrainConfig(**bad)


def test_digest_is_stable_and_sensitive() -> None:
    assert PretrainConfig().digest() == PretrainConfig().digest()
    as_list, as_tuple = PretrainConfig(styles=["photo", "noisy"]), PretrainConfig(styles=("photo", "noisy"))
    assert as_list.digest() == as_tuple.digest()
    assert PretrainConfig(seed=1).digest() != PretrainConfig().digest()
    assert PretrainConfig(threads=1).digest() != PretrainConfig().digest()


def test_digest_of_the_resnet_is_what_it_was_before_the_model_field() -> None:
    """The default model does not enter the digest: the shipped ResNet file keeps its name."""
    assert PretrainConfig().digest() == "41763d6e9524"
    assert PretrainConfig(model=TINY_MODEL).digest() == "41763d6e9524"
    assert default_pretrain_config(TINY_MODEL) == PretrainConfig()
    vit = default_pretrain_config(TINY_VIT_MODEL)
    assert vit.model == TINY_VIT_MODEL and vit.threads == 1
    assert vit.digest() != PretrainConfig(**{**vit.__dict__, "model": TINY_MODEL}).digest()
    assert pt.shipped_path().name == "tiny-clip-41763d6e9524.safetensors"
    assert pt.shipped_path(vit) != pt.shipped_path()


def test_trimmed_text_encoding_matches_open_clip() -> None:
    torch.manual_seed(0)
    model = pt.create_tiny_clip().eval()
    tokens = open_clip.get_tokenizer(TINY_MODEL)(["a red star.", "there is a purple crescent in the image."])
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        trimmed = F.normalize(TextTower.from_model(model, TINY_MODEL).encode_tokens(tokens), dim=-1)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_pretrain_runs_deterministically_and_restores_threads() -> None:
    before = torch.get_num_threads()
    a = pt.pretrain(TINY, progress=False)
    assert torch.get_num_threads() == before
    b = pt.pretrain(TINY, progress=False)
    assert a.keys() == pt.create_tiny_clip().state_dict().keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert a["logit_scale"].item() <= pt._MAX_LOGIT_SCALE


def test_vit_pretrain_runs_and_its_text_tower_trims_exactly() -> None:
    state = pt.pretrain(TINY_VIT, progress=False)
    model = pt.create_tiny_clip(32, model=TINY_VIT_MODEL)
    model.load_state_dict(state)
    model.eval()
    tokens = open_clip.get_tokenizer(TINY_VIT_MODEL)(["a red star.", "there is a purple crescent in the image."])
    with torch.no_grad():
        full = model.encode_text(tokens, normalize=True)
        trimmed = F.normalize(TextTower.from_model(model, TINY_VIT_MODEL).encode_tokens(tokens), dim=-1)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_loss_decreases() -> None:
    losses: list[float] = []
    pt.pretrain(PretrainConfig(steps=30, batch_size=32, warmup=5, threads=1), progress=False, losses=losses)
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses


def test_ensure_tiny_clip_saves_loadable_weights_and_reuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ensure_tiny_clip(tmp_path, progress=False, cfg=TINY)
    assert path.is_file() and path.parent == tmp_path
    assert path.name == f"tiny-clip-{TINY.digest()}.pt"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    # the file is a plain state_dict that open_clip itself loads (weights_only, strict)
    register_model_configs()
    model = open_clip.create_model(TINY_MODEL, pretrained=str(path))
    saved = torch.load(path, weights_only=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)

    # a second call reuses the file without training
    def fail(*args, **kwargs):
        raise AssertionError("pretrained again although the weights were cached")

    monkeypatch.setattr(pt, "pretrain", fail)
    stamp = path.stat().st_mtime_ns
    assert ensure_tiny_clip(tmp_path, progress=False, cfg=TINY) == path
    assert path.stat().st_mtime_ns == stamp

    # a different config is a different file
    monkeypatch.setattr(pt, "pretrain", lambda cfg, progress=True: saved)
    other = ensure_tiny_clip(tmp_path, progress=False, cfg=PretrainConfig(steps=3, batch_size=8, threads=1))
    assert other != path and other.is_file()


def test_ensure_tiny_clip_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pt, "pretrain", lambda cfg, progress=True: {"x": torch.zeros(1)})

    def broken_save(obj, f) -> None:
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pt.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_clip(tmp_path, progress=False, cfg=TINY)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PFEDMOAP_CACHE", str(tmp_path))
    assert files.cache_dir() == tmp_path
    assert pt.weights_path(TINY).parent == tmp_path
    monkeypatch.delenv("PFEDMOAP_CACHE")
    assert files.cache_dir() == Path.home() / ".cache" / "pfedmoap"


def test_zero_shot_accuracy() -> None:
    torch.manual_seed(0)
    model = pt.create_tiny_clip()
    model.train()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    acc = zero_shot_accuracy(model, tokenizer, ["outline", 0], n_per_class=2, seed=0)
    assert list(acc) == ["outline", "photo"]
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert model.training  # mode restored
    again = zero_shot_accuracy(model, tokenizer, ["outline"], n_per_class=2, seed=0)
    assert again["outline"] == acc["outline"]  # a style's images do not depend on the other styles
    subset = zero_shot_accuracy(model, tokenizer, ["faded"], n_per_class=3, seed=0, classes=[0, 9, 17, 33])
    assert subset["faded"] * 12 == round(subset["faded"] * 12)  # 4 classes x 3 images


def test_cli_trains_caches_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress"]
    args += ["--cache-dir", str(tmp_path)]
    assert pretrain_cli(args) == 0
    first = capsys.readouterr().out
    assert "pretrained in" in first and str(tmp_path) in first
    assert pretrain_cli([*args, "--eval", "--eval-per-class", "1"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out
    for style in ("photo", "noisy", "striped", "cluttered", "outline", "faded"):
        assert style in out


@pytest.mark.parametrize(
    "args",
    [["--steps", "0"], ["--batch-size", "1"], ["--seed", "-3"], ["--steps", "many"], ["--bogus"], ["--model", "RN50"]],
)
def test_cli_bad_input_is_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = pretrain_cli(args)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_cli_unusable_cache_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert pretrain_cli(["--steps", "1", "--batch-size", "2", "--no-progress", "--cache-dir", str(not_a_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cache" in err


def test_cli_bad_input_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PFEDMOAP_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "pfedmoap.pretrain", "--steps", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "steps" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ shipped weights
def test_the_default_weights_ship_with_the_package_and_pass_their_hash(monkeypatch, tmp_path) -> None:
    path = pt.shipped_weights()
    assert path is not None and path.suffix == ".safetensors" and path.parent == pt.SHIPPED_DIR
    assert pt.PretrainConfig().digest() in path.name
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("must not pretrain: the weights ship"))
    assert ensure_tiny_clip(tmp_path / "empty-cache", progress=False) == path
    assert not (tmp_path / "empty-cache").exists()  # nothing written
    assert pt.shipped_weights(TINY) is None  # another config: no shipped weights, its own cache


def test_tampered_shipped_weights_are_a_damaged_install(monkeypatch, tmp_path) -> None:
    """One flipped byte: refused in one line, not replaced by pretraining (tests/test_bad_files.py runs the CLI)."""
    good = pt.shipped_path()
    bad_dir = tmp_path / "weights"
    bad_dir.mkdir()
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF
    (bad_dir / good.name).write_bytes(bytes(data))
    monkeypatch.setattr(pt, "SHIPPED_DIR", bad_dir)
    monkeypatch.setattr(pt, "_verified", {})
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("must not pretrain over a damaged install"))
    with pytest.raises(UserError, match="fail their SHA-256 check .*reinstall pfedmoap"):
        pt.shipped_weights()
    with pytest.raises(UserError, match="fail their SHA-256 check"):
        ensure_tiny_clip(tmp_path / "cache", progress=False)


def test_the_vit_weights_ship_with_the_package_and_pass_their_hash(monkeypatch, tmp_path) -> None:
    cfg = default_pretrain_config(TINY_VIT_MODEL)
    path = pt.shipped_weights(cfg)
    assert path is not None and path.suffix == ".safetensors" and path.parent == pt.SHIPPED_DIR
    assert path.name == f"tiny-clip-vit-{cfg.digest()}.safetensors"
    assert path != pt.shipped_weights()
    monkeypatch.setattr(pt, "pretrain", lambda *a, **k: pytest.fail("must not pretrain: the weights ship"))
    assert ensure_tiny_clip(tmp_path / "empty-cache", progress=False, cfg=cfg) == path
    assert not (tmp_path / "empty-cache").exists()
    assert pt.shipped_weights(TINY_VIT) is None  # another config: no shipped weights


@pytest.mark.parametrize("model", [TINY_MODEL, TINY_VIT_MODEL])
def test_shipped_weights_give_the_documented_zero_shot_accuracy(model: str) -> None:
    cfg = default_pretrain_config(model)
    net = pt.create_tiny_clip(cfg.image_size, pretrained=pt.shipped_weights(cfg), model=model)
    tokenizer = open_clip.get_tokenizer(model)
    table = pt.SHIPPED_ZERO_SHOT[model]
    previous = torch.get_num_threads()
    torch.set_num_threads(2 if model == TINY_MODEL else cfg.threads)
    try:
        acc = zero_shot_accuracy(net, tokenizer, list(table), n_per_class=50, seed=pt.EVAL_SEED)
    finally:
        torch.set_num_threads(previous)
    assert list(acc) == list(pt.SHIPPED_ZERO_SHOT[TINY_MODEL])  # every style is documented
    for style, expected in table.items():
        assert abs(acc[style] - expected) <= 0.01, (style, acc[style], expected)


def test_load_clip_synthetic_vit_exposes_patch_tokens() -> None:
    from pfedmoap.model.clip import load_clip

    clip = load_clip(TINY_VIT_MODEL, "synthetic", torch.device("cpu"), progress=False)
    assert clip.local_feature_kind == "tokens" and clip.embed_dim == 64 and clip.image_size == 32
    images = torch.zeros(2, 3, clip.image_size, clip.image_size)
    local = clip.encode_local_images(images)
    assert local.shape == (2, clip.local_feature_count, 64)
    assert clip.encode_images(images).shape == (2, 64)


def test_installed_copy_finds_the_shipped_weights_of_the_installed_distribution() -> None:
    """What a Flower FAB's unpacked code (which has no weights folder) falls back to: the same file, under the same
    path below the package's folder, in the installed distribution (here the editable install of this checkout)."""
    from importlib import metadata

    try:
        metadata.distribution("pfedmoap")
    except metadata.PackageNotFoundError:
        pytest.skip("pfedmoap is not installed (pip install -e .)")
    shipped = pt.shipped_path()
    found = pt.installed_copy(shipped)
    assert found is not None and found.resolve().read_bytes() == shipped.read_bytes()
    assert found.relative_to(found.parents[3]).as_posix() == f"pfedmoap/model/weights/{shipped.name}"
