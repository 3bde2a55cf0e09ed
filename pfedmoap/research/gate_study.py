"""The attention gate against a linear gate outside federated learning: a centralised, leave-one-domain-out study.

pFedMoAP's gate mixes K+1 prompts that other clients trained. Whether the attention gate beats a linear router
because of what it computes, or because of how federated training feeds it, cannot be told from federated runs
alone. This study removes the federation and keeps the mixing problem:

1. Sources are all domains but one held-out target. K prompts (CoOp: a learned context, cross-entropy over all
   class names) are trained, each on one source domain's train split, plus one prompt on all sources pooled: K+1
   prompts, all from the same initial context P_g^0 of the seed (as every pFedMoAP prompt starts from P_g). They
   are then frozen.
2. On the held-out domain, ``target_shots`` labelled images per class (from its train split) train a gate that
   mixes the K+1 prompts' text features per image: the attention gate, the linear gate and the average gate of
   :mod:`pfedmoap.gates`, built from the study's config so that d_gate, heads, attn_scale, reduction and lr_gate
   are the federated runs' own (their :class:`~pfedmoap.config.settings.Setting` declarations, the preset's
   values where it sets them). Every gate sees the same shots in the same batch order from the same seed.
3. Everything is scored on the held-out domain's test split, next to baselines that need no gate: zero-shot CLIP
   ("a photo of a {}."), the pooled prompt alone, the uniform average of the K+1 prompts' text features, the best
   single-source prompt chosen on the target shots (only the shots: the test split is never read to choose) and,
   marked as an oracle, the best single-source prompt chosen on the test split.

**Expert order, local logits and lambda.** pFedMoAP puts the client's own prompt in slot 0 and adds
``lam * l_loc`` (its logits) to the mixture. Here the pooled-sources prompt takes slot 0 (the one prompt trained on
everything the learner has, as a client's own prompt is), then the single-source prompts in domain order. No
prompt is trained on the target, so there are no local logits: by default ``lam = 0`` and ``local_logits=None``
(the paper's lambda = 0 variant), and the gates differ only in how they weight the K+1 frozen experts. An extra
``lam * l_pooled`` term would give one expert a fixed head start that only the gate should decide. Setting
``lam`` > 0 (``--set lam=0.5``) uses the pooled prompt's logits as ``l_loc``, pFedMoAP's form with the pooled
prompt as the local one; the identity below then no longer holds.

**A control.** The attention gate over the pooled prompt alone (E = 1) is scored too: with one expert its softmax is
1 whatever W_Q and W_K say, so what remains is its value and output maps, a learned d x d transform of the text
features. It tells how much of the attention gate's score needs a mixture at all.

**An exact identity.** The average gate at initialisation (zero logits, softmax = 1 / (K+1)) scores
``gamma * <i, mean_e t_e^c>``, which is the uniform-average baseline: its row is the untrained average gate, and the
average gate's row shows what training K+1 numbers on the shots adds.

**Determinism.** Everything follows from the seed through the library's streams: P_g^0 from
:func:`~pfedmoap.federated.seeding.prompt_generator`; which target images are the labelled shots from
``Stream.PARTITION`` (the stream that decides which images a learner gets), drawn for every domain in domain
order; each trained thing is a :class:`~pfedmoap.federated.client.Client` with its own seed
(:func:`~pfedmoap.federated.seeding.client_seed`) for its batch order and gate initialisation, with ids laid out
as ``j`` the single-source prompt of domain j, ``n + t`` the pooled prompt for target t, ``2n + t`` the gates on
target t (n domains). A single-source prompt depends on the seed and its domain only, so it is trained once per
seed and reused by every target it is a source for. No stream was added.

The command is ``python -m pfedmoap.experiments --study gate-outside-fl --out DIR``; it writes
``DIR/gate_study.md`` and ``DIR/gate_study.json``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base.errors import ConfigError
from ..base.files import replacing
from ..config import Config
from ..data import DatasetBundle
from ..engine.records import seed_stats
from ..engine.world import load_dataset
from ..federated.client import Client, ClientData, TrainSettings, accuracy
from ..federated.objective import Objective
from ..federated.plan import make_config
from ..federated.prompt import PromptEncoder, initial_prompt, phrase_embedding
from ..federated.registry import gate_class
from ..federated.seeding import Stream, client_seed, stream
from ..gates.attention import ATTN_SCALE, HEADS
from ..gates.base import D_GATE, LR_GATE, REDUCTION
from ..methods.base import PromptObjective
from ..model.clip import FrozenCLIP, load_clip, resolve_device
from ..model.features import encode_subset

STUDY = "gate-outside-fl"
STUDIES = (STUDY,)
GATES = ("attention", "linear", "average")

# table rows in order: key -> label
ROWS: dict[str, str] = {
    "zeroshot": 'Zero-shot CLIP ("a photo of a {}.")',
    "pooled": "Pooled-sources prompt alone",
    "uniform": "Uniform average of the K+1 prompts (no training)",
    "best-source": "Best single-source prompt, chosen on the target shots",
    "oracle-source": "Best single-source prompt, chosen on the test set (oracle)",
    "gate-attention": "Attention gate (trained on the target shots)",
    "gate-linear": "Linear gate (trained on the target shots)",
    "gate-average": "Average gate (trained on the target shots)",
    "attention-pooled": "Control: attention gate over the pooled prompt alone (E = 1, no mixing)",
}

# the synthetic world the study runs on by default: the domain preset's 4 styles (2 seen in the tiny CLIP's
# pretraining, 2 not), its model, sizes and gate width; a larger test split for steadier accuracies
SYNTHETIC_PRESET = "synthetic-domains"
SYNTHETIC_SET = {"test_per_class": 50}
# a real domain dataset (pacs, office-home, ...): the paper's backbone for its domain datasets and the method's
# default gate width
REAL_SET = {"model": "ViT-B-16", "pretrained": "openai", "batch_size": 32}
# config fields the study sets itself (a --set of them is refused: use the command's own flag)
_OWN_FIELDS = {"seed": "--seeds", "dataset": "--dataset", "data_root": "--data-root"}


@dataclass(frozen=True)
class StudySettings:
    """What the study adds to a run's config. ``prompt_epochs``: CoOp epochs over each prompt's train images
    (a source domain's, or all sources' for the pooled one). ``gate_epochs``: epochs over the target shots. With 4
    shots of 40 classes and batch 32 that is 5 steps an epoch, so 50 epochs are 250 SGD steps at lr_gate, about
    what a federated client's gate gets in the domain preset's 15 rounds (5 local epochs each round it is
    sampled, ~7 of them, on ~200 images). ``lam``: see the module's docstring (0: no local logits)."""

    target_shots: int = 4
    prompt_epochs: int = 20
    gate_epochs: int = 50
    lam: float = 0.0

    def check(self) -> StudySettings:
        for name in ("target_shots", "prompt_epochs", "gate_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.lam, (int, float)) or isinstance(self.lam, bool) or not 0.0 <= self.lam < 1e6:
            raise ConfigError(f"lam={self.lam!r} must be a non-negative number")
        return self


STUDY_KEYS = tuple(f.name for f in dataclasses.fields(StudySettings))


def study_config(
    dataset: str = "synthetic", data_root: str | None = None, overrides: dict[str, Any] | None = None
) -> tuple[Config, StudySettings]:
    """The study's config (checked, plug-in settings filled in) and its own settings, from the dataset and
    ``--set`` overrides: the study's keys (``target_shots``, ``prompt_epochs``, ``gate_epochs``, ``lam``) go to
    :class:`StudySettings`, the rest to the config (``domains``, ``d_gate``, ``lr_gate``, ``model``, ...)."""
    given = dict(overrides or {})
    for key, flag in _OWN_FIELDS.items():
        if key in given:
            raise ConfigError(f"--set {key}=... does not apply to the study: use {flag}")
    own = {k: given.pop(k) for k in STUDY_KEYS if k in given}
    settings = StudySettings(**own).check()
    if dataset == "synthetic":
        if data_root is not None:
            raise ConfigError("--data-root does not apply to --dataset synthetic (it is generated)")
        cfg = make_config(SYNTHETIC_PRESET, **{**SYNTHETIC_SET, **given})
    else:
        cfg = make_config(None, **{**REAL_SET, **given, "dataset": dataset, "data_root": data_root})
    return cfg, settings


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Domain:
    """One domain of the dataset: its id in ``LabeledImages.domains`` and its name."""

    id: int
    name: str


def study_domains(bundle: DatasetBundle) -> list[Domain]:
    """The dataset's domains that hold images, in ``domain_names`` order, with the ids their rows carry
    (:meth:`DatasetBundle.domain_id`: positions, or the synthetic world's style indices); rows whose ids match no
    domain are refused."""
    if bundle.train.domains is None or bundle.test.domains is None or not bundle.domain_names:
        raise ConfigError(f"dataset={bundle.name} has no domains: the study needs a dataset with domains")
    names = list(bundle.domain_names)
    ids = [bundle.domain_id(n) for n in names]
    present = set(np.unique(np.concatenate([bundle.train.domains, bundle.test.domains])).tolist())
    if not present <= set(ids):
        raise ConfigError(
            f"dataset={bundle.name}: its rows' domain ids {sorted(present)} do not match its domains {names}"
        )
    domains = [Domain(i, n) for i, n in zip(ids, names, strict=True) if i in present]
    if len(domains) < 3:
        shown = ", ".join(d.name for d in domains)
        raise ConfigError(
            f"dataset={bundle.name} has {len(domains)} domain(s) ({shown}): leave-one-domain-out with a pooled "
            "prompt apart from the single-source ones needs at least 3 (set domains=[...] to 3 or more)"
        )
    return domains


def draw_shots(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of ``shots`` images per class (all of a class's images when it has fewer), classes in label
    order, each class's rows in a random order: which of the target's train images are labelled."""
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        picked.append(rng.permutation(rows)[:shots])
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


@dataclass
class DomainFeatures:
    """One domain's frozen image features (L2-normalised) and labels, train and test."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class TargetData:
    """What a held-out domain offers: its labelled shots (to train gates and choose a source) and its test split
    (to score)."""

    shot_features: torch.Tensor
    shot_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor


def domain_features(clip: FrozenCLIP, bundle: DatasetBundle, domain: Domain, batch_size: int) -> DomainFeatures:
    """Encode one domain's images once (every seed and target reuses them)."""
    out = []
    for split in (bundle.train, bundle.test):
        rows = np.flatnonzero(split.domains == domain.id)
        feats = encode_subset(clip, split, rows, batch_size)
        out += [feats, torch.as_tensor(split.labels[rows], dtype=torch.long, device=feats.device)]
    return DomainFeatures(*out)


# ---------------------------------------------------------------------------------------------- training


def _learner(cid: int, seed: int, features: torch.Tensor, labels: torch.Tensor) -> Client:
    """A client holding one training set: the library's SGD loop with its own generator (batch order) and seed (a
    gate's initialisation). It has no test split: the study scores outside it."""
    empty = features[:0]
    data = ClientData(train_labels=labels, test_labels=labels[:0], test_features=empty, train_features=features)
    return Client(cid, data, seed)


def train_settings(cfg: Config, epochs: int) -> TrainSettings:
    """The federated runs' SGD (momentum, weight decay, batch size), for ``epochs`` epochs, in float32."""
    return TrainSettings(epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay)


def train_prompt(
    encoder: PromptEncoder,
    cfg: Config,
    start: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    epochs: int,
    cid: int = 0,
) -> torch.Tensor:
    """CoOp on (features, labels) from the context ``start``: the library's prompt objective and loop, lr_prompt."""
    objective = PromptObjective(encoder, start, cfg.lr_prompt)
    _learner(cid, seed, features, labels).train(objective, train_settings(cfg, epochs), encoder.clip)
    return objective.prompt.detach()


class GateObjective(Objective):
    """Trains a gate alone over frozen experts: cross-entropy of ``gate(image, experts, ...)`` (+ ``lam`` times the
    slot-0 expert's logits when ``lam`` > 0). No prompt is trained, so there is no text pass per step."""

    def __init__(self, gate: nn.Module, experts: torch.Tensor, gamma: float, lam: float, lr_gate: float):
        self.gate, self.experts, self.gamma, self.lam, self.lr_gate = gate, experts, gamma, lam, lr_gate

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.gate.parameters()), "lr": self.lr_gate}]

    def logits(self, features: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gate's logits [B, C] (and weights [B, C, E]) for image features [B, D]."""
        local = self.gamma * features @ self.experts[0].t() if self.lam else None
        return self.gate(
            features, self.experts, gamma=self.gamma, local_logits=local, lam=self.lam, need_weights=need_weights
        )

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features)[0], labels)

    def begin(self) -> None:
        self.gate.train()

    def end(self) -> None:
        self.gate.eval()


