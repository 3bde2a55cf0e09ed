import numpy as np
import pytest

from pfedmoap.base.errors import ConfigError
from pfedmoap.data import partition


def labels(classes, per_class):
    return np.repeat(np.arange(classes), per_class)


@pytest.mark.parametrize(
    ("classes", "clients", "expected"),
    [
        (102, 10, [10] * 9 + [12]),
        (47, 10, [5] * 9 + [2]),
        (37, 10, [4] * 9 + [1]),
        (40, 10, [4] * 10),
        (100, 10, [10] * 10),
    ],
)
def test_pathological_class_counts(classes, clients, expected):
    tr, te = labels(classes, 20), labels(classes, 5)
    splits = partition.pathological(tr, te, clients, 16, np.random.default_rng(0), num_classes=classes)
    assert [len(s.classes) for s in splits] == expected
    owned = np.concatenate([s.classes for s in splits])
    assert sorted(owned.tolist()) == list(range(classes))  # disjoint and complete
    for s in splits:
        assert set(tr[s.train]) == set(s.classes.tolist())
        assert np.bincount(tr[s.train], minlength=classes)[s.classes].tolist() == [16] * len(s.classes)
        # test split = all test images of the owned classes
        assert sorted(s.test.tolist()) == sorted(np.flatnonzero(np.isin(te, s.classes)).tolist())


def test_pathological_shots_zero_takes_all_and_few_images_take_what_exists():
    tr, te = labels(10, 5), labels(10, 2)
    all_ = partition.pathological(tr, te, 5, 0, np.random.default_rng(0))
    few = partition.pathological(tr, te, 5, 16, np.random.default_rng(0))
    assert [len(s.train) for s in all_] == [10] * 5 == [len(s.train) for s in few]


def test_pathological_too_many_clients():
    with pytest.raises(ConfigError, match="clients=12"):
        partition.pathological(labels(10, 3), labels(10, 1), 12, 2, np.random.default_rng(0))


def test_dirichlet_min_size_and_identical_proportions():
    tr, te = labels(10, 200), labels(10, 100)
    splits = partition.dirichlet(tr, te, 20, 0.5, np.random.default_rng(3), min_size=15)
    assert min(len(s.train) for s in splits) >= 15
    all_train = np.concatenate([s.train for s in splits])
    assert len(all_train) == len(tr) == len(set(all_train.tolist()))
    assert len(np.concatenate([s.test for s in splits])) == len(te)
    for s in splits:
        ptr = np.bincount(tr[s.train], minlength=10) / 200
        pte = np.bincount(te[s.test], minlength=10) / 100
        # the same share of each class, up to one image of rounding per class
        assert np.all(np.abs(ptr - pte) <= 1 / 100 + 1 / 200 + 1e-12)


def test_dirichlet_impossible_min_size():
    with pytest.raises(ConfigError, match="min_client_size"):
        partition.dirichlet(labels(2, 5), labels(2, 5), 4, 0.5, np.random.default_rng(0), min_size=5)


def test_domain_dirichlet_clients_per_domain():
    tr, te = labels(10, 60), labels(10, 20)
    trd, ted = np.tile(np.repeat(np.arange(3), 20), 10), np.tile(np.repeat(np.arange(3), 20 // 3 + 1)[:20], 10)
    splits = partition.domain_dirichlet(tr, te, trd, ted, 6, 0.3, np.random.default_rng(0), min_size=5)
    assert [s.domain for s in splits] == [0, 0, 1, 1, 2, 2]
    for s in splits:
        assert set(trd[s.train]) == {s.domain} and set(ted[s.test]) <= {s.domain}
    with pytest.raises(ConfigError, match="multiple"):
        partition.domain_dirichlet(tr, te, trd, ted, 5, 0.3, np.random.default_rng(0))


def test_iid_even_and_disjoint():
    splits = partition.iid(labels(4, 25), labels(4, 10), 4, np.random.default_rng(0))
    assert [len(s.train) for s in splits] == [25] * 4
    assert len(set(np.concatenate([s.train for s in splits]).tolist())) == 100
