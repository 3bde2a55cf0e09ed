"""A Flower run's configuration: the run config of ``flwr run`` (``[tool.flwr.app.config]`` plus ``--run-config``
overrides) to a checked :class:`~pfedmoap.config.Config` and the Flower options, what cannot run on Flower, and the
config as the server sends it to every node."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..base.errors import ConfigError
from ..config import DEFAULT_PRESET, Config
from ..federated.plan import make_config, plugin_settings

# [tool.flwr.app.config]: every run-config key and its default. pyproject.toml declares the same table (a test
# checks), and ``--engine flower`` writes it into the Flower App it runs. Flower accepts overrides only of declared
# keys and TOML has no null, so "" means "keep the preset's value".
APP_CONFIG: dict[str, str | float | bool] = {
    "preset": "synthetic",
    "config-json": "{}",  # a JSON object of any config fields
    "out": "",  # the run directory (absolute: the ServerApp's working directory is Flower's)
    "resume": False,  # continue the unfinished run in `out` from its last checkpoint, with its saved config
    "node-state-dir": "",  # a folder for the client states of nodes without a state-dir of their own
    "round-timeout": 3600.0,
    "connect-timeout": 600.0,
    **dict.fromkeys(
        ("method", "clients", "frac", "rounds", "local-epochs", "experts", "seed", "pretrained", "device",
         "comm-dtype"),
        "",
    ),
}  # fmt: skip
# run-config keys that are not Config fields
RUN_CONFIG_KEYS = ("preset", "config-json", "out", "resume", "node-state-dir", "round-timeout", "connect-timeout")
# node-config keys a node may set for itself: where its data and weights live, which device, how many threads
NODE_OVERRIDES = {
    "data-root": "data_root",
    "pretrained": "pretrained",
    "device": "device",
    "threads": "threads",
    "feature-cache": "feature_cache",  # the node's own disk: its features survive its ClientApp processes
}


@dataclass
class FlowerOptions:
    """ServerApp settings that are not part of the method's config."""

    out: str | None = None  # run directory ("" / None: runs/flower-<preset>-<method>-s<seed>-<time>)
    round_timeout: float = 3600.0  # seconds to wait for a phase's replies; late nodes count as failed
    connect_timeout: float = 600.0  # seconds to wait for `clients` nodes to connect
    resume: bool = False  # continue the run in `out` from its last checkpoint


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[Config, FlowerOptions]:
    """A validated :class:`Config` and the Flower options from a Flower run config (``[tool.flwr.app.config]``
    plus ``flwr run --run-config`` overrides).

    ``preset`` names the starting point; ``config-json`` is a JSON object of Config fields; every other key is
    a Config field in kebab case (``local-epochs``, ``lambda``). A value of ``""`` keeps the preset's value
    (TOML has no null, and Flower only accepts overrides of keys declared in pyproject.toml).
    """
    opts = FlowerOptions(
        out=str(run_config.get("out", "")) or None,
        round_timeout=float(run_config.get("round-timeout", FlowerOptions.round_timeout)),
        connect_timeout=float(run_config.get("connect-timeout", FlowerOptions.connect_timeout)),
        resume=_flag(run_config.get("resume", False), "resume"),
    )
    if opts.resume:
        return _saved_config(run_config, opts.out), opts
    preset = str(run_config.get("preset", DEFAULT_PRESET)) or None
    try:
        overrides = json.loads(str(run_config.get("config-json", "") or "{}"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"run config config-json is not valid JSON ({exc.msg})") from None
    if not isinstance(overrides, dict):
        raise ConfigError("run config config-json must be a JSON object of config fields")
    if "preset" in overrides:  # a whole config as JSON names its own preset
        named = overrides.pop("preset")
        if preset and named and named != preset:
            raise ConfigError(f"run config preset={preset!r} but config-json names preset {named!r}: give one")
        preset = preset or named
    settings = plugin_settings()
    fields = {*Config.shared_fields(), *settings}
    aliases = {s.flag.removeprefix("--"): s.name for s in settings.values()}  # lambda -> lam
    for key, value in run_config.items():
        if key in RUN_CONFIG_KEYS or value == "":
            continue
        name = aliases.get(key, key.replace("-", "_"))
        if name not in fields:
            raise ConfigError(f"run config key {key!r} is not a pfedmoap config field")
        overrides[name] = value
    return make_config(preset, **overrides), opts


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ConfigError(f"run config {key}={value!r} is not a boolean (valid: true, false)")


def _saved_config(run_config: Mapping[str, Any], out: str | None) -> Config:
    """``resume=true``: the config saved in the run directory ``out``; config keys in the run config are refused
    (a resumed run is the run it continues, as with ``--resume`` on the command line)."""
    from ..engine.launch import check_engine, saved_run

    if not out:
        raise ConfigError("run config resume=true needs out='RUN_DIR', the run to continue")
    given = [k for k, v in run_config.items() if k not in RUN_CONFIG_KEYS and v != ""]
    if str(run_config.get("config-json", "") or "{}").strip() != "{}":
        given.insert(0, "config-json")
    if given:
        raise ConfigError(f"run config resume=true continues {out} with its saved config: drop {given[0]}")
    run_dir, cfg, meta = saved_run(out)
    check_engine(run_dir, meta, "flower")
    return cfg


def check_flower_config(cfg: Config) -> Config:
    """Refuse the settings that cannot run on Flower (one line, exit 2 from the CLI)."""
    if cfg.pool_view == "live":
        raise ConfigError(
            "pool_view='live' needs the clients of a round to run one after another; Flower runs them in "
            "parallel: use --pool-view snapshot (the paper) or --engine local"
        )
    if cfg.parallel_clients not in (None, 1):
        raise ConfigError(
            f"parallel_clients={cfg.parallel_clients} applies to the in-process engine; a Flower node trains its one "
            "client: drop --parallel-clients or use --engine local"
        )
    return cfg


def config_json(cfg: Config) -> str:
    """The config as the server sends it to every node (canonical, so nodes can cache their world by it)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)
