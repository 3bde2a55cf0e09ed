"""The round loop shared by every method, and ``run(config)``, the library's main entry point.

One round (SPEC §2): sample clients; take the pool as it was at the start of the round; for each sampled
client, download (P_g and, for pFedMoAP, its K experts), train locally, upload its prompt; aggregate;
evaluate every client on its own test split; account bytes; log one JSON line.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, comm, ops
from .client import Client, ClientData, TrainSettings, client_seed
from .clip import FrozenCLIP, load_clip, resolve_device
from .config import Config
from .data import DatasetBundle, DatasetOptions, create_dataset, partition
from .data.features import encode_subset
from .errors import ConfigError
from .methods import Payload, create_method
from .metrics import RunDir, mean_std, summarize
from .prompt import PromptEncoder, init_prompt
from .server import Server


@dataclass
class History:
    """What ``run`` returns: per-round metrics, the summary, and the final state of the federation."""

    config: Config
    rounds: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path | None
    federation: Federation


def split_clients(cfg: Config, bundle: DatasetBundle) -> list[partition.ClientSplit]:
    """The partition named by ``cfg.partition``, seeded by the run seed."""
    rng = np.random.default_rng([cfg.seed, 7])
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
    return partition.iid(tr, te, cfg.clients, rng)


class Federation:
    """A fully built simulated federation: frozen CLIP, per-client data and state, server, method.

    Research code can replace one piece before calling :meth:`run` (e.g. ``fed.server.select_experts``,
    a client's gate, or the method object) without touching the loop.
    """

    def __init__(
        self,
        cfg: Config,
        clip: FrozenCLIP | None = None,
        dataset: DatasetBundle | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg.validate()
        self.log = log or (lambda msg: tqdm.write(msg))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.backends = ops.select_backends(cfg.fused)
        if cfg.fused and not ops.fused_available():
            self.log("--fused: no fused backend is built yet; every op runs its reference implementation")
        self.log("op backends: " + ", ".join(f"{op}={b}" for op, b in self.backends.items()))

        self.clip = clip or load_clip(cfg.model, cfg.pretrained, self.device, progress=cfg.progress)
        if cfg.method == "pfedmoap" and (cfg.d_gate > self.clip.embed_dim or self.clip.embed_dim % cfg.d_gate):
            divisors = [
                d for d in range(8, self.clip.embed_dim + 1) if self.clip.embed_dim % d == 0 and d % cfg.heads == 0
            ]
            raise ConfigError(
                f"d_gate={cfg.d_gate} does not divide the feature dim {self.clip.embed_dim} of {cfg.model} "
                f"(valid with heads={cfg.heads}: {', '.join(map(str, divisors))})"
            )
        self.dataset = dataset or create_dataset(
            cfg.dataset,
            DatasetOptions(
                root=cfg.data_root,
                domains=cfg.domains,
                train_per_class=cfg.train_per_class,
                test_per_class=cfg.test_per_class,
                seed=cfg.data_seed,
            ),
        )
        self.splits = split_clients(cfg, self.dataset)
        self.encoder = PromptEncoder(self.clip, self.dataset.classnames, cfg.n_ctx, mode=cfg.text_encoder)
        self.clients = self._build_clients()
        prompt0 = init_prompt(cfg.n_ctx, self.clip.width, cfg.ctx_init_std, torch.Generator().manual_seed(cfg.seed))
        self.server = Server(
            cfg.clients,
            prompt0,
            [c.data.num_train for c in self.clients],
            cfg.frac,
            cfg.seed,
            cfg.expert_selection,
        )
        self.method = create_method(cfg)
        self.settings = TrainSettings(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr_prompt=cfg.lr_prompt,
            lr_gate=cfg.lr_gate,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            d_gate=cfg.d_gate,
            heads=cfg.heads,
            attn_scaling=cfg.attn_scaling,
            reduction=cfg.reduction,
        )
        self._zero_shot_text: torch.Tensor | None = None
        self._expert_text_cache: dict[int, tuple[int, torch.Tensor]] = {}
        self.rounds: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------ setup
    def _build_clients(self) -> list[Client]:
        cfg, data = self.cfg, self.dataset
        train_used = np.unique(np.concatenate([s.train for s in self.splits]))
        test_used = np.unique(np.concatenate([s.test for s in self.splits]))
        # the frozen image encoder runs once per image; with augmentation, train features are per batch
        train_feats = None
        if not cfg.augment:
            train_feats = encode_subset(
                self.clip, data.train, train_used, cfg.eval_batch_size, cfg.progress, "train features"
            )
        test_feats = encode_subset(self.clip, data.test, test_used, cfg.eval_batch_size, cfg.progress, "test features")
        train_pos = {int(i): k for k, i in enumerate(train_used)}
        test_pos = {int(i): k for k, i in enumerate(test_used)}
        clients = []
        for cid, split in enumerate(self.splits):
            tr_rows = torch.tensor([train_pos[int(i)] for i in split.train], dtype=torch.long)
            te_rows = torch.tensor([test_pos[int(i)] for i in split.test], dtype=torch.long)
            images = None
            if cfg.augment:
                imgs = data.train.images
                images = (
                    imgs[torch.as_tensor(split.train)]
                    if isinstance(imgs, torch.Tensor)
                    else torch.stack([imgs[int(i)] for i in split.train])
                )
            cdata = ClientData(
                train_labels=torch.as_tensor(data.train.labels[split.train], dtype=torch.long),
                test_labels=torch.as_tensor(data.test.labels[split.test], dtype=torch.long),
                test_features=test_feats[te_rows.to(test_feats.device)],
                train_features=None if train_feats is None else train_feats[tr_rows.to(train_feats.device)],
                train_images=images,
            )
            clients.append(Client(cid, cdata, client_seed(cfg.seed, cid)))
        return clients

    # ------------------------------------------------------------------------------------ one round
    def _receive(self, payload: Payload) -> tuple[Payload, int]:
        """Send a payload over the (simulated) wire: cast to the wire dtype, count bytes, cast back."""
        dtype = self.cfg.comm_dtype
        sent = [comm.to_wire(t, dtype) for t in payload.tensors()]
        nbytes = comm.nbytes(sent)
        got = iter(t.float() for t in sent)
        received = Payload(
            global_prompt=next(got) if payload.global_prompt is not None else None,
            expert_ids=list(payload.expert_ids),
            expert_prompts=next(got) if payload.expert_prompts is not None else None,
        )
        return received, nbytes

    def run_round(self, round_index: int) -> dict[str, Any]:
        cfg, server, method = self.cfg, self.server, self.method
        phases: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        server.rejected = []
        sampled = server.sample()
        # the paper uses the pool as it was at the start of the round; "live" is the reference code's view
        view = server.snapshot() if cfg.pool_view == "snapshot" else server.pool
        uploads: dict[int, torch.Tensor] = {}
        bytes_down: dict[int, int] = {}
        bytes_up: dict[int, int] = {}
        experts: dict[int, list[int]] = {}
        bar = tqdm(sampled, desc=f"round {round_index}", leave=False, disable=not cfg.progress)
        for cid in bar:
            client = self.clients[cid]
            with _phase(phases, "select"):
                payload, bytes_down[cid] = self._receive(method.payload(server, view, client))
            experts[cid] = payload.expert_ids
            objective = method.objective(payload)
            expert_text = None
            if objective.use_gate:
                with _phase(phases, "encode_experts"), torch.no_grad():
                    # the K frozen experts: encoded once per round, in one batched pass
                    expert_text = self.encoder.encode(payload.expert_prompts)
            with _phase(phases, "train"):
                trained = client.train(
                    self.encoder, method.start_prompt(server, client, payload), expert_text, objective, self.settings
                )
            client.prompt = trained.cpu()
            client.expert_ids = payload.expert_ids
            client.expert_prompts = payload.expert_prompts
            if expert_text is not None:
                self._expert_text_cache[cid] = (client.version, expert_text)
            else:
                self._expert_text_cache.pop(cid, None)
            if method.uploads():
                wire = comm.to_wire(trained, cfg.comm_dtype)
                bytes_up[cid] = comm.nbytes([wire])
                if server.receive(cid, wire.float()):
                    uploads[cid] = server.pool[cid]
            else:
                bytes_up[cid] = 0
        with _phase(phases, "aggregate"):
            method.aggregate(server, uploads)
        with _phase(phases, "eval"):
            accs = self.evaluate()
        mean, std = mean_std(accs)
        seconds = time.perf_counter() - start
        record = {
            "round": round_index,
            "mean_acc": mean,
            "std_acc": std,
            "client_acc": accs,
            "sampled": sampled,
            "experts": {str(k): v for k, v in experts.items()},
            "bytes_down": sum(bytes_down.values()),
            "bytes_up": sum(bytes_up.values()),
            "client_bytes_down": {str(k): v for k, v in bytes_down.items()},
            "client_bytes_up": {str(k): v for k, v in bytes_up.items()},
            "rejected_uploads": [{"client": c, "reason": r} for c, r in server.rejected],
            "seconds": seconds,
            "phase_seconds": dict(phases),
        }
        return record

    # ------------------------------------------------------------------------------------ evaluation
    def _zero_shot(self) -> torch.Tensor:
        if self._zero_shot_text is None:
            self._zero_shot_text = self.clip.zero_shot_text_features(self.dataset.classnames)
        return self._zero_shot_text

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Accuracy (%) of every client on its own test split. A client whose evaluated state did not change
        since its last evaluation keeps its accuracy (exact: same state, same data)."""
        cfg = self.cfg
        shared_text: dict[tuple, torch.Tensor] = {}
        accs = []
        for client in self.clients:
            state = self.method.eval_state(self.server, client)
            if client.eval_key == state.key and client.accuracy is not None:
                accs.append(client.accuracy)
                continue
            if state.prompt is None:
                local_text = self._zero_shot()
            else:
                if state.key not in shared_text:
                    shared_text[state.key] = self.encoder.encode(state.prompt)
                local_text = shared_text[state.key]
            expert_text, gate = None, None
            if state.use_gate:
                cached = self._expert_text_cache.get(client.cid)
                if cached is not None and cached[0] == client.version:
                    expert_text = cached[1]
                else:
                    expert_text = self.encoder.encode(state.expert_prompts)
                gate = client.gate
            acc = client.evaluate(
                self.clip.gamma, local_text, expert_text, gate, cfg.lam, cfg.d_gate, cfg.reduction, cfg.eval_batch_size
            )
            client.eval_key, client.accuracy = state.key, acc
            accs.append(acc)
        # expert features were only kept for this evaluation; drop them to bound memory
        self._expert_text_cache.clear()
        return accs

    # ------------------------------------------------------------------------------------ whole run
    def run(self, run_dir: RunDir | None = None) -> History:
        cfg = self.cfg
        rounds = range(1, cfg.rounds + 1) if self.method.trains else range(0, 1)
        for t in rounds:
            if self.method.trains:
                record = self.run_round(t)
            else:
                start = time.perf_counter()
                accs = self.evaluate()
                mean, std = mean_std(accs)
                record = {
                    "round": t,
                    "mean_acc": mean,
                    "std_acc": std,
                    "client_acc": accs,
                    "sampled": [],
                    "experts": {},
                    "bytes_down": 0,
                    "bytes_up": 0,
                    "client_bytes_down": {},
                    "client_bytes_up": {},
                    "rejected_uploads": [],
                    "seconds": time.perf_counter() - start,
                    "phase_seconds": {"eval": time.perf_counter() - start},
                }
            self.rounds.append(record)
            if run_dir is not None:
                run_dir.append_round(record)
            self.log(_round_line(record, cfg.rounds))
        summary = summarize(self.rounds)
        summary.update({"method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "backends": self.backends})
        if run_dir is not None:
            self.save_checkpoint(run_dir.path / "checkpoints" / "final.pt")
            run_dir.write_summary(summary)
        return History(cfg, self.rounds, summary, run_dir.path if run_dir else None, self)

    def save_checkpoint(self, path: Path) -> None:
        """Final state: pool, global prompt, and each client's own prompt and private gate."""
        state = {
            "version": __version__,
            "global_prompt": self.server.global_prompt,
            "pool": {int(k): v for k, v in self.server.pool.items()},
            "client_prompts": {c.cid: c.prompt for c in self.clients if c.prompt is not None},
            "client_gates": {c.cid: c.gate.state_dict() for c in self.clients if c.gate is not None},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)


@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        phases[name] += time.perf_counter() - t0


def _round_line(r: dict[str, Any], total: int) -> str:
    return (
        f"round {r['round']:>3}/{total}  acc {r['mean_acc']:6.2f} ± {r['std_acc']:5.2f}  "
        f"down {comm.format_bytes(r['bytes_down'])}  up {comm.format_bytes(r['bytes_up'])}  {r['seconds']:.1f} s"
    )


def default_run_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.preset or cfg.dataset
    return Path("runs") / f"{name}-{cfg.method}-s{cfg.seed}-{stamp}"


def run(cfg: Config, out: str | Path | None = None, log: Callable[[str], None] | None = None) -> History:
    """Run a whole simulated federation. With ``out`` (or ``cfg.out``), write the run directory there.

    Returns the :class:`History` (per-round metrics, summary, and the federation's final state).
    """
    cfg = cfg.validate()
    target = out if out is not None else cfg.out
    if target is not None:
        RunDir.check(target)  # fail before any expensive work; nothing is created on a bad config
    fed = Federation(cfg, log=log)
    run_dir = RunDir.create(target) if target is not None else None
    if run_dir is not None:
        meta = {
            "pfedmoap_version": __version__,
            "torch_version": torch.__version__,
            "device": str(fed.device),
            "backends": fed.backends,
            "num_classes": fed.dataset.num_classes,
            "client_train_sizes": [c.data.num_train for c in fed.clients],
            "client_test_sizes": [int(c.data.test_labels.numel()) for c in fed.clients],
            "prompt_tokens": fed.encoder.length,
            "gamma": fed.clip.gamma,
        }
        run_dir.write_config({**cfg.to_dict(), "_meta": meta})
    return fed.run(run_dir)