@dataclass
class GateResult:
    """A trained gate's objective and its mean cross-entropy on the shots before and after training."""

    objective: GateObjective
    loss_before: float
    loss_after: float


def train_gate(
    kind: str,
    cfg: Config,
    clip: FrozenCLIP,
    experts: torch.Tensor,
    shot_features: torch.Tensor,
    shot_labels: torch.Tensor,
    seed: int,
    settings: StudySettings,
    cid: int = 0,
) -> GateResult:
    """A fresh gate of kind ``kind`` (attention, linear, average) with the config's settings and K+1 slots,
    initialised from ``seed`` and trained on the shots for ``settings.gate_epochs`` epochs (batches in the order
    of ``seed``'s generator: the same for every kind)."""
    gcfg = cfg.replace(experts=experts.shape[0] - 1)
    learner = _learner(cid, seed, shot_features, shot_labels)
    gate = learner.ensure_gate(lambda: gate_class(kind).from_config(gcfg), experts.device)
    gate.eval()
    objective = GateObjective(gate, experts, clip.gamma, settings.lam, LR_GATE.of(cfg))
    before = shot_loss(objective, shot_features, shot_labels)
    learner.train(objective, train_settings(cfg, settings.gate_epochs), clip)
    return GateResult(objective, before, shot_loss(objective, shot_features, shot_labels))


