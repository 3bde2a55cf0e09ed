"""A run's world, built from its config alone: the dataset, the frozen CLIP, the partition, the prompt encoder and
each client's data (its split and the frozen image features of its images).

Every engine builds the same world from the same config: the in-process engine builds every client; a Flower
node builds only its own (:meth:`World.client_data` encodes one client's images on demand). A client's features
are encoded from that client's images alone, in its split's order, so they do not depend on which other clients
a process builds.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..base.errors import ConfigError
from ..config import TARGET_SPLITS
from ..data import DatasetBundle, DatasetOptions, LabeledImages, create_dataset, partition, protocols
from ..data.subsample import subsample_classes
from ..federated import plan
from ..federated.client import Client, ClientData
from ..federated.graphs import resolve_cuda_graphs
from ..federated.prompt import PromptEncoder, initial_prompt, phrase_embedding
from ..federated.seeding import Stream, client_seed, stream
from ..model.clip import FrozenCLIP, load_clip, resolve_device
from ..model.compiled import CompiledPass
from ..model.features import encode_subset
from ..model.precision import autocast, check_precision
from ..ops import REFERENCE, OpTable
from . import feature_cache
from .feature_cache import FeatureCache

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.plan import Plugins


def split_clients(cfg: Config, bundle: DatasetBundle) -> list[partition.ClientSplit]:
    """The partition named by ``cfg.partition``, drawn from the run's partition stream."""
    rng = stream(cfg.seed, Stream.PARTITION)
    tr, te = bundle.train.labels, bundle.test.labels
    if cfg.partition == "pathological":
        return partition.pathological(tr, te, cfg.clients, cfg.shots, rng, num_classes=bundle.num_classes)
    if cfg.partition == "dirichlet":
        return partition.dirichlet(tr, te, cfg.clients, cfg.dirichlet_alpha, rng, cfg.min_client_size)
    if cfg.partition == "domain-dirichlet":
        if bundle.train.domains is None:
            raise ConfigError(f"partition=domain-dirichlet needs a dataset with domains; {bundle.name} has none")
        return partition.domain_dirichlet(
            tr,
            te,
            bundle.train.domains,
            bundle.test.domains,
            cfg.clients,
            cfg.dirichlet_alpha,
            rng,
            cfg.min_client_size,
        )
    if cfg.partition == "domain-shots":
        if bundle.train.domains is None:
            raise ConfigError(f"partition=domain-shots needs a dataset with domains; {bundle.name} has none")
        return partition.domain_shots(tr, te, bundle.train.domains, bundle.test.domains, cfg.clients, cfg.shots, rng)
    return partition.iid(tr, te, cfg.clients, rng)


@dataclass
class EvalSet:
    """A test set every client is scored on besides its own split (``--eval-split base2novel``: all base classes'
    test images over the base label space, all novel classes' over the novel one)."""

    name: str
    encoder: PromptEncoder  # over this set's label space
    features: torch.Tensor
    labels: torch.Tensor


def run_device(cfg: Config) -> torch.device:
    """The config's device, after the settings that depend on it (precision; CUDA graphs, which need CUDA) are
    checked: each mistake is one line, before anything is built."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    resolve_cuda_graphs(cfg.cuda_graphs, device)
    return device


def load_dataset(cfg: Config, name: str | None = None, **changes: Any) -> DatasetBundle:
    """The config's whole dataset (every client's images), from ``data_root`` or generated (synthetic); or, with
    ``name``, another dataset read with the config's root, sizes and data seed (``changes``: other options, e.g. a
    target's domains)."""
    options = DatasetOptions(
        root=cfg.data_root,
        domains=cfg.domains,
        train_per_class=cfg.train_per_class,
        test_per_class=cfg.test_per_class,
        seed=cfg.data_seed,
    )
    return create_dataset(name or cfg.dataset, dataclasses.replace(options, **changes))


