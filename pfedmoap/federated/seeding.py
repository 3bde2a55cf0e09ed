"""Every random stream of a run, named once.

A run has one seed. Each consumer draws from its own stream derived from it, so turning one feature on (client
dropout, random expert selection) never shifts another's draws, and every engine (in-process, Flower) that
names the same stream gets the same numbers.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """numpy streams, seeded ``[run_seed, stream]``; the values are part of the run format (they fix results)."""

    PARTITION = 7  # which images each client gets
    SAMPLE = 101  # which clients train in a round
    SELECT = 202  # random expert assignment (--expert-selection random)
    DROPOUT = 303  # simulated client failures (--client-dropout)
    LOCAL_PROMPT = 404  # FedOTP's initial local prompt (the same on every client, as P_g^0 is)
    LOW_RANK = 505  # FedPGP's initial low-rank factors (the same on every client)
    SERVER_NOISE = 606  # noise a method's server adds to an aggregate (DP-FPL), one draw per aggregation


def stream(seed: int, which: Stream) -> np.random.Generator:
    """The numpy generator of one named stream of the run seeded ``seed``."""
    return np.random.default_rng([seed, int(which)])


def prompt_generator(seed: int) -> torch.Generator:
    """The torch generator of the common initial prompt P_g^0 (every engine and node derives it alike)."""
    return torch.Generator().manual_seed(seed)


def init_generator(seed: int, which: Stream) -> torch.Generator:
    """The torch generator of a method's other common initial tensors (e.g. FedOTP's local prompt), one per
    stream, distinct from P_g^0's."""
    return torch.Generator().manual_seed(seed * 1_000 + int(which))


def counter_generator(seed: int, which: Stream, counter: int) -> torch.Generator:
    """The torch generator of draw number ``counter`` of a stream (e.g. the server's noise at its ``counter``-th
    aggregation): it depends on nothing but the run seed and the counter, so a resumed run draws the same numbers
    without saving a generator state."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, int(which), counter]).integers(2**62)))


def client_seed(run_seed: int, cid: int) -> int:
    """A per-client seed derived from the run seed: the client's own stream (batch order, augmentation, DP
    noise) and its gate's initialisation."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(run_seed * 1_000_003 + cid)))
