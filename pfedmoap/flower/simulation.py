"""``python -m pfedmoap.train --engine flower``: the same run on Flower's simulation engine, through ``flwr run``.

One virtual SuperNode per client (its partition id = the client id), each running the pFedMoAP ClientApp, on a
local SuperLink in simulation mode (:mod:`~pfedmoap.flower.local_link`); the ServerApp runs in Flower's
``flwr-simulation`` process and writes the run directory, from which the result comes back as a :class:`History`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..base.errors import ConfigError, RunFailed, UserError
from ..base.files import read_json
from ..config import Config
from ..engine import checkpoint
from ..engine.records import History
from ..engine.rundir import RunDir
from ..federated.plan import resolve_config, saved_config_from_dict
from .local_link import LocalSuperLink, toml_table, write_toml_table
from .run_config import APP_CONFIG, check_flower_config
from .server_app import flower_run_dir

# what `flwr run --federation-config` accepts for a simulation (flwr 1.42's SimulationConfig), in its spelling
FEDERATION_KEYS = (
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "backend",
    "verbose",
    "init-args-num-cpus",
    "init-args-num-gpus",
    "init-args-logging-level",
    "init-args-log-to-driver",
)


def default_federation_config(cfg: Config) -> dict[str, Any]:
    """The local simulation for a config: one virtual SuperNode per client, ``threads`` CPUs each (default 1), and
    a share of the GPUs when the run uses CUDA, sized so that as many nodes run at once as the CPUs allow."""
    threads = cfg.threads or 1
    gpus = 0.0
    if cfg.device != "cpu" and torch.cuda.is_available():
        parallel = max(1, min(cfg.clients, (os.cpu_count() or 1) // threads))
        gpus = torch.cuda.device_count() / parallel
    return {"num-supernodes": cfg.clients, "client-resources-num-cpus": threads, "client-resources-num-gpus": gpus}


def federation_config_for(cfg: Config, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults with the caller's ``--federation-config`` keys on top (unknown keys are one error line)."""
    merged = default_federation_config(cfg)
    for key, value in (overrides or {}).items():
        if key not in FEDERATION_KEYS:
            raise ConfigError(f"federation config key {key!r} is not one of Flower's: {', '.join(FEDERATION_KEYS)}")
        merged[key] = value
    if int(merged["num-supernodes"]) < cfg.clients:
        raise ConfigError(
            f"num-supernodes={merged['num-supernodes']} is fewer than clients={cfg.clients}: every client is one node"
        )
    return merged


def check_node_inputs(cfg: Config) -> None:
    """What every simulated node checks first when it builds its world (device, precision, the dataset under
    ``data_root``), checked once here: they share this machine. A mistake is then one line before Flower starts,
    not every node's traceback in Flower's log (10 nodes without their dataset wrote 11,000 lines)."""
    from ..engine.world import load_dataset, run_device

    run_device(cfg)
    if cfg.dataset != "synthetic":  # generated, it cannot be missing
        load_dataset(cfg)


def write_app(folder: Path) -> Path:
    """A Flower App whose components are the installed pfedmoap's: only a ``pyproject.toml``, so the FAB that
    ``flwr run`` ships carries no code and every Flower process imports pfedmoap (weights and ``_C`` included) from
    the environment it runs in."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]",
        'name = "pfedmoap"',
        f'version = "{__version__}"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "pfedmoap"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "pfedmoap.flower.server_app:app"',
        'clientapp = "pfedmoap.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n" + toml_table(APP_CONFIG))
    return folder


def run_simulation(
    cfg: Config,
    out: str | os.PathLike | None = None,
    *,
    federation_config: Mapping[str, Any] | None = None,
    round_timeout: float = 3600.0,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> History:
    """Run a whole federation on Flower's simulation engine and return its history.

    Starts a private local SuperLink in simulation mode, submits the run with ``flwr run`` (one virtual SuperNode per
    client; ``federation_config`` takes Flower's ``--federation-config`` keys, e.g. ``{"client-resources-num-gpus":
    0.25}``), streams Flower's log to ``log`` (default: print) and stops the SuperLink again. Writes the same run
    directory as the in-process engine (``config.json``, ``metrics.jsonl``, ``summary.json``); each round's record
    also lists failed nodes. Nodes run ``cfg.threads`` torch threads (1 when unset). With the same config and seed
    the per-round accuracies equal the in-process run's on CPU.

    The simulated nodes share this machine's disk: each saves its client state under ``RUN_DIR/node-states`` (as a
    deployment node does under its ``state-dir``), so that ``resume=True`` continues the run in ``out`` from its
    last checkpoint with every node's gate, and its metrics equal an uninterrupted run's. Raises
    :class:`~pfedmoap.base.errors.RunFailed` when Flower reports the run failed.
    """
    cfg = check_flower_config(resolve_config(cfg))
    cfg = cfg.replace(threads=cfg.threads or 1, progress=False)
    target = Path(out if out is not None else flower_run_dir(cfg, cfg.out)).resolve()
    if not resume:
        RunDir.check(target)  # refuse a used folder before anything starts
    else:
        check_resumable(cfg, target)  # a damaged checkpoint or metrics.jsonl: one line before Flower starts
    check_node_inputs(cfg)
    federation = federation_config_for(cfg, federation_config)
    if verbose:
        federation["verbose"] = True
    run_config: dict[str, Any] = {
        "out": str(target),
        "node-state-dir": str(target / "node-states"),
        "round-timeout": float(round_timeout),
    }
    if resume:
        run_config["resume"] = True  # the ServerApp takes the config saved in the run directory
    else:
        run_config.update({"preset": "", "config-json": json.dumps(cfg.replace(out=str(target)).to_dict())})
    say = log or print
    with tempfile.TemporaryDirectory(prefix="pfedmoap-flower-") as scratch:
        work = Path(scratch)
        write_toml_table(work / "run-config.toml", run_config)
        with LocalSuperLink(work) as link:
            status = link.run(write_app(work / "app"), work / "run-config.toml", federation, say)
    if not status.completed:
        details = status.details if status.details not in ("", "N/A") else "see Flower's log above"
        raise RunFailed(f"the Flower run {status.run_id} ended {status.status}: {details}")
    return history_from_run_dir(target)


def check_resumable(cfg: Config, path: Path) -> None:
    """What the ServerApp checks first when it resumes the run in ``path``, here before Flower starts: its checkpoint
    loads and fits the run's config, and its ``metrics.jsonl`` belongs with it (one UserError line, exit 2)."""
    from .strategy import PFedMoAPStrategy

    checkpoint.resume_into(PFedMoAPStrategy(cfg, log=lambda _: None), RunDir(path))


def history_from_run_dir(path: str | os.PathLike) -> History:
    """A finished Flower run's :class:`History`, read back from its directory: the saved config, the summary, and the
    server side (pool, P_g, every round's record) from the checkpoint of its last round."""
    from .strategy import PFedMoAPStrategy

    path = Path(path)
    try:
        data = read_json(path / "config.json", "the run's config.json")
        summary = read_json(path / "summary.json", "the run's summary.json")
    except UserError as exc:
        raise RunFailed(f"the Flower run finished without a complete run directory: {exc}") from None
    data.pop("_meta", None)
    cfg = saved_config_from_dict(data, source=str(path / "config.json"))
    strategy = PFedMoAPStrategy(cfg, log=lambda _: None)
    ckpt = checkpoint.checkpoint_path(path)
    if ckpt.exists():
        checkpoint.restore(strategy, ckpt)
    driver = strategy.driver
    return History(cfg, driver.rounds, summary, path, driver)
