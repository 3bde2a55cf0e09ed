"""Typed run configuration and named presets.

A run is fully described by one :class:`Config`; the CLI fills it from a preset (a JSON file in
``pfedmoap/presets/``) plus flags, and saves the resolved object as ``config.json`` in the run directory.
Every default below is the paper's setting (SPEC §1-2) unless its comment says otherwise.

The config holds the knobs every run shares. A method's, a gate's or an expert-selection rule's own settings
(``fedprox_mu``, ``d_gate``, ...) are declared in the plug-in's file (:mod:`pfedmoap.config.settings`) and kept in
:attr:`Config.settings` under their flat names; :func:`~pfedmoap.federated.plan.resolve_config` checks them
with the plug-ins.
This module imports no plug-in and no torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..base.errors import ConfigError
from ..base.files import read_json

PARTITIONS = ("pathological", "dirichlet", "domain-dirichlet", "domain-shots", "iid")
GATE_SHARINGS = ("private", "aggregated")
POOL_VIEWS = ("snapshot", "live")
TEXT_ENCODERS = ("full", "truncated", "shared-prefix")
COMM_DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SUBSAMPLES = ("all", "base", "new")  # CoOp's subsample_classes: every class, the base half, the novel half
# what is scored besides each client's own test split (docs/protocols/): nothing; base and novel classes; other
# datasets' test sets (their own class names); the same classes in other domains; a domain held out of training
EVAL_SPLITS = ("local", "base2novel", "cross-dataset", "cross-domain", "leave-one-domain-out")
TARGET_SPLITS = ("cross-dataset", "cross-domain")  # the protocols that score --eval-targets
# the protocols that also score the federation's global model on their shared sets (Method.global_scorer)
GLOBAL_SCORED_SPLITS = (*TARGET_SPLITS, "leave-one-domain-out")
PRECISIONS = ("fp32", "bf16")  # pfedmoap.model.precision
CUDA_GRAPHS = ("auto", "on", "off")  # pfedmoap.federated.graphs
MAX_SEED = 2**32 - 1  # numpy and torch generators both take it; per-client seeds derive from it without overflow


@dataclass
class Config:
    """Everything one federated run needs; same config + seed = same numbers on CPU."""

    # --- what to run
    method: str = "pfedmoap"
    dataset: str = "synthetic"
    data_root: str | None = None  # folder with real datasets (not used by the synthetic world)
    model: str = "pfedmoap-tiny"  # an open_clip architecture name
    # "synthetic" = the tiny model pretrained on the synthetic world (cached), "none" = random weights,
    # an open_clip pretrained tag (e.g. "openai"), or a path to a weights file.
    pretrained: str = "synthetic"

    # --- data and partition
    partition: str = "pathological"
    clients: int = 10
    shots: int = 16  # training images per class for the pathological split (0 = all)
    dirichlet_alpha: float = 0.5
    min_client_size: int = 10  # Dirichlet splits are redrawn until every client has this many train images
    domains: list[str] | None = None  # dataset domains to use (synthetic world: styles); None = dataset default
    train_per_class: int = 64  # synthetic world only: images generated per class and domain
    test_per_class: int = 50  # synthetic world only
    data_seed: int = 0  # fixes the generated data; the partition follows `seed`
    augment: bool = False  # random crop + flip; image features are then recomputed every batch
    # a folder where each client's frozen image features are kept between processes (pfedmoap.engine.feature_cache);
    # None: encoded in memory each time
    feature_cache: str | None = None
    # base-to-novel (CoOp's protocol, not in the pFedMoAP paper): the classes clients see, and what is evaluated.
    # "base" keeps the first ceil(C / 2) labels (the partition runs over them); "new" the rest (evaluation only)
    subsample: str = "all"
    # "local": each client on its own test split; "base2novel": also every client on all base classes' test
    # images (base label space) and all novel classes' (novel label space); needs subsample="base"
    eval_split: str = "local"
    # cross-dataset / cross-domain: the target test sets, each "DATASET" or "DATASET:DOMAIN+DOMAIN" (None: the
    # protocol's default for the dataset, pfedmoap.data.protocols.default_targets)
    eval_targets: list[str] | None = None
    # leave-one-domain-out: the domain of `domains` that no client trains on; every client is scored on all its images
    held_out_domain: str | None = None

    # --- federation
    frac: float = 1.0
    rounds: int = 10
    local_epochs: int = 5
    batch_size: int = 16

    # --- reliability
    client_dropout: float = 0.0  # probability that a sampled client fails mid-round (simulated)
    max_prompt_norm: float | None = None  # uploads with a larger L2 norm are refused (None: no bound)

    # --- differential privacy on uploads (off when dp_epsilon is None)
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # L2 bound on a client's prompt update P_i - P_g before noise

    # --- prompt
    n_ctx: int = 16
    ctx_init_std: float = 0.02
    # CoOp's context initialisation from a phrase (e.g. "a photo of a"): its token embeddings become the last
    # context vectors of P_g^0 (n_ctx = its token count is CoOp's form; more pads with random vectors in front).
    # None: random N(0, ctx_init_std^2), the paper's default
    ctx_init: str | None = None
    # all three give the same features: "full" runs all context_length tokens, "truncated" stops at the
    # longest EOT, "shared-prefix" also computes [SOS] + context once per expert instead of once per class
    text_encoder: str = "shared-prefix"

    # --- pFedMoAP
    experts: int = 9  # K non-local experts (the gate sees K + 1)
    # a registered gate (pfedmoap.gates): attention (the paper's) or linear (ablation); its width, heads, score
    # scaling, reduction, lambda and learning rate are the gates' own settings (pfedmoap/gates/base.py)
    gate: str = "attention"
    expert_selection: str = "knn"  # a registered rule (pfedmoap.federated.selection): knn, random, fixed
    # private: each client's gate stays home (paper); aggregated: FedAvg'd across the round's participants (the
    # paper's ablation); None: the method's own (pfedmoap: private, pfedmoap-shared-gate: aggregated)
    gate_sharing: str | None = None
    pool_view: str = "snapshot"  # "live" reproduces the reference code's mid-round pool mutation
    # how many sampled clients train in lock step, sharing each step's text-encoder pass (at least the sampled
    # count: the whole round); None: the device's default (CUDA: all, CPU: 1). Needs the snapshot pool.
    parallel_clients: int | None = None

    # --- optimisation (SGD, fresh per client per round)
    lr_prompt: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4

    # --- system
    seed: int = 1
    device: str = "auto"
    threads: int | None = None
    fused: bool = False
    # fp32, or bf16: autocast of the frozen encoders' forward and the training step, fp32 master prompt and gate
    # (pfedmoap.model.precision)
    precision: str = "fp32"
    # CUDA graphs of the fixed-shape training step (pfedmoap.federated.graphs): auto = on CUDA, on (CUDA only), off
    cuda_graphs: str = "auto"
    # torch.compile the training step's text-encoder pass (pfedmoap.model.compiled); off by default: on the CPU a
    # step ran 1.04-1.25x faster after a 47-67 s compile per shape, so the default run took 3.6x longer end to end
    # (profiling/RESULTS.md); no GPU has measured it yet
    compile: bool = False
    comm_dtype: str = "float32"  # dtype of prompts on the wire
    eval_batch_size: int = 512
    progress: bool = True
    tensorboard: bool = False  # also log every round to RUN_DIR/tensorboard (pip install 'pfedmoap[tensorboard]')
    out: str | None = None
    preset: str | None = None  # the preset this config started from (informational)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run
    # the plug-ins' own settings by flat name (fedprox_mu, d_gate, ...): declared in their files, checked and
    # completed with their defaults by pfedmoap.federated.plan.resolve_config; saved flat in config.json
    settings: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def __getattr__(self, name: str) -> Any:
        # a plug-in setting read as an attribute (cfg.fedprox_mu): how configs were read before plug-ins owned
        # their settings; a plug-in reads its own with Setting.of(cfg)
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def shared_fields(cls) -> tuple[str, ...]:
        """The names of the shared knobs, in declaration order (every field but :attr:`settings`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "settings")

    def to_dict(self) -> dict[str, Any]:
        """The config as one flat JSON object (``config.json``): the shared fields and every plug-in setting."""
        data = dataclasses.asdict(self)
        settings = data.pop("settings")
        return {**data, **settings}

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = "config", plugin_settings: Collection[str] | None = None
    ) -> Config:
        """A config from a flat object (:meth:`to_dict`'s form, a preset's, keyword overrides). Keys that are not
        shared fields are plug-in settings; with ``plugin_settings`` (the names the plug-ins declare) any other
        key is refused here (pfedmoap.federated.plan.config_from_dict passes them)."""
        fields = set(cls.shared_fields())
        given = dict(data)
        nested = given.pop("settings", None) or {}
        if not isinstance(nested, dict):
            raise ConfigError(f"{source}: settings must be an object of plug-in settings, not {nested!r}")
        rest = {**nested, **{k: v for k, v in given.items() if k not in fields}}
        if plugin_settings is not None:
            unknown = sorted(set(rest) - set(plugin_settings))
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in given.items() if k in fields}, settings=rest)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes``: shared fields and plug-in settings alike, by their flat names."""
        fields = set(self.shared_fields())
        settings = {**self.settings, **changes.pop("settings", {})}
        settings.update({k: changes.pop(k) for k in list(changes) if k not in fields})
        return dataclasses.replace(self, **changes, settings=settings)

    def validate(self) -> Config:
        """Check every shared value; raise :class:`ConfigError` with one line naming the first bad one. The
        plug-ins and their settings are checked by :func:`pfedmoap.federated.plan.resolve_config`, which calls this."""
        _choice("partition", self.partition, PARTITIONS)
        if self.gate_sharing is not None:
            _choice("gate_sharing", self.gate_sharing, GATE_SHARINGS)
        _choice("pool_view", self.pool_view, POOL_VIEWS)
        _choice("text_encoder", self.text_encoder, TEXT_ENCODERS)
        _choice("comm_dtype", self.comm_dtype, COMM_DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        _choice("subsample", self.subsample, SUBSAMPLES)
        _choice("eval_split", self.eval_split, EVAL_SPLITS)
        if self.eval_split == "base2novel" and self.subsample != "base":
            raise ConfigError(
                f"eval_split=base2novel needs subsample=base (got {self.subsample}): the novel classes must stay "
                "unseen in training"
            )
        if self.eval_split in TARGET_SPLITS:
            if self.eval_targets is not None and (
                not isinstance(self.eval_targets, list)
                or not self.eval_targets
                or not all(isinstance(t, str) and t.strip() for t in self.eval_targets)
            ):
                raise ConfigError(
                    f"eval_targets={self.eval_targets!r} must be a non-empty list of DATASET or DATASET:DOMAIN+DOMAIN"
                )
        elif self.eval_targets is not None:
            raise ConfigError(
                f"eval_targets is for eval_split={' or '.join(TARGET_SPLITS)} (got eval_split={self.eval_split})"
            )
        if self.eval_split == "leave-one-domain-out":
            if not isinstance(self.held_out_domain, str) or not self.held_out_domain:
                raise ConfigError("eval_split=leave-one-domain-out needs held_out_domain (one of the run's domains)")
        elif self.held_out_domain is not None:
            raise ConfigError(
                f"held_out_domain={self.held_out_domain!r} is for eval_split=leave-one-domain-out "
                f"(got eval_split={self.eval_split})"
            )
        if self.eval_split in GLOBAL_SCORED_SPLITS and self.subsample != "all":  # the three target protocols
            raise ConfigError(f"eval_split={self.eval_split} trains on every class (got subsample={self.subsample})")
        _at_least("clients", self.clients, 1, MAX_CLIENTS)
        _at_least("rounds", self.rounds, 1)
        _at_least("local_epochs", self.local_epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("n_ctx", self.n_ctx, 1)
        _at_least("experts", self.experts, 0)
        _at_least("shots", self.shots, 0)
        _at_least("train_per_class", self.train_per_class, 1, MAX_PER_CLASS)
        _at_least("test_per_class", self.test_per_class, 1, MAX_PER_CLASS)
        _at_least("min_client_size", self.min_client_size, 0)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
                raise ConfigError(f"{name}={value!r} must be an integer in 0..{MAX_SEED}")
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        if self.parallel_clients is not None:
            _at_least("parallel_clients", self.parallel_clients, 1)
            if self.parallel_clients != 1 and self.pool_view == "live":
                raise ConfigError(
                    f"parallel_clients={self.parallel_clients} needs pool_view=snapshot: with the live pool each "
                    "client sees the uploads of the clients before it, so they cannot train together (use 1)"
                )
        if not (0.0 <= self.client_dropout < 1.0):
            raise ConfigError(f"client_dropout={self.client_dropout} is outside [0, 1)")
        if self.max_prompt_norm is not None and not (self.max_prompt_norm > 0 and math.isfinite(self.max_prompt_norm)):
            raise ConfigError(f"max_prompt_norm={self.max_prompt_norm} must be a positive number")
        if self.dp_epsilon is not None:
            if not (self.dp_epsilon > 0 and math.isfinite(self.dp_epsilon)):
                raise ConfigError(f"dp_epsilon={self.dp_epsilon} must be a positive number")
            if not (0.0 < self.dp_delta < 1.0):
                raise ConfigError(f"dp_delta={self.dp_delta} is outside (0, 1)")
            if not (self.dp_clip > 0 and math.isfinite(self.dp_clip)):
                raise ConfigError(f"dp_clip={self.dp_clip} must be a positive number")
        if not (0.0 < self.frac <= 1.0):
            raise ConfigError(f"frac={self.frac} is outside (0, 1]")
        if not (self.lr_prompt > 0 and math.isfinite(self.lr_prompt)):
            raise ConfigError(f"lr_prompt={self.lr_prompt} must be a positive number")
        for name in ("momentum", "weight_decay", "ctx_init_std"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name}={value} must be a non-negative number")
        if self.ctx_init is not None and (not isinstance(self.ctx_init, str) or not self.ctx_init.strip()):
            raise ConfigError(f"ctx_init={self.ctx_init!r} must be a non-empty phrase, e.g. 'a photo of a'")
        if not (self.dirichlet_alpha > 0):
            raise ConfigError(f"dirichlet_alpha={self.dirichlet_alpha} must be positive")
        return self


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(valid)}")


def _at_least(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        valid = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{name}={value!r} must be an integer {valid}")


# sizes past which one process would only run out of memory (the synthetic world's images are generated up front;
# every simulated client holds its own state)
MAX_PER_CLASS = 10_000
MAX_CLIENTS = 100_000

# ---------------------------------------------------------------------------------------------- presets
DEFAULT_PRESET = "synthetic"


def list_presets() -> list[str]:
    """Names of the presets shipped in ``pfedmoap/presets/``."""
    return sorted(p.name[: -len(".json")] for p in presets_dir().iterdir() if p.name.endswith(".json"))


def presets_dir() -> Path:
    """The folder of the shipped presets."""
    return Path(str(resources.files("pfedmoap") / "presets"))


def load_preset(name: str) -> dict[str, Any]:
    """The overrides a preset applies on top of :class:`Config` defaults."""
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"preset={name!r} is not one of: {', '.join(presets)}")
    data = _read_preset(name)
    data.pop("description", None)
    return data


def preset_description(name: str) -> str:
    return str(_read_preset(name).get("description", ""))


def _read_preset(name: str) -> dict[str, Any]:
    """A shipped preset file as a JSON object; a damaged one (a broken install, an edit gone wrong) is one line."""
    return read_json(presets_dir() / f"{name}.json", "preset file")
