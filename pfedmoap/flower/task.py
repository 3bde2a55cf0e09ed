"""What the Flower ServerApp and ClientApp share: run config, wire codec, node worlds and node-private state.

Nothing here is a second copy of the method. A node builds the library's own :class:`~pfedmoap.world.World` from
the config the server sends, for its own partition only (its split, its images' features), and trains and
evaluates its :class:`~pfedmoap.client.Client` with the library's :class:`~pfedmoap.runtime.ClientRuntime`, exactly
as the in-process engine does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..client import Client
from ..config import DEFAULT_PRESET, Config
from ..errors import ConfigError
from ..ops import select_ops
from ..plan import config_from_dict, make_config, plugin_settings, plugins, resolve_config
from ..runtime import ClientRuntime
from ..world import World

# record names inside messages
PAYLOAD = "payload"  # ArrayRecord: global-prompt, expert-prompts (train); global-prompt (evaluate)
CONFIG = "config"  # ConfigRecord: round, partition-id, expert-ids, wire-dtype, config-json, ...
UPLOAD = "upload"  # ArrayRecord: prompt (train reply)
METRICS = "metrics"  # MetricRecord (every reply)
NOTES = "notes"  # ConfigRecord (train and evaluate replies): where the node's client state came from, problems

# records inside a node's context.state: they never leave the node
STATE_ARRAYS = "pfedmoap.client"  # prompt, expert-prompts, generator
STATE_GATE = "pfedmoap.gate"  # the private gate's state_dict
STATE_META = "pfedmoap.meta"  # scalars and lists as one JSON string
STATE_PRIVATE = "pfedmoap.private"  # a method's other private tensors (Client.private)
STATE_TAG = "pfedmoap.tag"  # the (round, phase) of the message that left this state (node_state.state_tag)
STATE_RUN = "node.run"  # the run token of the handshake this node answered (not client state: never saved to disk)

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
    fields = {f.name for f in dataclasses.fields(Config)} - {"settings"} | set(settings)
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
    from ..launch import check_engine, saved_run

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


# ------------------------------------------------------------------------------------------ wire codec
def encode_tensor(t: torch.Tensor) -> Array:
    """A tensor as a Flower Array in its own dtype (bfloat16 travels as its int16 bit pattern)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        return Array(t.view(torch.int16).numpy())
    return Array(t.numpy())


def decode_tensor(array: Array, wire_dtype: str | None = None) -> torch.Tensor:
    """A Flower Array back to a tensor (a private copy). Raises on anything numpy cannot load without pickle."""
    data = np.array(array.numpy(), copy=True)
    t = torch.from_numpy(data)
    if wire_dtype == "bfloat16" and t.dtype == torch.int16:
        t = t.view(torch.bfloat16)
    return t


# ------------------------------------------------------------------------------------------ node worlds
@dataclass
class NodeView:
    """The server-held prompts as a node knows them from its message (the client side's GlobalState)."""

    init_prompt: torch.Tensor
    global_prompt: torch.Tensor
    global_version: int


@dataclass
class Node:
    """What a node runs on: the run's world (built for this node's partition only) and the shared client runtime.

    Built from the server's config alone (dataset, data seed, partition seed, model), so every node and the
    in-process engine see the same partitions, features and initial prompt.
    """

    cfg: Config
    world: World
    runtime: ClientRuntime

    def view(self, conf: Mapping[str, Any], global_prompt: torch.Tensor | None) -> NodeView:
        """The global state a message carries (its P_g and that P_g's version)."""
        prompt = self.world.init_prompt if global_prompt is None else global_prompt
        return NodeView(self.world.init_prompt, prompt, int(conf.get("global-version", 0)))

    def load_client(self, pid: int, state: RecordDict) -> Client:
        """The partition's client with the private state this node saved before (a fresh one on first contact).

        A process may serve many nodes, so the state always comes from the node's own ``context.state``.
        """
        client = self.world.new_client(pid)
        if STATE_META not in state:
            return client
        meta = json.loads(str(state[STATE_META]["json"]))
        if int(meta["cid"]) != pid:
            raise ConfigError(f"this node's saved state belongs to partition {meta['cid']}, not {pid}")
        arrays = state[STATE_ARRAYS]
        private = {f: decode_tensor(arrays[key]) if key in arrays else None for f, key in _STATE_TENSORS.items()}
        private["gate"] = state[STATE_GATE].to_torch_state_dict() if STATE_GATE in state else None
        private["private"] = decode_tensors(state[STATE_PRIVATE]) if STATE_PRIVATE in state else {}
        private.update({k: v for k, v in meta.items() if k != "cid"})
        client.load_state_dict(private, self.runtime.make_gate, self.world.device)
        return client


