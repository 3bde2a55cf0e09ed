"""Client partitions of a labelled dataset (SPEC §3): pathological, Dirichlet, Dirichlet within domains, few shots
within domains, IID.

Every partitioner returns one :class:`ClientSplit` per client: index arrays into the dataset's train and
test sets. All randomness comes from the numpy Generator passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.errors import ConfigError


@dataclass
class ClientSplit:
    train: np.ndarray  # indices into the train set
    test: np.ndarray  # indices into the test set
    classes: np.ndarray | None = None  # owned classes (pathological split only)
    domain: int | None = None  # the client's domain (domain splits only)


def pathological(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    shots: int,
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> list[ClientSplit]:
    """Disjoint class blocks: shuffle classes, each client takes round(C/N) consecutive ones, the last
    client the remainder; ``shots`` train images per owned class (0 = all); test = all test images of the
    owned classes."""
    classes_total = int(num_classes if num_classes is not None else max(train_labels.max(), test_labels.max()) + 1)
    per_client = int(round(classes_total / num_clients))
    if per_client < 1 or per_client * (num_clients - 1) >= classes_total:
        valid = [n for n in range(1, classes_total + 1) if round(classes_total / n) * (n - 1) < classes_total]
        raise ConfigError(
            f"clients={num_clients} does not fit a pathological split of {classes_total} classes "
            f"(valid: 1..{max(valid)} clients)"
        )
    order = rng.permutation(classes_total)
    splits = []
    for i in range(num_clients):
        owned = order[i * per_client :] if i == num_clients - 1 else order[i * per_client : (i + 1) * per_client]
        train_idx = []
        for c in owned:
            idx = np.flatnonzero(train_labels == c)
            if shots and len(idx) > shots:
                idx = np.sort(rng.choice(idx, size=shots, replace=False))
            train_idx.append(idx)
        test_idx = np.flatnonzero(np.isin(test_labels, owned))
        splits.append(
            ClientSplit(np.concatenate(train_idx).astype(np.int64), test_idx.astype(np.int64), np.sort(owned))
        )
    return splits


def _dirichlet_once(
    train_labels: np.ndarray, test_labels: np.ndarray, members: int, alpha: float, rng: np.random.Generator
) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    train_parts: list[list[np.ndarray]] = [[] for _ in range(members)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(members)]
    for c in np.unique(np.concatenate([train_labels, test_labels])):
        share = rng.dirichlet(np.full(members, alpha))
        for labels, parts in ((train_labels, train_parts), (test_labels, test_parts)):
            idx = rng.permutation(np.flatnonzero(labels == c))
            # the same proportions cut the train and the test images of class c
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for j, piece in enumerate(np.split(idx, cuts)):
                parts[j].append(piece)
    return train_parts, test_parts


def dirichlet(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[ClientSplit]:
    """Label shift: per class, client shares ~ Dirichlet(alpha); test images are cut by the same shares.
    Redrawn until every client has at least ``min_size`` train images."""
    if min_size * num_clients > len(train_labels):
        raise ConfigError(
            f"min_client_size={min_size} x clients={num_clients} exceeds the {len(train_labels)} train images"
        )
    for _ in range(max_tries):
        train_parts, test_parts = _dirichlet_once(train_labels, test_labels, num_clients, alpha, rng)
        sizes = [sum(len(p) for p in parts) for parts in train_parts]
        if min(sizes) >= min_size:
            return [
                ClientSplit(np.sort(np.concatenate(tr)).astype(np.int64), np.sort(np.concatenate(te)).astype(np.int64))
                for tr, te in zip(train_parts, test_parts, strict=True)
            ]
    raise ConfigError(
        f"dirichlet_alpha={alpha}: no split with min_client_size={min_size} for {num_clients} clients "
        f"in {max_tries} draws; lower min_client_size or raise dirichlet_alpha"
    )


def _clients_per_domain(num_clients: int, num_domains: int, what: str) -> int:
    """Clients per domain when they are spread evenly over the domains (one line when they do not divide)."""
    if num_clients % num_domains:
        raise ConfigError(f"clients={num_clients} must be a multiple of the {num_domains} {what}")
    return num_clients // num_domains


def domain_dirichlet(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    train_domains: np.ndarray,
    test_domains: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
) -> list[ClientSplit]:
    """Feature + label shift: clients are spread evenly over domains (clients // domains each, in domain
    order), and within each domain the images are split by Dirichlet(alpha) over classes."""
    domains = np.unique(np.concatenate([train_domains, test_domains]))
    per_domain = _clients_per_domain(num_clients, len(domains), "domains for a domain-dirichlet split")
    splits: list[ClientSplit] = []
    for d in domains:
        tr_idx = np.flatnonzero(train_domains == d)
        te_idx = np.flatnonzero(test_domains == d)
        inner = dirichlet(train_labels[tr_idx], test_labels[te_idx], per_domain, alpha, rng, min_size)
        for s in inner:
            splits.append(ClientSplit(tr_idx[s.train], te_idx[s.test], domain=int(d)))
    return splits


def domain_shots(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    train_domains: np.ndarray,
    test_domains: np.ndarray,
    num_clients: int,
    shots: int,
    rng: np.random.Generator,
) -> list[ClientSplit]:
    """Feature shift, few-shot: clients are spread evenly over the domains (clients // domains each, in domain order)
    and each draws its own ``shots`` train images of every class from its domain (0: all of them, split evenly).

    Clients of one domain take disjoint draws while the class has images enough (consecutive blocks of one
    permutation), then overlap as little as possible (the permutation wraps); PMFLT re-seeds its sampler for every
    client, so there clients of one domain train on the same images. A domain's test images are shared out evenly
    among its clients."""
    domains = np.unique(train_domains)
    per_domain = _clients_per_domain(num_clients, len(domains), "training domains for a domain-shots split")
    splits: list[ClientSplit] = []
    for d in domains:
        tr_idx = np.flatnonzero(train_domains == d)
        te_idx = np.flatnonzero(test_domains == d)
        if len(te_idx) < per_domain:
            raise ConfigError(f"domain {int(d)} has {len(te_idx)} test images for {per_domain} clients")
        train: list[list[np.ndarray]] = [[] for _ in range(per_domain)]
        for c in np.unique(train_labels[tr_idx]):
            rows = tr_idx[train_labels[tr_idx] == c][rng.permutation(int((train_labels[tr_idx] == c).sum()))]
            if shots == 0:
                for j, part in enumerate(np.array_split(rows, per_domain)):
                    train[j].append(part)
                continue
            for j in range(per_domain):
                take = np.arange(j * shots, (j + 1) * shots) % len(rows)
                train[j].append(np.unique(rows[take]))
        tests = np.array_split(te_idx[rng.permutation(len(te_idx))], per_domain)
        for j in range(per_domain):
            splits.append(
                ClientSplit(np.sort(np.concatenate(train[j])).astype(np.int64), np.sort(tests[j]), domain=int(d))
            )
    return splits


def iid(
    train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[ClientSplit]:
    """Uniformly random, equal-sized shares of train and test."""
    if num_clients > len(train_labels) or num_clients > len(test_labels):
        raise ConfigError(f"clients={num_clients} exceeds the number of images for an iid split")
    train = np.array_split(rng.permutation(len(train_labels)), num_clients)
    test = np.array_split(rng.permutation(len(test_labels)), num_clients)
    return [
        ClientSplit(np.sort(a).astype(np.int64), np.sort(b).astype(np.int64)) for a, b in zip(train, test, strict=True)
    ]
