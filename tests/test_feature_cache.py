"""The node-local feature cache (``--feature-cache``): a fresh process loads a client's features instead of encoding
them; a file that is truncated, corrupt, or made for another model or partition is detected, said in one line and
rebuilt; writes are atomic."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pfedmoap.engine.world as world_module
from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.world import World
from tests.conftest import small_config


def _world(cfg, logs):
    return World(cfg, log=logs.append)


def _count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = world_module.encode_subset

    def counting(clip, data, indices, *args, **kwargs):
        calls.append(len(indices))
        return real(clip, data, indices, *args, **kwargs)

    monkeypatch.setattr(world_module, "encode_subset", counting)
    return calls


def test_second_world_loads_the_same_features_without_encoding(tmp_path, monkeypatch):
    cfg = small_config(clients=4, experts=2, feature_cache=str(tmp_path / "cache"))
    logs: list[str] = []
    first = _world(cfg, logs)
    a = first.client_data(2)
    calls = _count_encodes(monkeypatch)
    b = _world(cfg, logs).client_data(2)
    assert calls == [] and logs == []  # loaded, nothing said
    assert torch.equal(a.train_features, b.train_features) and torch.equal(a.test_features, b.test_features)
    assert torch.equal(a.train_labels, b.train_labels) and torch.equal(a.test_labels, b.test_labels)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["client-2.pt"]  # no temporary file left


def test_a_fresh_process_loads_the_cache(tmp_path):
    """What a Flower ClientApp process does per message: build the world, ask for its client."""
    code = (
        "import sys, torch; from tests.conftest import small_config; import pfedmoap.engine.world as w;"
        "calls = [];"
        "real = w.encode_subset;"
        "w.encode_subset = lambda *a, **k: calls.append(1) or real(*a, **k);"
        f"cfg = small_config(clients=4, experts=2, feature_cache={str(tmp_path)!r});"
        "d = w.World(cfg).client_data(1);"
        "print(len(calls), float(d.test_features.sum()))"
    )
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n1, s1 = first.stdout.split()
    n2, s2 = second.stdout.split()
    assert int(n1) == 2 and int(n2) == 0 and s1 == s2  # train + test encoded once, then loaded


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "another-partition", "another-model"])
def test_a_bad_file_is_said_in_one_line_and_rebuilt(tmp_path, monkeypatch, damage):
    cache = tmp_path / "cache"
    cfg = small_config(clients=4, experts=2, feature_cache=str(cache))
    logs: list[str] = []
    reference = _world(cfg, logs).client_data(0)
    path = cache / "client-0.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "corrupt":  # a whole file whose features were changed: the checksum catches it
        blob = torch.load(path, weights_only=True)
        blob["tensors"]["test_features"][0, 0] += 1.0
        torch.save(blob, path)
    elif damage == "another-partition":
        _world(cfg.replace(clients=5), []).client_data(0)  # another split (8 classes, not 10) overwrote it
    else:
        _world(cfg.replace(pretrained="synthetic"), []).client_data(0)  # other image-tower weights overwrote it
    calls = _count_encodes(monkeypatch)
    logs.clear()
    data = _world(cfg, logs).client_data(0)
    assert len(logs) == 1 and "re-encoding client 0" in logs[0], logs
    expected = {
        "truncated": "does not load",
        "corrupt": "fails its checksum",
        "another-partition": "another model, dataset or partition",
        "another-model": "another model, dataset or partition",
    }[damage]
    assert expected in logs[0]
    assert len(calls) == 2  # train and test re-encoded
    assert torch.equal(data.test_features, reference.test_features)
    logs.clear()
    _world(cfg, logs).client_data(0)  # rebuilt file: loads cleanly again
    assert logs == []


def test_a_file_in_place_of_the_folder_is_one_line(tmp_path):
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    with pytest.raises(ConfigError, match="feature_cache=.* is a file; it must be a folder"):
        World(small_config(clients=4, experts=2, feature_cache=str(target)))
    assert target.read_text() == "x"
