"""The data side of the field's evaluation protocols (docs/protocols/): target test sets and a held-out domain.

- cross-dataset: the federation trains on one dataset; every client is also scored on other datasets' test sets,
  each over its own class names (CoOp's, FedTPG's and PMFLT's ImageNet -> 10 datasets).
- cross-domain: the same, with the targets the training classes in other domains (ImageNet -> V2, Sketch, A, R).
- leave-one-domain-out: one domain of a domain dataset is taken out of training altogether; every client is scored
  on all of its images (Dassl's domain-generalisation test: the target's train and test rows).

A target is named ``DATASET`` or ``DATASET:DOMAIN+DOMAIN`` (the domains the dataset is loaded with); the name is
also the column it is reported under.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..base.errors import ConfigError
from . import synthetic
from .registry import DatasetBundle, LabeledImages

# CoOp's 11 datasets, ImageNet first (the source of the cross-dataset protocol), and ImageNet's 4 variants
COOP_DATASETS = (
    "imagenet",
    "caltech101",
    "oxfordpets",
    "stanfordcars",
    "flowers102",
    "food101",
    "fgvcaircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
IMAGENET_VARIANTS = ("imagenet-v2", "imagenet-sketch", "imagenet-a", "imagenet-r")
# the synthetic world's second and third class sets: its shapes alone and its colours alone (8 and 5 classes)
SYNTHETIC_CLASS_SETS = ("synthetic-shapes", "synthetic-colours")


@dataclass(frozen=True)
class Target:
    """One target test set: reported as ``name``; ``dataset`` loaded with ``domains`` (None: its default)."""

    name: str
    dataset: str
    domains: list[str] | None


def parse_target(spec: str) -> Target:
    """``"DATASET"`` or ``"DATASET:DOMAIN+DOMAIN"`` as a :class:`Target` (one line when malformed)."""
    name = spec.strip()
    dataset, sep, rest = name.partition(":")
    domains = [d for d in rest.split("+")] if sep else None
    if not dataset or (domains is not None and (not domains or not all(domains))):
        raise ConfigError(f"eval_targets entry {spec!r} is not DATASET or DATASET:DOMAIN+DOMAIN")
    return Target(name, dataset, domains)


def default_targets(eval_split: str, dataset: str, domains: list[str] | None, all_domains: list[str]) -> list[str]:
    """The protocol's targets when ``--eval-targets`` is not given: ImageNet's 10 peers (cross-dataset) or its 4
    variants (cross-domain); the synthetic world's other class sets, or its styles the run does not train on (a
    domain dataset's: ``all_domains`` less the run's ``domains``)."""
    if eval_split == "cross-dataset":
        if dataset == "imagenet":
            return list(COOP_DATASETS[1:])
        if dataset == "synthetic":  # in the run's styles
            return [f"{s}:{'+'.join(domains)}" if domains else s for s in SYNTHETIC_CLASS_SETS]
    elif eval_split == "cross-domain":
        if dataset == "imagenet":
            return list(IMAGENET_VARIANTS)
        if dataset == "synthetic":
            all_domains, domains = list(synthetic.STYLES), domains or ["faded"]
        if all_domains:
            used = set(domains or all_domains)
            others = [d for d in all_domains if d not in used]
            if others:
                return [f"{dataset}:{d}" for d in others]
    raise ConfigError(
        f"eval_split={eval_split} has no default targets for dataset={dataset}; name them with --eval-targets "
        "DATASET[,DATASET] (or DATASET:DOMAIN+DOMAIN)"
    )


def _concat(a: LabeledImages, b: LabeledImages) -> LabeledImages:
    if isinstance(a.images, torch.Tensor) and isinstance(b.images, torch.Tensor):
        images = torch.cat([a.images, b.images])
    else:
        images = _Chain(a.images, b.images)
    domains = None if a.domains is None or b.domains is None else np.concatenate([a.domains, b.domains])
    return LabeledImages(images, np.concatenate([a.labels, b.labels]), domains)


class _Chain:
    """Two indexables of images one after the other (without reading them)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self.first)
        return self.first[i] if i < n else self.second[i - n]


def hold_out_domain(bundle: DatasetBundle, domain: str) -> tuple[DatasetBundle, LabeledImages]:
    """``bundle`` without ``domain`` (what the clients are drawn from) and every image of ``domain`` (its train
    rows, then its test rows: what every client is scored on). Domain ids keep their meaning (``domain_names``
    is unchanged), so a client's domain still names the same domain."""
    if bundle.train.domains is None or not bundle.domain_names:
        raise ConfigError(f"eval_split=leave-one-domain-out needs a dataset with domains; {bundle.name} has none")
    if domain not in bundle.domain_names:
        raise ConfigError(
            f"held_out_domain={domain!r} is not one of the run's domains: {', '.join(bundle.domain_names)}"
        )
    if len(bundle.domain_names) < 2:
        raise ConfigError(
            f"held_out_domain={domain!r} leaves no domain to train on; give --domains with at least two domains"
        )
    d = bundle.domain_id(domain)
    train_d, test_d = np.asarray(bundle.train.domains), np.asarray(bundle.test.domains)
    source = DatasetBundle(
        name=bundle.name,
        classnames=list(bundle.classnames),
        train=bundle.train.rows(np.flatnonzero(train_d != d)),
        test=bundle.test.rows(np.flatnonzero(test_d != d)),
        domain_names=list(bundle.domain_names),
        domain_ids=None if bundle.domain_ids is None else list(bundle.domain_ids),
    )
    held_out = _concat(bundle.train.rows(np.flatnonzero(train_d == d)), bundle.test.rows(np.flatnonzero(test_d == d)))
    if len(held_out) == 0:
        raise ConfigError(f"held_out_domain={domain!r} has no images in dataset={bundle.name}")
    return source, held_out
