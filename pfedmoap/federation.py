"""The round loop shared by every method, and ``run(config)``, the library's main entry point.

One round (SPEC §2): sample clients; take the pool as it was at the start of the round; for each sampled
client, download (P_g and, for pFedMoAP, its K experts), train locally, upload its prompt; aggregate;
evaluate every client on its own test split; account bytes; log one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
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

from . import __version__, comm, ops, profiling
from .client import Client, ClientData, TrainSettings, client_seed
from .clip import FrozenCLIP, load_clip, resolve_device
from .config import Config
from .data import DatasetBundle, DatasetOptions, create_dataset, partition
from .data.features import encode_subset
from .errors import ConfigError, UserError
from .methods import Payload, create_method
from .metrics import RunDir, mean_std, summarize
from .profiling import nvtx_range, ranged
from .prompt import PromptEncoder, init_prompt
from .server import Server

CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = "last.pt"


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
        if cfg.fused:
            for backend, reason in ops.unavailable_backends().items():
                self.log(f"--fused: the {backend} backend cannot run here ({reason})")
        self.log(ops.describe(self.backends))
        if profiling.is_enabled():
            self.log(profiling.describe())

        # the data first: a missing dataset should fail before a model is loaded or pretrained
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
        self.clip = clip or load_clip(cfg.model, cfg.pretrained, self.device, progress=cfg.progress)
        if cfg.method == "pfedmoap" and (cfg.d_gate > self.clip.embed_dim or self.clip.embed_dim % cfg.d_gate):
            divisors = [
                d for d in range(8, self.clip.embed_dim + 1) if self.clip.embed_dim % d == 0 and d % cfg.heads == 0
            ]
            raise ConfigError(
                f"d_gate={cfg.d_gate} does not divide the feature dim {self.clip.embed_dim} of {cfg.model} "
                f"(valid with heads={cfg.heads}: {', '.join(map(str, divisors))})"
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
            cfg.max_prompt_norm,
        )
        # simulated client failures draw from their own stream, so turning them on changes nothing else
        self.dropout_rng = np.random.default_rng([cfg.seed, 303])
        self.dp_noise_multiplier: float | None = None
        if cfg.dp_epsilon is not None:
            from . import privacy

            # a client uploads at most once per round: R Gaussian releases at most
            self.dp_noise_multiplier = privacy.noise_multiplier_for(cfg.dp_epsilon, cfg.dp_delta, cfg.rounds)
            self.log(
                f"DP: noise multiplier {self.dp_noise_multiplier:.4f} for epsilon {cfg.dp_epsilon} over "
                f"{cfg.rounds} uploads per client (delta {cfg.dp_delta}, clip {cfg.dp_clip})"
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

    @nvtx_range("round")
    def run_round(self, round_index: int) -> dict[str, Any]:
        cfg, server, method = self.cfg, self.server, self.method
        phases: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        server.rejected = []
        # a method that does not train (zero-shot) samples nobody: the round is just an evaluation
        sampled = server.sample() if method.trains else []
        # the paper uses the pool as it was at the start of the round; "live" is the reference code's view
        view = server.snapshot() if cfg.pool_view == "snapshot" else server.pool
        uploads: dict[int, torch.Tensor] = {}
        bytes_down: dict[int, int] = {}
        bytes_up: dict[int, int] = {}
        experts: dict[int, list[int]] = {}
        dropped: list[int] = []
        bar = tqdm(sampled, desc=f"round {round_index}", leave=False, disable=not cfg.progress)
        for cid in ranged(bar, "client_update"):
            client = self.clients[cid]
            with _phase(phases, "select"):
                payload, bytes_down[cid] = self._receive(method.payload(server, view, client))
            experts[cid] = payload.expert_ids
            if cfg.client_dropout > 0 and self.dropout_rng.random() < cfg.client_dropout:
                # the client fails after downloading: no training, no upload, its state stays as it was
                dropped.append(cid)
                bytes_up[cid] = 0
                continue
            wire = self.local_update(client, payload, phases)
            if wire is None:  # the method uploads nothing
                bytes_up[cid] = 0
                continue
            bytes_up[cid] = comm.nbytes([wire])
            if server.receive(cid, wire.float()):
                uploads[cid] = server.pool[cid]
        with _phase(phases, "aggregate"):
            method.aggregate(server, uploads)
        with _phase(phases, "eval"):
            accs = self.evaluate()
        mean, std = mean_std(accs)
        seconds = time.perf_counter() - start
        attention = {str(c.cid): c.attention for c in self.clients if c.attention is not None}
        record = {
            "round": round_index,
            "mean_acc": mean,
            "std_acc": std,
            "client_acc": accs,
            "sampled": sampled,
            "experts": {str(k): v for k, v in experts.items()},
            "client_attention": attention,
            "bytes_down": sum(bytes_down.values()),
            "bytes_up": sum(bytes_up.values()),
            "client_bytes_down": {str(k): v for k, v in bytes_down.items()},
            "client_bytes_up": {str(k): v for k, v in bytes_up.items()},
            "rejected_uploads": [{"client": c, "reason": r} for c, r in server.rejected],
            "dropped": dropped,
            "seconds": seconds,
            **self._dp_record(),
            "phase_seconds": dict(phases),
        }
        return record

    def local_update(
        self, client: Client, payload: Payload, phases: dict[str, float] | None = None
    ) -> torch.Tensor | None:
        """One sampled client's work after its download: encode its K experts once (no grad), train from the
        method's start prompt, keep the new local state, and return the upload as it goes on the wire (DP noise
        added when on), or None when the method uploads nothing. The Flower ClientApp runs this same step."""
        cfg, method = self.cfg, self.method
        phases = phases if phases is not None else defaultdict(float)
        objective = method.objective(payload)
        expert_text = None
        if objective.use_gate:
            with _phase(phases, "encode_experts"), nvtx_range("encode_experts"), torch.no_grad():
                # the K frozen experts: encoded once per round, in one batched pass
                expert_text = self.encoder.encode(payload.expert_prompts)
        with _phase(phases, "train"):
            trained = client.train(
                self.encoder, method.start_prompt(self.server, client, payload), expert_text, objective, self.settings
            )
        client.prompt = trained.cpu()
        client.expert_ids = payload.expert_ids
        client.expert_prompts = payload.expert_prompts
        if expert_text is not None:
            self._expert_text_cache[client.cid] = (client.version, expert_text)
        else:
            self._expert_text_cache.pop(client.cid, None)
        if not method.uploads():
            return None
        upload = trained
        if self.dp_noise_multiplier is not None:
            from .privacy import privatize_update

            start_prompt = payload.global_prompt.to(trained.device)
            noisy = privatize_update(trained - start_prompt, cfg.dp_clip, self.dp_noise_multiplier, client.generator)
            upload = start_prompt + noisy  # the client keeps its clean prompt; only the upload is noised
            client.dp_releases += 1
        return comm.to_wire(upload, cfg.comm_dtype)

    def _dp_record(self) -> dict[str, Any]:
        """Noise level and the largest epsilon any client has spent so far (its uploads so far)."""
        if self.dp_noise_multiplier is None:
            return {}
        from .privacy import epsilon

        most = max(c.dp_releases for c in self.clients)
        spent = epsilon(self.dp_noise_multiplier, most, self.cfg.dp_delta)
        return {"dp_noise_multiplier": self.dp_noise_multiplier, "dp_epsilon_spent": spent, "dp_max_uploads": most}

    # ------------------------------------------------------------------------------------ evaluation
    def _zero_shot(self) -> torch.Tensor:
        if self._zero_shot_text is None:
            self._zero_shot_text = self.clip.zero_shot_text_features(self.dataset.classnames)
        return self._zero_shot_text

    @nvtx_range("evaluate")
    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Accuracy (%) of every client on its own test split. A client whose evaluated state did not change
        since its last evaluation keeps its accuracy (exact: same state, same data)."""
        shared_text: dict[tuple, torch.Tensor] = {}
        accs = [self.evaluate_client(client, shared_text) for client in self.clients]
        # expert features were only kept for this evaluation; drop them to bound memory
        self._expert_text_cache.clear()
        return accs

    @torch.no_grad()
    def evaluate_client(self, client: Client, shared_text: dict[tuple, torch.Tensor] | None = None) -> float:
        """Accuracy (%) of one client with the state its method evaluates it with; an unchanged state keeps its
        accuracy. ``shared_text`` shares text features between clients evaluated with the same prompt. The
        Flower ClientApp evaluates its node's client with this."""
        cfg = self.cfg
        shared_text = {} if shared_text is None else shared_text
        state = self.method.eval_state(self.server, client)
        if client.eval_key == state.key and client.accuracy is not None:
            return client.accuracy
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
        return acc

    # ------------------------------------------------------------------------------------ whole run
    def run(self, run_dir: RunDir | None = None) -> History:
        """Run the remaining rounds (all of them, or those after a restored checkpoint).

        With a run directory, every finished round is appended to ``metrics.jsonl`` and the whole state is
        checkpointed (``checkpoints/last.pt``, atomically) so that ``--resume`` continues exactly.
        """
        cfg = self.cfg
        rounds = range(1, cfg.rounds + 1) if self.method.trains else range(0, 1)
        done = {r["round"] for r in self.rounds}
        for t in rounds:
            if t in done:
                continue
            record = self.run_round(t)
            self.rounds.append(record)
            if run_dir is not None:
                run_dir.append_round(record)
                self.save_checkpoint(run_dir.path / "checkpoints" / LAST_CHECKPOINT)
            self.log(_round_line(record, cfg.rounds))
        summary = summarize(self.rounds)
        summary.update({"method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "backends": self.backends})
        if run_dir is not None:
            run_dir.write_summary(summary)
        return History(cfg, self.rounds, summary, run_dir.path if run_dir else None, self)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the remaining rounds depend on: server (pool, P_g, RNGs), every client's private state
        (prompt, gate, RNG, last experts, evaluation cache) and the metrics so far. Plain tensors and
        Python containers only, so it loads with ``torch.load(weights_only=True)``."""
        server = self.server
        return {
            "format": CHECKPOINT_FORMAT,
            "pfedmoap_version": __version__,
            "config": self.cfg.to_dict(),
            "rounds": self.rounds,
            "server": {
                "global_prompt": server.global_prompt,
                "global_version": server.global_version,
                "pool": {int(k): v for k, v in server.pool.items()},
                "sample_rng": server.sample_rng.bit_generator.state,
                "select_rng": server.select_rng.bit_generator.state,
            },
            "dropout_rng": self.dropout_rng.bit_generator.state,
            "clients": [c.state_dict() for c in self.clients],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT} (another version)")
        if len(state["clients"]) != len(self.clients):
            raise UserError(f"checkpoint has {len(state['clients'])} clients, the config {len(self.clients)}")
        server = self.server
        srv = state["server"]
        server.global_prompt = srv["global_prompt"]
        server.global_version = int(srv["global_version"])
        server.pool = {int(k): v for k, v in srv["pool"].items()}
        server.sample_rng.bit_generator.state = srv["sample_rng"]
        server.select_rng.bit_generator.state = srv["select_rng"]
        self.dropout_rng.bit_generator.state = state["dropout_rng"]
        for client, cs in zip(self.clients, state["clients"], strict=True):
            client.load_state_dict(cs, self.settings, self.device)
        self.rounds = list(state["rounds"])

    def save_checkpoint(self, path: Path) -> None:
        """Write the state atomically: a kill at any moment leaves the previous checkpoint intact."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        except OSError as exc:  # disk full, permissions: the previous checkpoint is still intact
            tmp.unlink(missing_ok=True)
            reason = exc.strerror or type(exc).__name__
            raise UserError(
                f"could not write checkpoint {str(path)!r} ({reason}); the last complete round's checkpoint is "
                "intact: free space and continue with --resume"
            ) from None


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


def resume(path: str | Path, log: Callable[[str], None] | None = None, progress: bool | None = None) -> History:
    """Continue a run from its directory: the saved config, the last complete round's checkpoint.

    The metrics of a resumed run equal an uninterrupted run's exactly on CPU (same config, same seed).
    """
    run_dir = RunDir(path)
    config_file = run_dir.path / "config.json"
    if not config_file.is_file():
        raise UserError(f"resume={str(run_dir.path)!r} holds no run (no config.json)")
    if (run_dir.path / "summary.json").exists():
        raise UserError(f"resume={str(run_dir.path)!r} is already finished (summary.json exists)")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"resume={str(run_dir.path)!r}: config.json is not valid JSON") from None
    meta = data.pop("_meta", {})
    if meta.get("pfedmoap_version", __version__) != __version__:
        raise UserError(
            f"resume={str(run_dir.path)!r} was written by pfedmoap {meta.get('pfedmoap_version')}, "
            f"this is {__version__}"
        )
    cfg = Config.from_dict(data, source=str(config_file)).validate()
    if progress is not None:
        cfg = cfg.replace(progress=progress)
    fed = Federation(cfg, log=log)
    ckpt = run_dir.path / "checkpoints" / LAST_CHECKPOINT
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupted or foreign file: say so in one line
            raise UserError(f"checkpoint {str(ckpt)!r} cannot be read: {type(exc).__name__}") from None
        fed.load_state_dict(state)
    # metrics.jsonl may hold a line past the checkpoint (killed between the two writes): rewrite it
    (run_dir.path / "checkpoints").mkdir(parents=True, exist_ok=True)
    run_dir.write_rounds(fed.rounds)
    fed.log(f"resuming {run_dir.path} after round {fed.rounds[-1]['round'] if fed.rounds else 0}")
    return fed.run(run_dir)
