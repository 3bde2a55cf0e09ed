"""Section ``bytes``: bytes down / up per client and round through the library's payload and wire code, vs the paper."""

from __future__ import annotations

import argparse

import torch

from pfedmoap.federated import wire as comm
from pfedmoap.federated.selection import KnnSelection
from pfedmoap.federated.server import Server

from .harness import PAPER_PROMPT_VALUES, Sizes


def bench_bytes(sizes: Sizes, args: argparse.Namespace) -> list[dict]:
    """Bytes per client and round, through the library's round driver: the method's payload, cast for the wire and
    counted by ``RoundDriver.dispatch``."""
    from pfedmoap import make_config
    from pfedmoap.engine.rounds import RoundDriver
    from pfedmoap.methods import create_method

    rows = []
    for k in sorted({9, 19, sizes.experts}):
        for dtype in ("float16", "float32"):
            for method in ("pfedmoap", "promptfl"):
                cfg = make_config("synthetic", method=method, clients=k + 1, experts=k, comm_dtype=dtype, n_ctx=16)
                clients = k + 1
                server = Server(clients, torch.zeros(16, 512), [16] * clients, 1.0, seed=0, selection=KnnSelection())
                g = torch.Generator().manual_seed(0)
                for cid in range(clients):
                    server.receive(cid, torch.randn(16, 512, generator=g) * 0.02)
                driver = RoundDriver(cfg, create_method(cfg), server)
                driver.begin(1)
                payload = driver.dispatch(0)
                down = driver.open_round.bytes_down[0]
                up = comm.nbytes([comm.to_wire(server.pool[0], dtype)])
                size = torch.empty(0, dtype=comm.wire_dtype(dtype)).element_size()
                n_down = (k + 1) if method == "pfedmoap" else 1
                paper_down = n_down * PAPER_PROMPT_VALUES * size
                paper_up = PAPER_PROMPT_VALUES * size
                rows.append(
                    {
                        "method": method,
                        "experts": k if method == "pfedmoap" else 0,
                        "dtype": dtype,
                        "values_per_prompt": PAPER_PROMPT_VALUES,
                        "prompts_down": len(payload.expert_ids) + (payload.global_prompt is not None),
                        "bytes_down": down,
                        "bytes_up": up,
                        "paper_bytes_down": paper_down,
                        "paper_bytes_up": paper_up,
                        "matches_paper": down == paper_down and up == paper_up,
                    }
                )
    return rows