class World:
    """The data side of a run. Cheap parts (labels, the partition, the encoder's frozen token embeddings) are built
    at once; a client's image features when :meth:`client_data` first asks for them."""

    def __init__(
        self,
        cfg: Config,
        ops: OpTable = REFERENCE,
        clip: FrozenCLIP | None = None,
        dataset: DatasetBundle | None = None,
        log: Callable[[str], None] | None = None,
        plugins: Plugins | None = None,
    ):
        self.cfg = cfg
        self.plugins = plugins = plugins or plan.plugins(cfg)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.device = run_device(cfg)
        # the data first: a missing dataset should fail before a model is loaded or pretrained
        full = self._loaded = dataset or load_dataset(cfg)
        if len(full.train) == 0:
            raise ConfigError(
                f"dataset={cfg.dataset} has no train split (an evaluation-only set); use it as a target: "
                "--eval-split cross-domain --eval-targets " + cfg.dataset
            )
        # --eval-split leave-one-domain-out: the clients are drawn from the other domains; the held-out one's images
        # are what every client is scored on (pfedmoap.data.protocols)
        self.held_out = None
        if cfg.eval_split == "leave-one-domain-out":
            if cfg.partition not in ("domain-shots", "domain-dirichlet"):
                raise ConfigError(
                    f"eval_split=leave-one-domain-out spreads clients over the training domains: use partition="
                    f"domain-shots or domain-dirichlet (got {cfg.partition})"
                )
            full, self.held_out = protocols.hold_out_domain(full, str(cfg.held_out_domain))
        # the target protocols' test sets are read now too: a missing or misnamed one fails before any work
        self._targets = [(t, self._load_target(t)) for t in self.targets()] if cfg.eval_split in TARGET_SPLITS else []
        self.full_dataset = full
        # --subsample: the label space clients see (CoOp's base-to-novel protocol trains on the base half)
        self.dataset = subsample_classes(full, cfg.subsample)
        self.clip = clip or load_clip(cfg.model, cfg.pretrained, self.device, progress=cfg.progress)
        method = plugins.method
        if method.uses_gate:
            plugins.gate.check_features(cfg, self.clip.embed_dim)
        # "local": the method scores the image's local features (FedOTP), so those are what the cache keeps
        self.local_features = method.image_features == "local"
        if self.local_features and self.clip.local_feature_kind is None:
            raise ConfigError(
                f"method={cfg.method} needs local image features, and model={cfg.model}'s image tower exposes "
                "none (valid: ModifiedResNet towers such as RN50 and pfedmoap-tiny, or ViTs)"
            )
        # "states": the method runs the image tower's upper blocks itself (pFedMMA), so the cache keeps each image's
        # token states entering its first adapted block
        self.states_from = method.states_block(cfg, self.clip) if method.image_features == "states" else None
        self.splits = split_clients(cfg, self.dataset)
        self.encoder = PromptEncoder(
            self.clip, self.dataset.classnames, cfg.n_ctx, mode=cfg.text_encoder, assemble=ops.assemble_prompts
        )
        if cfg.compile and self.encoder.mode == "shared-prefix":  # the training step's pass (pfedmoap.model.compiled)
            self.encoder.shared_prefix_pass = CompiledPass(self.encoder.shared_prefix_pass, self.log)
        phrase = phrase_embedding(self.clip, cfg.ctx_init) if cfg.ctx_init is not None else None
        self.init_prompt = initial_prompt(cfg, self.clip.width, phrase)  # P_g^0: the common start of every prompt
        self._data: dict[int, ClientData] = {}
        self.feature_cache = None
        if cfg.feature_cache is not None:
            if Path(cfg.feature_cache).exists() and not Path(cfg.feature_cache).is_dir():
                raise ConfigError(f"feature_cache={cfg.feature_cache!r} is a file; it must be a folder (or not exist)")
            self.feature_cache = FeatureCache(cfg.feature_cache, self.log)
        self._tower_fingerprint: str | None = None
        self._eval_sets: list[EvalSet] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.splits)

    @property
    def train_sizes(self) -> list[int]:
        """Training-set size of every client (FedAvg's weights), from the partition alone."""
        return [len(s.train) for s in self.splits]

    @property
    def built(self) -> list[int]:
        """The clients whose data this process has built (encoded) so far."""
        return sorted(self._data)

    def client_data(self, cid: int) -> ClientData:
        """Client ``cid``'s labels and frozen image features (encoded once, then kept)."""
        if not 0 <= cid < self.num_clients:
            raise ConfigError(f"client {cid} is outside 0..{self.num_clients - 1}")
        if cid not in self._data:
            self._data[cid] = self._cached(cid)
        return self._data[cid]

    def _cached(self, cid: int) -> ClientData:
        """Client ``cid``'s data from the feature cache when it holds them for exactly this client, else encoded
        (and stored there)."""
        cache, key = self.feature_cache, None
        if cache is not None:
            key = feature_cache.client_key(self._feature_parts(), self.splits[cid].train, self.splits[cid].test)
            stored = cache.load(cid, key)
            if stored is not None:
                return self._from_cache(cid, stored)
        with autocast(self.cfg.precision, self.device):  # the frozen image encoder's forward (features: fp32)
            data = self._encode(cid)
        if cache is not None:
            cache.store(cid, key, {"train_features": data.train_features, "test_features": data.test_features})
        return data

    def _feature_parts(self) -> dict[str, Any]:
        """What a client's features depend on besides its split (pfedmoap.engine.feature_cache)."""
        cfg = self.cfg
        if self._tower_fingerprint is None:
            self._tower_fingerprint = feature_cache.tower_fingerprint(self.clip.model.visual)
        return {
            "model": cfg.model,
            "tower": self._tower_fingerprint,
            "dataset": self.full_dataset.name,
            "data_root": cfg.data_root,
            "domains": cfg.domains,
            "train_per_class": cfg.train_per_class,
            "test_per_class": cfg.test_per_class,
            "data_seed": cfg.data_seed,
            "subsample": cfg.subsample,
            **({} if self.held_out is None else {"held_out_domain": cfg.held_out_domain}),
            "images": [len(self.dataset.train), len(self.dataset.test)],
            "image_size": self.clip.image_size,
            "precision": cfg.precision,
            "local_features": self.local_features,
            "augment": cfg.augment,
            **({} if self.states_from is None else {"states_from": self.states_from}),
        }

    def _encode(self, cid: int) -> ClientData:
        cfg, data, split = self.cfg, self.dataset, self.splits[cid]
        batch = cfg.eval_batch_size
        # the frozen image encoder runs once per image; with augmentation, train features are per batch
        kind = {"local": self.local_features, "states_from": self.states_from}
        train_features = None if cfg.augment else encode_subset(self.clip, data.train, split.train, batch, **kind)
        test_features = encode_subset(self.clip, data.test, split.test, batch, **kind)
        return self._client_data(cid, train_features, test_features)

    def _from_cache(self, cid: int, stored: dict[str, torch.Tensor | None]) -> ClientData:
        train, test = stored["train_features"], stored["test_features"]
        assert test is not None  # the checksum covers what store() wrote
        return self._client_data(cid, None if train is None else train.to(self.device), test.to(self.device))

    def _client_data(self, cid: int, train_features: torch.Tensor | None, test_features: torch.Tensor) -> ClientData:
        data, split = self.dataset, self.splits[cid]
        images = None
        if self.cfg.augment:
            imgs = data.train.images
            images = (
                imgs[torch.as_tensor(split.train)]
                if isinstance(imgs, torch.Tensor)
                else torch.stack([imgs[int(i)] for i in split.train])
            )
        return ClientData(
            train_labels=torch.as_tensor(data.train.labels[split.train], dtype=torch.long),
            test_labels=torch.as_tensor(data.test.labels[split.test], dtype=torch.long),
            test_features=test_features,
            train_features=train_features,
            train_images=images,
            local_features=self.local_features,
            states_from=self.states_from,
        )

    def new_client(self, cid: int) -> Client:
        """A fresh client ``cid`` (its own seed, no state yet) over its data."""
        return Client(cid, self.client_data(cid), client_seed(self.cfg.seed, cid))

    def new_clients(self, progress: bool = False) -> list[Client]:
        """Every client, fresh; encodes all their images."""
        ids = tqdm(range(self.num_clients), desc="image features", disable=not progress, leave=False)
        return [self.new_client(cid) for cid in ids]

    def zero_shot_text(self) -> torch.Tensor:
        """The handcrafted "a photo of a {class}." text features (computed once)."""
        return self.encoder.zero_shot()

    def eval_sets(self) -> list[EvalSet]:
        """The shared evaluation sets of ``cfg.eval_split`` (none for "local"), encoded once on first use."""
        if self._eval_sets is None:
            self._eval_sets = []
            split = self.cfg.eval_split
            if split == "base2novel":
                novel = subsample_classes(self.full_dataset, "new")
                self._eval_sets = [
                    self._eval_set("base", self.encoder, self.dataset.test),
                    self._eval_set("novel", self._encoder_for(novel.classnames), novel.test),
                ]
            elif split == "leave-one-domain-out":
                assert self.held_out is not None
                self._eval_sets = [self._eval_set(str(self.cfg.held_out_domain), self.encoder, self.held_out)]
            elif split in TARGET_SPLITS:
                self._eval_sets = [self._target_set(t, bundle) for t, bundle in self._targets]
        return self._eval_sets

    def targets(self) -> list[protocols.Target]:
        """The target test sets of ``--eval-split cross-dataset / cross-domain`` (the protocol's default for the
        dataset unless ``--eval-targets`` names them)."""
        cfg = self.cfg
        specs = cfg.eval_targets or protocols.default_targets(
            cfg.eval_split, cfg.dataset, cfg.domains, self._loaded.domain_names
        )
        targets = [protocols.parse_target(spec) for spec in specs]
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ConfigError(f"eval_targets={names} names a target twice")
        return targets

    def _load_target(self, target: protocols.Target) -> DatasetBundle:
        # only the target's test split is read: its builder need only make one train image per class
        bundle = load_dataset(self.cfg, target.dataset, domains=target.domains, train_per_class=1)
        if len(bundle.test) == 0:
            raise ConfigError(f"eval target {target.name!r} has no test images")
        return bundle

    def _target_set(self, target: protocols.Target, bundle: DatasetBundle) -> EvalSet:
        # the same class names in the same order: the run's own label space, and its text features are shared
        same = bundle.classnames == self.dataset.classnames
        return self._eval_set(target.name, self.encoder if same else self._encoder_for(bundle.classnames), bundle.test)

    def _encoder_for(self, classnames: list[str]) -> PromptEncoder:
        cfg = self.cfg
        return PromptEncoder(
            self.clip, classnames, cfg.n_ctx, mode=cfg.text_encoder, assemble=self.encoder.assemble_prompts
        )

    def _eval_set(self, name: str, encoder: PromptEncoder, images: LabeledImages) -> EvalSet:
        rows = np.arange(len(images))
        with autocast(self.cfg.precision, self.device):
            feats = encode_subset(
                self.clip,
                images,
                rows,
                self.cfg.eval_batch_size,
                local=self.local_features,
                states_from=self.states_from,
            )
        return EvalSet(name, encoder, feats, torch.as_tensor(images.labels, dtype=torch.long))
