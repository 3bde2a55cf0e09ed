"""What travels in a Flower message between the pFedMoAP ServerApp and its nodes: the record names, the names of a
node's private state records, and the tensor codec (a tensor as a Flower ``Array`` in its wire dtype, and back).
Imports no part of the library, so both sides share it without building anything."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

# record names inside messages
PAYLOAD = "payload"  # ArrayRecord: global-prompt, expert-prompts (train); global-prompt (evaluate)
CONFIG = "config"  # ConfigRecord: round, partition-id, expert-ids, wire-dtype, config-json, ...
UPLOAD = "upload"  # ArrayRecord: prompt (train reply)
METRICS = "metrics"  # MetricRecord (every reply)
EVAL_SET_METRIC = "eval-set:"  # a metric's name prefix: a client's accuracy on a shared evaluation set (--eval-split)
NOTES = "notes"  # ConfigRecord (train and evaluate replies): where the node's client state came from, problems

# records inside a node's context.state: they never leave the node
STATE_ARRAYS = "pfedmoap.client"  # prompt, expert-prompts, generator
STATE_GATE = "pfedmoap.gate"  # the private gate's state_dict
STATE_META = "pfedmoap.meta"  # scalars and lists as one JSON string
STATE_PRIVATE = "pfedmoap.private"  # a method's other private tensors (Client.private)
STATE_TAG = "pfedmoap.tag"  # the (round, phase) of the message that left this state (node_state.state_tag)
STATE_RUN = "node.run"  # the run token of the handshake this node answered (not client state: never saved to disk)


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


def decode_tensors(record: ArrayRecord, wire_dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Every array of a record as a tensor (private copies), by name."""
    return {name: decode_tensor(array, wire_dtype) for name, array in record.items()}
