"""``python -m pfedmoap.train --engine flower``: the same run on Flower's Ray simulation engine.

One virtual SuperNode per client (its partition id = the client id), each running the pFedMoAP ClientApp; the
ServerApp runs in this process, so its result comes back as a :class:`History`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..rounds import History
from ..rundir import RunDir
from .client_app import make_client_app
from .server_app import flower_run_dir, make_server_app
from .task import FlowerOptions, check_flower_config


def default_backend_config(cfg: Config) -> dict[str, Any]:
    """Ray resources per virtual node: ``threads`` CPUs (default 1), and a share of the GPUs when the run
    uses CUDA, sized so that as many nodes run at once as the CPUs allow."""
    threads = cfg.threads or 1
    gpus = 0.0
    if cfg.device != "cpu" and torch.cuda.is_available():
        parallel = max(1, min(cfg.clients, (os.cpu_count() or 1) // threads))
        gpus = torch.cuda.device_count() / parallel
    return {"client_resources": {"num_cpus": threads, "num_gpus": gpus}}


def run_simulation(
    cfg: Config,
    out: str | os.PathLike | None = None,
    *,
    backend_config: dict[str, Any] | None = None,
    round_timeout: float = 3600.0,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> History:
    """Run a whole federation on Flower's simulation engine (Ray) and return its history.

    Writes the same run directory as the in-process engine (``config.json``, ``metrics.jsonl``,
    ``summary.json``); each round's record also lists failed nodes. Nodes run ``cfg.threads`` torch threads
    (1 when unset). With the same config and seed the per-round accuracies equal the in-process run's on CPU.

    The simulated nodes share this machine's disk: each saves its client state under ``RUN_DIR/node-states`` (as
    a deployment node does under its ``state-dir``), so that ``resume=True`` continues the run in ``out`` from its
    last checkpoint with every node's gate, and its metrics equal an uninterrupted run's.
    """
    from flwr.simulation import run_simulation as flwr_run_simulation

    cfg = check_flower_config(cfg.validate())
    cfg = cfg.replace(threads=cfg.threads or 1, progress=False)
    target = str(out) if out is not None else flower_run_dir(cfg, cfg.out)
    if not resume:
        RunDir.check(target)  # refuse a used folder before Ray starts
    results: list[History] = []
    options = FlowerOptions(out=target, round_timeout=round_timeout)
    server_app = make_server_app(cfg, options, results, log, resume=resume)
    client_app = make_client_app({"state-dir": str(Path(target).resolve() / "node-states"), "worker": False})
    # Flower deprecates this Python entry point in favour of `flwr run`; here it is the supported path, so its
    # "use flwr run instead" warning would only mislead
    quiet = _DropMessages("`run_simulation` function is deprecated")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(quiet)
    try:
        flwr_run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config or default_backend_config(cfg),  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.removeFilter(quiet)
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see its log above)")
    return results[0]


class _DropMessages(logging.Filter):
    """Drop log records whose message contains any of the given fragments."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)
