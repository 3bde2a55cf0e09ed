"""A Flower node's side of a run: the world it builds from the server's config (for its own partition only), its
partition id, and its client's private state in the node's ``context.state``.

Nothing here is a second copy of the method. A node builds the library's own
:class:`~pfedmoap.engine.world.World`, and trains and evaluates its :class:`~pfedmoap.federated.client.Client` with
the library's :class:`~pfedmoap.engine.runtime.ClientRuntime`, exactly as the in-process engine does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..base.errors import ConfigError
from ..config import Config
from ..engine.runtime import ClientRuntime
from ..engine.world import World
from ..federated.client import Client
from ..federated.plan import config_from_dict, plugins, resolve_config
from ..ops import select_ops
from .messages import STATE_ARRAYS, STATE_GATE, STATE_META, STATE_PRIVATE, decode_tensor, decode_tensors, encode_tensor
from .run_config import NODE_OVERRIDES, check_flower_config


@dataclass
class NodeView:
    """The server-held prompts as a node knows them from its message (the client side's GlobalState)."""

    init_prompt: torch.Tensor
    global_prompt: torch.Tensor
    global_version: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Node:
    """What a node runs on: the run's world (built for this node's partition only) and the shared client runtime.

    Built from the server's config alone (dataset, data seed, partition seed, model), so every node and the
    in-process engine see the same partitions, features and initial prompt.
    """

    cfg: Config
    world: World
    runtime: ClientRuntime

    def view(
        self,
        conf: Mapping[str, Any],
        global_prompt: torch.Tensor | None,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> NodeView:
        """The global state a message carries (its P_g, that P_g's version, a method's other global tensors)."""
        prompt = self.world.init_prompt if global_prompt is None else global_prompt
        return NodeView(self.world.init_prompt, prompt, int(conf.get("global-version", 0)), dict(extras or {}))

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
    for entry, key in _STATE_TENSORS.items():
        if entry != "generator" and private[entry] is not None:
            arrays[key] = encode_tensor(private[entry])
    state[STATE_ARRAYS] = arrays
    if private["gate"] is not None:
        state[STATE_GATE] = ArrayRecord.from_torch_state_dict(private["gate"])
    if private["private"]:  # a method's other private tensors (FedOTP's local prompt, FedPGP's U and V)
        state[STATE_PRIVATE] = ArrayRecord({k: encode_tensor(v) for k, v in private["private"].items()})
    meta = {k: v for k, v in private.items() if k not in _STATE_TENSORS and k not in ("gate", "private")}
    state[STATE_META] = ConfigRecord({"json": json.dumps({"cid": client.cid, **meta})})