@torch.no_grad()
def shot_loss(objective: GateObjective, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of the gate (eval mode) on all of (features, labels)."""
    return float(F.cross_entropy(objective.logits(features)[0], labels))


# ---------------------------------------------------------------------------------------------- scoring


def _text_scorer(gamma: float, text: torch.Tensor) -> Callable[[torch.Tensor, bool], tuple[torch.Tensor, None]]:
    def score(features: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, None]:
        return gamma * features @ text.t(), None

    return score


def text_accuracy(text: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, gamma: float) -> float:
    """Accuracy (%) of the classifier gamma * <i, t_c> with text features [C, D]."""
    return accuracy(_text_scorer(gamma, text), features, labels)[0]


@torch.no_grad()
def pick_prompt(texts: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, gamma: float) -> int:
    """The index of the best of the prompts' text features [P, C, D] on (features, labels): highest accuracy, then
    lowest mean cross-entropy, then the lowest index. Called with the target shots to choose a source (and with
    the test split only for the oracle row)."""
    logits = gamma * torch.einsum("nd,pcd->pnc", features, texts)
    correct = (logits.argmax(-1) == labels).float().mean(1)
    losses = torch.stack([F.cross_entropy(row, labels) for row in logits])
    keys = [(-float(a), float(v), i) for i, (a, v) in enumerate(zip(correct, losses, strict=True))]
    return min(keys)[2]


def evaluate_target(
    cfg: Config,
    settings: StudySettings,
    clip: FrozenCLIP,
    experts: torch.Tensor,
    zero_shot: torch.Tensor,
    target: TargetData,
    seed: int,
    cid: int = 0,
) -> dict[str, Any]:
    """Every row of the table for one held-out domain and seed. ``experts`` [K+1, C, D]: the pooled prompt's text
    features, then the K single-source prompts'. The source choice reads only ``target``'s shots."""
    gamma = clip.gamma
    shots, shot_labels = target.shot_features, target.shot_labels
    test, test_labels = target.test_features, target.test_labels
    sources = experts[1:]
    chosen = pick_prompt(sources, shots, shot_labels, gamma)
    oracle = pick_prompt(sources, test, test_labels, gamma)
    source_acc = [text_accuracy(t, test, test_labels, gamma) for t in sources]
    acc = {
        "zeroshot": text_accuracy(zero_shot, test, test_labels, gamma),
        "pooled": text_accuracy(experts[0], test, test_labels, gamma),
        "uniform": text_accuracy(experts.mean(0), test, test_labels, gamma),
        "best-source": source_acc[chosen],
        "oracle-source": source_acc[oracle],
    }
    gates = {}
    for kind in GATES:
        result = train_gate(kind, cfg, clip, experts, shots, shot_labels, seed, settings, cid)
        acc[f"gate-{kind}"], weights = accuracy(result.objective.logits, test, test_labels, weights=True)
        gates[kind] = {"loss_before": result.loss_before, "loss_after": result.loss_after, "weights": weights}
    # the control: with one expert the softmax is 1 whatever W_Q and W_K say, so what is left of the attention gate
    # is its value and output maps (a learned d x d transform of the pooled prompt's reduced text features)
    result = train_gate("attention", cfg, clip, experts[:1], shots, shot_labels, seed, settings, cid)
    acc["attention-pooled"] = accuracy(result.objective.logits, test, test_labels)[0]
    gates["attention-pooled"] = {"loss_before": result.loss_before, "loss_after": result.loss_after}
    return {"acc": acc, "chosen": chosen, "oracle": oracle, "source_acc": source_acc, "gates": gates}


# ---------------------------------------------------------------------------------------------- the study


@dataclass
class StudyWorld:
    """What every seed shares: the config, the frozen CLIP, the prompt encoder and each domain's image features."""

    cfg: Config
    clip: FrozenCLIP
    encoder: PromptEncoder
    domains: list[Domain]
    features: list[DomainFeatures]

    @classmethod
    def build(cls, cfg: Config, bundle: DatasetBundle | None = None, clip: FrozenCLIP | None = None) -> StudyWorld:
        """Load (or take) the dataset and the CLIP, check the gates fit its feature width, encode every image."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        bundle = bundle or load_dataset(cfg)  # a missing dataset fails before a model is loaded
        domains = study_domains(bundle)
        clip = clip or load_clip(cfg.model, cfg.pretrained, device, progress=cfg.progress)
        for kind in GATES:
            gate_class(kind).check_features(cfg, clip.embed_dim)
        encoder = PromptEncoder(clip, bundle.classnames, cfg.n_ctx, mode=cfg.text_encoder)
        feats = [domain_features(clip, bundle, d, cfg.eval_batch_size) for d in domains]
        return cls(cfg, clip, encoder, domains, feats)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]


def run_seed(
    world: StudyWorld, settings: StudySettings, seed: int, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    """One seed: the K single-source prompts (once each), then per target its pooled prompt, shots and table rows."""
    cfg, encoder, feats = world.cfg.replace(seed=seed), world.encoder, world.features
    n = len(world.domains)
    phrase = phrase_embedding(world.clip, cfg.ctx_init) if cfg.ctx_init is not None else None
    start = initial_prompt(cfg, world.clip.width, phrase)
    rng = stream(seed, Stream.PARTITION)
    shot_rows = [draw_shots(f.train_labels.cpu().numpy(), settings.target_shots, rng) for f in feats]
    epochs = settings.prompt_epochs
    single = [
        train_prompt(encoder, cfg, start, f.train_features, f.train_labels, client_seed(seed, j), epochs, j)
        for j, f in enumerate(feats)
    ]
    with torch.no_grad():
        single_text = encoder.encode(torch.stack(single))  # [n, C, D]
        zero_shot = encoder.zero_shot()
    cells = []
    for t, domain in enumerate(world.domains):
        sources = [j for j in range(n) if j != t]
        pooled_x = torch.cat([feats[j].train_features for j in sources])
        pooled_y = torch.cat([feats[j].train_labels for j in sources])
        pooled = train_prompt(encoder, cfg, start, pooled_x, pooled_y, client_seed(seed, n + t), epochs, n + t)
        with torch.no_grad():
            experts = torch.cat([encoder.encode(pooled)[None], single_text[sources]])
        rows = torch.as_tensor(shot_rows[t], device=feats[t].train_features.device)
        target = TargetData(
            feats[t].train_features[rows], feats[t].train_labels[rows], feats[t].test_features, feats[t].test_labels
        )
        gate_cid = 2 * n + t
        cell = evaluate_target(
            cfg, settings, world.clip, experts, zero_shot, target, client_seed(seed, gate_cid), gate_cid
        )
        names = [world.names[j] for j in sources]
        cells.append(
            {
                "target": domain.name,
                "seed": seed,
                "acc": cell["acc"],
                "chosen_source": names[cell["chosen"]],
                "oracle_source": names[cell["oracle"]],
                "source_acc": dict(zip(names, cell["source_acc"], strict=True)),
                "experts": ["pooled", *names],
                "gates": cell["gates"],
                "shots": len(rows),
            }
        )
        log(f"seed {seed} target {domain.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in cell["acc"].items()))
    return cells


def summarize(cells: list[dict[str, Any]], targets: list[str], seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Per row: mean and std over seeds for each target, and of the per-seed mean over targets ("mean")."""
    out: dict[str, dict[str, list[float]]] = {}
    by = {(c["target"], c["seed"]): c["acc"] for c in cells}
    for row in ROWS:
        out[row] = {t: list(seed_stats([by[t, s][row] for s in seeds])) for t in targets}
        per_seed = [sum(by[t, s][row] for t in targets) / len(targets) for s in seeds]
        out[row]["mean"] = list(seed_stats(per_seed))
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def run_study(
    cfg: Config,
    settings: StudySettings,
    seeds: list[int],
    log: Callable[[str], None] = lambda _: None,
    world: StudyWorld | None = None,
) -> dict[str, Any]:
    """The whole study: every held-out domain for every seed, as a JSON-ready dict (settings, cells, summary)."""
    began = time.perf_counter()
    if not seeds:
        raise ConfigError("seeds is empty")
    for seed in seeds:  # each seed is a run's seed: the same range, checked before anything is built
        cfg.replace(seed=seed).validate()
    world = world or StudyWorld.build(cfg)
    cells = [c for seed in seeds for c in run_seed(world, settings, seed, log)]
    gate_settings = {s.name: s.of(cfg) for s in (D_GATE, HEADS, ATTN_SCALE, REDUCTION, LR_GATE)}
    return {
        "study": STUDY,
        "dataset": cfg.dataset,
        "model": f"{cfg.model} ({cfg.pretrained})",
        "domains": world.names,
        "seeds": list(seeds),
        "settings": {
            **dataclasses.asdict(settings),
            **gate_settings,
            "lr_prompt": cfg.lr_prompt,
            "batch_size": cfg.batch_size,
            "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay,
            "n_ctx": cfg.n_ctx,
            "train_per_class": cfg.train_per_class,
            "test_per_class": cfg.test_per_class,
            "data_seed": cfg.data_seed,
            "test_images": {
                d.name: int(f.test_labels.numel()) for d, f in zip(world.domains, world.features, strict=True)
            },
        },
        "rows": dict(ROWS),
        "cells": cells,
        "summary": summarize(cells, world.names, list(seeds)),
        "machine": _machine(),
        "wall_time_s": round(time.perf_counter() - began, 1),
    }


def _cell(stats: list[float]) -> str:
    return f"{stats[0]:.2f} ± {stats[1]:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """The study's report: the accuracy table, the source each seed chose, and the gates' mean weight per expert."""
    s, targets, seeds = result["settings"], result["domains"], result["seeds"]
    lines = [
        f"### Gates outside FL: leave-one-domain-out on {result['dataset']} ({result['model']}), test accuracy (%) "
        f"on the held-out domain, mean ± std over seeds {seeds}",
        "",
        f"K+1 = {len(targets)} prompts per target (pooled sources + {len(targets) - 1} single-source), CoOp "
        f"{s['prompt_epochs']} epochs at lr {s['lr_prompt']}; gates trained on {s['target_shots']} target shots per "
        f"class for {s['gate_epochs']} epochs at lr_gate {s['lr_gate']} (d_gate {s['d_gate']}, heads {s['heads']}, "
        f"attn_scale {s['attn_scale']}, lambda {s['lam']}); batch {s['batch_size']}. "
        f"{result['wall_time_s']} s on {result['machine']}.",
        "",
        "| | " + " | ".join(targets) + " | mean |",
        "|---|" + "---|" * (len(targets) + 1),
    ]
    for row, label in result["rows"].items():
        stats = result["summary"][row]
        lines.append(f"| {label} | " + " | ".join(_cell(stats[t]) for t in [*targets, "mean"]) + " |")
    lines += ["", "Source chosen on the target shots / by the oracle, per seed:", ""]
    for t in targets:
        picks = [c for c in result["cells"] if c["target"] == t]
        shown = "; ".join(f"seed {c['seed']}: {c['chosen_source']} / {c['oracle_source']}" for c in picks)
        lines.append(f"- {t}: {shown}")
    lines += [
        "",
        "Mean gate weight per expert at the true class on the test set (pooled first, then the sources in domain "
        "order), mean over seeds:",
        "",
        "| target | gate | weights |",
        "|---|---|---|",
    ]
    for t in targets:
        picks = [c for c in result["cells"] if c["target"] == t]
        for kind in GATES:
            w = np.mean([c["gates"][kind]["weights"] for c in picks], axis=0)
            names = picks[0]["experts"]
            lines.append(f"| {t} | {kind} | " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, w, strict=True)) + " |")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``out/gate_study.md`` and ``out/gate_study.json``, each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "gate_study.md", out / "gate_study.json"
    with replacing(md) as f:
        f.write(markdown(result))
    with replacing(js) as f:
        f.write(json.dumps(result, indent=2) + "\n")
    return md, js


def main_study(
    study: str,
    out: Path,
    seeds: list[int],
    dataset: str = "synthetic",
    data_root: str | None = None,
    target_shots: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    """The command's body: check everything, run, write the report, print the table."""
    if study not in STUDIES:
        raise ConfigError(f"study={study!r} is not one of: {', '.join(STUDIES)}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; it must be a folder (or not exist)")
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise ConfigError(f"--data-root {data_root!r} is not a folder")
    given = dict(overrides or {})
    if target_shots is not None:
        given["target_shots"] = target_shots
    cfg, settings = study_config(dataset, data_root, given)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_study(cfg, settings, seeds, log)
    md, js = write_report(result, out)
    print(markdown(result))
    log(f"wrote {md} and {js} ({result['wall_time_s']} s)")
    return 0