_NODES: dict[str, Node] = {}


def node_config_overrides(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields a node sets for itself through its node config (data-root, pretrained, device, threads)."""
    return {field: node_config[key] for key, field in NODE_OVERRIDES.items() if key in node_config}


def node_for(cfg_json: str, node_config: Mapping[str, Any]) -> Node:
    """The node's world and runtime for the server's config (one per config per process: a process that serves
    several nodes of a run shares the model and dataset and encodes each partition's images once)."""
    try:
        data = json.loads(cfg_json)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the server sent a config that is not JSON ({exc.msg})") from None
    data.update(node_config_overrides(node_config))
    cfg = check_flower_config(resolve_config(config_from_dict(data, source="server config")))
    cfg = cfg.replace(progress=False, out=None)
    # a node is one of many processes on its machine: one torch thread unless the config or node config says more,
    # set before the world is built (a few processes of 2 threads each on 2 cores run 10x slower)
    torch.set_num_threads(cfg.threads or 1)
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    node = _NODES.get(key)
    if node is None:
        _NODES.clear()  # one run's world per process bounds memory
        ops = select_ops(cfg.fused)
        found = plugins(cfg)
        world = World(cfg, ops, plugins=found)
        node = Node(cfg, world, ClientRuntime(cfg, world, found.method(cfg), ops))
        _NODES[key] = node
    return node


def partition_id(node_config: Mapping[str, Any], num_clients: int) -> int:
    """This node's partition id (from its node config), checked against the number of clients."""
    if "partition-id" not in node_config:
        raise ConfigError("this node has no partition-id: start it with --node-config 'partition-id=K'")
    pid = int(node_config["partition-id"])
    if not 0 <= pid < num_clients:
        raise ConfigError(f"partition-id={pid} is outside 0..{num_clients - 1} (the run has {num_clients} clients)")
    return pid


# ------------------------------------------------------------------------------------------ node state
# the tensors of Client.state_dict(); its other fields are JSON in a ConfigRecord, the gate an ArrayRecord
_STATE_TENSORS = {"generator": "generator", "prompt": "prompt", "expert_prompts": "expert-prompts"}


def save_client_state(client: Client, state: RecordDict) -> None:
    """Write a client's private state into the node's ``context.state`` (which never leaves the node)."""
    private = client.state_dict()
    arrays = ArrayRecord()
    arrays["generator"] = Array(private["generator"].numpy())
    for field, key in _STATE_TENSORS.items():
        if field != "generator" and private[field] is not None:
            arrays[key] = encode_tensor(private[field])
    state[STATE_ARRAYS] = arrays
    if private["gate"] is not None:
        state[STATE_GATE] = ArrayRecord.from_torch_state_dict(private["gate"])
    if private["private"]:  # a method's other private tensors (FedOTP's local prompt, FedPGP's U and V)
        state[STATE_PRIVATE] = ArrayRecord({k: encode_tensor(v) for k, v in private["private"].items()})
    meta = {k: v for k, v in private.items() if k not in _STATE_TENSORS and k not in ("gate", "private")}
    state[STATE_META] = ConfigRecord({"json": json.dumps({"cid": client.cid, **meta})})


def decode_tensors(record: ArrayRecord, wire_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Every array of a record as a tensor (private copies), by name."""
    return {name: decode_tensor(array, wire_dtype) for name, array in record.items()}
