"""On-disk datasets: tiny fixtures in the real layout, and one clear line when the data is missing."""

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.config import load_preset
from pfedmoap.data import DatasetOptions, create_dataset
from pfedmoap.data.real import DEBIAN_FASHION_MNIST
from pfedmoap.engine.federation import Federation
from pfedmoap.train import main


def _write_cifar10(root, per_batch=40, test=40, seed=0):
    """The python CIFAR-10 layout: five train batches, a test batch and batches.meta (pickled dicts)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name, n in [*[(f"data_batch_{i}", per_batch) for i in range(1, 6)], ("test_batch", test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": (np.arange(n) % 10).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return names


@pytest.fixture
def no_md5(monkeypatch):
    """The fixture files are not the real ones, so skip torchvision's checksum test (and only that)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)


def test_cifar10_layout_loads_in_label_order(tmp_path, no_md5):
    names = _write_cifar10(tmp_path)
    bundle = create_dataset("cifar10", DatasetOptions(root=str(tmp_path)))
    assert bundle.classnames == names
    assert bundle.train.images.shape == (200, 3, 32, 32) and bundle.train.images.dtype.is_floating_point is False
    assert len(bundle.test) == 40 and bundle.train.labels[:3].tolist() == [0, 1, 2]


def test_cifar10_federation_round(tmp_path, no_md5, tiny_clip):
    _write_cifar10(tmp_path)
    cfg = small_config(
        dataset="cifar10",
        data_root=str(tmp_path),
        partition="dirichlet",
        clients=4,
        min_client_size=5,
        experts=2,
        rounds=2,
    )
    fed = Federation(cfg, clip=tiny_clip, log=lambda m: None)
    hist = fed.run()
    assert len(hist.rounds) == 2 and len(hist.rounds[-1].client_acc) == 4
    assert fed.dataset.num_classes == 10


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_dataset_is_one_line(tmp_path, name):
    with pytest.raises(ConfigError, match=f"dataset={name}: not found or corrupted under .*download=True"):
        create_dataset(name, DatasetOptions(root=str(tmp_path)))
    with pytest.raises(ConfigError, match="needs --data-root"):
        create_dataset(name, DatasetOptions())


