import itertools

import pytest
import torch

from pfedmoap.ops import reference


def brute_knn(pool, present, q, k):
    cands = [j for j in range(len(pool)) if present[j] and j != q]
    d = {j: float(((pool[q].double() - pool[j].double()) ** 2).sum()) for j in cands}
    return sorted(cands, key=lambda j: (d[j], j))[:k]


@pytest.mark.parametrize(("n", "k"), [(1, 3), (2, 1), (7, 3), (7, 6), (7, 10), (30, 5)])
def test_knn_matches_brute_force(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    pool = torch.randn(n, 3, 5, generator=g)
    present = torch.rand(n, generator=g) > 0.3
    queries = torch.tensor([i for i in range(n) if present[i]], dtype=torch.long)
    if len(queries) == 0:
        return
    got = reference.knn(pool, present, queries, k)
    avail = int(present.sum()) - 1
    assert got.shape == (len(queries), min(k, avail))
    for row, q in zip(got.tolist(), queries.tolist(), strict=True):
        assert row == brute_knn(pool, present, q, k)


def test_knn_ties_go_to_lower_id():
    pool = torch.zeros(5, 4)
    pool[0] = 1.0
    got = reference.knn(pool, torch.ones(5, dtype=torch.bool), torch.tensor([1, 0]), 2)
    assert got.tolist() == [[2, 3], [1, 2]]


def test_knn_never_returns_self_or_absent():
    pool = torch.randn(10, 8)
    present = torch.tensor([True, False] * 5)
    got = reference.knn(pool, present, torch.tensor([0, 2, 4]), 10)
    for q, row in zip([0, 2, 4], got.tolist(), strict=True):
        assert q not in row and all(present[j] for j in row)
        assert set(row) == {0, 2, 4, 6, 8} - {q}
    assert list(itertools.chain(*got.tolist()))
