"""The in-process engine: a whole federation in one process, its clients trained one after another.

:class:`Federation` is a transport over the shared pieces: the :class:`~pfedmoap.engine.world.World` (data, CLIP,
features), the :class:`~pfedmoap.engine.rounds.RoundDriver` (the server side of every round) and the
:class:`~pfedmoap.engine.runtime.ClientRuntime` (each client's local update and evaluation). Running a run directory
(``run`` / ``resume``) lives in :mod:`pfedmoap.engine.launch`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..base import tracing as profiling
from ..base.errors import UserError
from ..base.tracing import nvtx_range, ranged
from ..config import Config
from ..data import DatasetBundle
from ..federated.client import Client
from ..federated.plan import plugins, resolve_config
from ..federated.prompt import PromptEncoder
from ..federated.server import Server, check_prompt_like
from ..model.clip import FrozenCLIP
from ..ops import OpTable, backend_warnings, select_ops, unavailable_backends
from .lockstep import default_parallel_clients
from .recorder import RunRecorder
from .records import History, RoundRecord
from .rounds import RoundDriver
from .rundir import RunDir
from .runtime import ClientRuntime
from .tensorboard import check_available
from .world import World


class Federation:
    """A fully built simulated federation: world, clients, server side, client runtime and the run's ops.

    Research code can replace one piece before calling :meth:`run` (e.g. ``fed.server.select_experts``, a
    client's gate, or ``fed.method``) without touching the loop. ``ops`` overrides the op table that
    ``cfg.fused`` would select.
    """

    def __init__(
        self,
        cfg: Config,
        clip: FrozenCLIP | None = None,
        dataset: DatasetBundle | None = None,
        log: Callable[[str], None] | None = None,
        ops: OpTable | None = None,
    ):
        self.cfg = cfg = resolve_config(cfg)
        self.plugins = plugins(cfg)
        self.log = log or (lambda msg: tqdm.write(msg))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.tensorboard:
            check_available()  # before anything is built
        self.ops = ops or select_ops(cfg.fused)
        if cfg.fused:
            for backend, reason in unavailable_backends().items():
                self.log(f"--fused: the {backend} backend cannot run here ({reason})")
            for note in backend_warnings():
                self.log(f"--fused: {note}")
        self.log(self.ops.describe())
        if profiling.is_enabled():
            self.log(profiling.describe())
        self.method = self.plugins.method(cfg)
        self.world = World(cfg, self.ops, clip=clip, dataset=dataset, log=self.log, plugins=self.plugins)
        self.clients: list[Client] = self.world.new_clients(progress=cfg.progress)
        self.runtime = ClientRuntime(cfg, self.world, self.method, self.ops)
        auto = 1 if cfg.pool_view == "live" else default_parallel_clients(self.device)
        self.parallel_clients = auto if cfg.parallel_clients is None else cfg.parallel_clients
        self.driver = RoundDriver.for_config(
            cfg,
            self.method,
            self.plugins.selection.from_config(cfg),
            self.world.init_prompt,
            self.world.train_sizes,
            self.ops.knn,
        )
        if self.driver.dp_noise_multiplier is not None:
            self.log(
                f"DP: noise multiplier {self.driver.dp_noise_multiplier:.4f} for epsilon {cfg.dp_epsilon} over "
                f"{cfg.rounds} uploads per client (delta {cfg.dp_delta}, clip {cfg.dp_clip})"
            )

    # ------------------------------------------------------------------------------------ the shared pieces
    @property
    def server(self) -> Server:
        return self.driver.server

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.driver.rounds

    @property
    def backends(self) -> dict[str, str]:
        """The backend each op of this run uses."""
        return dict(self.ops.backends)

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def clip(self) -> FrozenCLIP:
        return self.world.clip

    @property
    def encoder(self) -> PromptEncoder:
        return self.world.encoder

    @property
    def dataset(self) -> DatasetBundle:
        return self.world.dataset

    # ------------------------------------------------------------------------------------ one round
    @nvtx_range("round")
    def run_round(self, round_index: int) -> RoundRecord:
        """One round: the driver's server side, each sampled client's local update in turn, every client's
        evaluation. Returns the round's record."""
        driver = self.driver
        clients = driver.begin(round_index)
        for exchange in range(driver.exchanges):  # one, but for a method that synchronises more often (DP-FPL)
            if exchange:
                clients = driver.next_exchange()
            self._exchange(round_index, clients)
            driver.aggregate()
        with driver.phase("eval"):
            accs = self.evaluate()
        attention = {c.cid: c.attention for c in self.clients if c.attention is not None}
        split_acc = {c.cid: c.split_acc for c in self.clients if c.split_acc}
        return driver.finish(accs, attention, split_acc=split_acc)

    def _exchange(self, round_index: int, clients: list[int]) -> None:
        """One exchange of a round: each client's download, local update and upload, in order (or in lock step)."""
        driver = self.driver
        if self.parallel_clients == 1:
            bar = tqdm(clients, desc=f"round {round_index}", leave=False, disable=not self.cfg.progress)
            for cid in ranged(bar, "client_update"):
                wire = driver.dispatch(cid)
                if wire is None:  # dropped out after the download
                    continue
                payload = wire.map(torch.Tensor.float)  # as received
                upload = self.runtime.local_update(self.clients[cid], payload, self.server, driver.phases)
                driver.upload(cid, upload)
        else:
            # every download first (the snapshot pool: no client sees another's upload), then the local updates in
            # lock-step groups, then the uploads, each in sampled order
            wires = {cid: driver.dispatch(cid) for cid in clients}
            jobs = [(self.clients[cid], w.map(torch.Tensor.float)) for cid, w in wires.items() if w is not None]
            with nvtx_range("client_update"):
                uploads = self.runtime.local_updates(jobs, self.server, driver.phases, together=self.parallel_clients)
            for (client, _), upload in zip(jobs, uploads, strict=True):
                driver.upload(client.cid, upload)

    @nvtx_range("evaluate")
    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Accuracy (%) of every client on its own test split. A client whose evaluated state did not change
        since its last evaluation keeps its accuracy (exact: same state, same data). With clients trained in lock
        step (``parallel_clients != 1``) the text features of every evaluated prompt are encoded in one pass first
        (:meth:`~pfedmoap.engine.runtime.ClientRuntime.prefetch_text`)."""
        shared_text: dict[tuple, torch.Tensor] = {}
        if self.parallel_clients != 1:  # batched like the training: every client's text features in one pass
            with nvtx_range("evaluate.text"):
                self.runtime.prefetch_text(self.clients, self.server, shared_text)
        accs = [self.runtime.evaluate_client(client, self.server, shared_text) for client in self.clients]
        for client in self.clients:  # expert features were only kept for this evaluation: bound memory
            client.expert_text = None
        return accs

    # ------------------------------------------------------------------------------------ whole run
    def run(
        self, run_dir: RunDir | None = None, *, meta: dict[str, Any] | None = None, resumed: bool = False
    ) -> History:
        """Run the remaining rounds (all of them, or those after a restored checkpoint).

        With a run directory, every finished round is appended to ``metrics.jsonl`` and the whole state is
        checkpointed (``checkpoints/last.pt``, atomically) so that ``--resume`` continues exactly. ``meta``: a new
        run's facts, written with its config as ``config.json`` first; ``resumed``: the run continues from its
        checkpoint (``metrics.jsonl`` is first made to hold exactly the checkpoint's rounds).
        """
        driver = self.driver
        with RunRecorder(self.cfg, run_dir, self.log, self.state_dict) as recorder:
            if resumed:
                recorder.resumed(driver.rounds)
            elif meta is not None:
                recorder.begin(meta)
            for t in driver.remaining():
                recorder.round(self.run_round(t), driver.round_indices[-1])
        return recorder.finish(driver.rounds, driver.summary(backends=self.backends), driver, self)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything the remaining rounds depend on: the server side (pool, P_g, RNG streams, DP releases, the
        rounds so far) and every client's private state (prompt, gate, RNG, last experts, evaluation cache)."""
        return {
            "pfedmoap_version": __version__,
            "config": self.cfg.to_dict(),
            "driver": self.driver.state_dict(),
            "clients": [c.state_dict() for c in self.clients],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["clients"]) != len(self.clients):
            raise UserError(f"checkpoint has {len(state['clients'])} clients, the config {len(self.clients)}")
        self.driver.load_state_dict(state["driver"])
        for client, cs in zip(self.clients, state["clients"], strict=True):
            if cs["prompt"] is not None:
                check_prompt_like(self.server.global_prompt, cs["prompt"], f"client {client.cid}'s prompt")
            client.load_state_dict(cs, self.runtime.make_gate, self.device)