@pytest.mark.parametrize(
    "preset",
    [
        "cifar10",
        "cifar100",
        "flowers102",
        "oxfordpets",
        "food101",
        "caltech101",
        "dtd",
        "domainnet",
        "office-caltech10",
        "imagenet-cross-dataset",
        "imagenet-cross-domain",
        "pacs-leave-one-domain-out",
        "office-home-leave-one-domain-out",
    ],
)
def test_paper_preset_without_data_fails_in_one_line_before_loading_a_model(tmp_path, capsys, preset):
    assert main(["--preset", preset, "--data-root", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    dataset = load_preset(preset)["dataset"]
    assert len(err) == 1 and f"dataset={dataset}: not found" in err[0]
    assert not (tmp_path / "run").exists()


fashion_available = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed (.ci/run installs it)",
)


@fashion_available
def test_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PFEDMOAP_CACHE", str(tmp_path))
    bundle = create_dataset("fashion-mnist", DatasetOptions())
    assert bundle.classnames[0] == "T-shirt or top" and bundle.classnames[-1] == "Ankle boot"
    assert len(bundle.train) == 60000 and len(bundle.test) == 10000
    assert bundle.train.images.shape == (60000, 3, 28, 28)
    assert np.bincount(bundle.test.labels).tolist() == [1000] * 10
    assert (tmp_path / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()


@fashion_available
def test_fashion_mnist_end_to_end_with_feature_cache(tmp_path, monkeypatch, tiny_clip):
    """The real-data path: loading, pathological partition, cached features, evaluation over all classes."""
    monkeypatch.setenv("PFEDMOAP_CACHE", str(tmp_path))
    cfg = small_config(dataset="fashion-mnist", clients=5, shots=8, experts=2, rounds=2)
    fed = Federation(cfg, clip=tiny_clip, log=lambda m: None)
    assert [len(s.classes) for s in fed.world.splits] == [2] * 5
    assert all(c.data.num_train == 16 for c in fed.clients)
    assert sum(int(c.data.test_labels.numel()) for c in fed.clients) == 10000
    hist = fed.run()
    assert len(hist.rounds) == 2 and all(0 <= a <= 100 for a in hist.rounds[-1].client_acc)


def test_fashion_mnist_missing_is_one_line(tmp_path):
    with pytest.raises(
        ConfigError, match="dataset=fashion-mnist: not found in .*apt-get install dataset-fashion-mnist"
    ):
        create_dataset("fashion-mnist", DatasetOptions(root=str(tmp_path)))


def _write_coop(root, name, train_per_class=2, test_per_class=1):
    """A tiny dataset in CoOp's layout: images + split_zhou_*.json with [path, label, classname] rows."""
    from PIL import Image

    from pfedmoap.data.real import COOP_DATASETS

    folder, image_dir, split_file, n_classes = COOP_DATASETS[name]
    base = root / folder
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": [], "test": []}
    for c in range(n_classes):
        classname = f"class_{c:03d} name"
        (base / image_dir / f"c{c}").mkdir(parents=True, exist_ok=True)
        for key, n in (("train", train_per_class), ("test", test_per_class)):
            for k in range(n):
                rel = f"c{c}/{key}_{k}.jpg"
                pixels = rng.integers(0, 256, (12 + c % 5, 10, 3), dtype=np.uint8)  # sizes differ on purpose
                Image.fromarray(pixels).save(base / image_dir / rel)
                splits[key].append([rel, c, classname])
    (base / split_file).write_text(json.dumps(splits))
    return n_classes


@pytest.mark.parametrize(
    ("name", "expected_counts"),
    [
        ("flowers102", [10] * 9 + [12]),
        ("oxfordpets", [4] * 9 + [1]),
        ("food101", [10] * 9 + [11]),
        ("caltech101", [10] * 10),
        ("dtd", [5] * 9 + [2]),
    ],
)
def test_coop_layout_datasets_and_pathological_counts(tmp_path, name, expected_counts):
    from pfedmoap.data import partition

    n_classes = _write_coop(tmp_path, name)
    bundle = create_dataset(name, DatasetOptions(root=str(tmp_path)))
    assert bundle.num_classes == n_classes
    assert bundle.classnames[:2] == ["class_000 name", "class_001 name"]  # label order
    assert len(bundle.train) == 2 * n_classes and len(bundle.test) == n_classes
    img = bundle.train.images[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 224, 224)
    splits = partition.pathological(
        bundle.train.labels, bundle.test.labels, 10, 16, np.random.default_rng(0), bundle.num_classes
    )
    assert [len(s.classes) for s in splits] == expected_counts


def test_coop_dataset_federation_round(tmp_path, tiny_clip):
    _write_coop(tmp_path, "dtd")
    cfg = small_config(dataset="dtd", data_root=str(tmp_path), clients=10, experts=3, rounds=2)
    hist = Federation(cfg, clip=tiny_clip, log=lambda m: None).run()
    assert len(hist.rounds[-1].client_acc) == 10


@pytest.mark.parametrize("name", ["flowers102", "oxfordpets", "food101", "caltech101", "dtd"])
def test_coop_dataset_missing_or_broken_is_one_line(tmp_path, name):
    with pytest.raises(ConfigError, match=f"dataset={name}: not found under .*DATASETS.md"):
        create_dataset(name, DatasetOptions(root=str(tmp_path)))
    _write_coop(tmp_path, name, train_per_class=1, test_per_class=1)
    from pfedmoap.data.real import COOP_DATASETS

    folder, image_dir, split_file, _ = COOP_DATASETS[name]
    next((tmp_path / folder / image_dir).rglob("*.jpg")).unlink()
    with pytest.raises(ConfigError, match="image listed in .* is missing"):
        create_dataset(name, DatasetOptions(root=str(tmp_path)))
    (tmp_path / folder / split_file).write_text("{not json")
    with pytest.raises(ConfigError, match="is not a CoOp split file"):
        create_dataset(name, DatasetOptions(root=str(tmp_path)))


def _write_domains(root, name, per_class=6):
    from PIL import Image

    from pfedmoap.data.real import DOMAIN_DATASETS

    folder, domains, classes = DOMAIN_DATASETS[name]
    rng = np.random.default_rng(1)
    for domain in domains:
        for cls in classes:
            (root / folder / domain / cls).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(
                    root / folder / domain / cls / f"{k}.jpg"
                )
    return domains, classes


@pytest.mark.parametrize(("name", "clients"), [("domainnet", 30), ("office-caltech10", 20)])
def test_domain_datasets_and_per_domain_client_counts(tmp_path, name, clients):
    from pfedmoap.data import partition

    domains, classes = _write_domains(tmp_path, name)
    bundle = create_dataset(name, DatasetOptions(root=str(tmp_path)))
    assert bundle.classnames == list(classes) == sorted(classes)  # label order, never a set's order
    assert bundle.domain_names == list(domains)
    assert len(bundle.train) + len(bundle.test) == 6 * len(domains) * len(classes)
    assert set(bundle.test.domains.tolist()) == set(range(len(domains)))
    splits = partition.domain_dirichlet(
        bundle.train.labels,
        bundle.test.labels,
        bundle.train.domains,
        bundle.test.domains,
        clients,
        0.3,
        np.random.default_rng(0),
        min_size=1,
    )
    per_domain = np.bincount([s.domain for s in splits]).tolist()
    assert per_domain == [5] * len(domains)
    # the same data seed gives the same split; another seed another one
    again = create_dataset(name, DatasetOptions(root=str(tmp_path)))
    other = create_dataset(name, DatasetOptions(root=str(tmp_path), seed=5))
    assert again.test.images.paths == bundle.test.images.paths != other.test.images.paths


@pytest.mark.parametrize("name", ["domainnet", "office-caltech10"])
def test_domain_dataset_missing_is_one_line(tmp_path, name):
    with pytest.raises(ConfigError, match=f"dataset={name}: not found under .*missing"):
        create_dataset(name, DatasetOptions(root=str(tmp_path)))


def test_paper_table_puts_ours_next_to_the_paper():
    from pfedmoap.research.sweeps import PAPER_RESULTS, paper_table

    assert PAPER_RESULTS["flowers102"]["pfedmoap"] == 98.41 and PAPER_RESULTS["office-caltech10"]["zeroshot"] == 9.40
    assert "pfedmoap-lambda0" not in PAPER_RESULTS["cifar10"]
    stats = {"label": "pFedMoAP, lambda = 0.5", "final": (97.0, 0.5)}
    table = paper_table({"flowers102": {"pfedmoap": stats}, "synthetic": {"pfedmoap": stats}})
    assert "flowers102 (ours / paper)" in table and "97.00 ± 0.50 / 98.41" in table and "synthetic" not in table
    assert paper_table({"synthetic": {"pfedmoap": stats}}) is None
