"""The pFedMoAP ServerApp: builds the config, the run directory and the strategy, then runs every round.

The config comes from the run config (``[tool.flwr.app.config]`` in pyproject.toml plus ``flwr run --run-config``
overrides, see :func:`~pfedmoap.flower.run_config.config_from_run_config`), also for ``--engine flower``, which submits
the run to a local SuperLink with ``flwr run`` (:mod:`~pfedmoap.flower.simulation`). ``resume=true`` continues the
unfinished run in ``out``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.http_grid import HttpGrid

from ..config import Config
from ..engine import checkpoint
from ..engine.launch import default_run_dir
from ..engine.records import History
from ..engine.rundir import RunDir
from ..federated.plan import resolve_config
from .run_config import FlowerOptions, check_flower_config, config_from_run_config
from .strategy import PFedMoAPStrategy, PromptGrid


def flower_run_dir(cfg: Config, out: str | None) -> str:
    """``out`` if given, else ``runs/flower-<preset>-<method>-s<seed>-<time>``."""
    if out:
        return out
    default = default_run_dir(cfg)
    return str(default.with_name("flower-" + default.name))


def make_server_app(
    cfg: Config | None = None,
    options: FlowerOptions | None = None,
    results: list[History] | None = None,
    log: Callable[[str], None] | None = None,
) -> ServerApp:
    """A ServerApp for one run. ``cfg`` / ``options`` default to the run config (tests pass them with a fake grid);
    the finished :class:`History` is appended to ``results``. With ``options.resume``, the run in ``options.out``
    continues from its last checkpoint."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:
            config, opts = config_from_run_config(context.run_config)
        else:
            config, opts = cfg, options or FlowerOptions()
        config = check_flower_config(resolve_config(config))
        resume = opts.resume
        if config.threads:  # the server's own work (aggregation, expert selection) obeys --threads too
            torch.set_num_threads(config.threads)
        target = flower_run_dir(config, opts.out)
        if not resume:
            RunDir.check(target)
        say = log or logging.getLogger("flwr").info
        strategy = PFedMoAPStrategy(
            config, log=say, round_timeout=opts.round_timeout, connect_timeout=opts.connect_timeout
        )
        if resume:
            checkpoint.resume_into(strategy, RunDir(target))
        if isinstance(grid, HttpGrid):  # a deployment: collect replies as they come, not every 3 s
            grid = PromptGrid(grid)
        strategy.connect(grid)  # nodes build their worlds first: a run that cannot start writes nothing
        if resume:
            strategy.run_dir = RunDir(target)
            done = strategy.rounds[-1].round if strategy.rounds else 0
            say(f"flower: resuming {strategy.run_dir.path.resolve()} after round {done}")
        else:
            strategy.run_dir = RunDir.create(target)
            say(f"flower: writing the run to {strategy.run_dir.path.resolve()}")
        history = strategy.run(grid, resumed=resume)
        if results is not None:
            results.append(history)

    return app


app = make_server_app()
