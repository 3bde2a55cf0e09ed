"""Section ``parallel``: one round's local training of 10 clients one after another vs in lock step; with
``--fused`` also both with the fused gate (``--fused``'s backend: Triton on CUDA, the factored algebra on a CPU),
whose lock step scores every client in one client-axis call."""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pfedmoap.engine.lockstep import train_together
from pfedmoap.federated.client import Client, ClientData, TrainSettings
from pfedmoap.federated.prompt import PromptEncoder, init_prompt
from pfedmoap.gates import AttentionGate
from pfedmoap.methods.pfedmoap import MixtureObjective
from pfedmoap.model.clip import FrozenCLIP

from .harness import Sizes, bench_ops, class_names, measure


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, backward and optimiser alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def bench_parallel(sizes: Sizes, args: argparse.Namespace, clip: FrozenCLIP) -> list[dict]:
    rows = []
    for n_cls in sizes.classes:
        rows.extend(_parallel_one(sizes, clip, n_cls, fused=getattr(args, "fused", False)))
    return rows


def _parallel_one(sizes: Sizes, clip: FrozenCLIP, n_cls: int, fused: bool = False) -> list[dict]:
    """One round's local training of ``sizes.clients`` clients, each with its own prompt, gate, SGD and batch
    order, K experts each: sequential (``Client.train`` per client) vs lock step (``train_together``)."""
    device, m, k = clip.device, sizes.clients, sizes.experts
    names = class_names(n_cls)
    owned = max(1, round(n_cls / m))
    n_train = owned * sizes.shots
    g = torch.Generator().manual_seed(3000 + n_cls)
    encoder = PromptEncoder(clip, names, 16, mode="shared-prefix")
    start = init_prompt(16, clip.width, 0.02, g)
    pool = torch.stack([start + init_prompt(16, clip.width, 0.01, g) for _ in range(m)])
    settings = TrainSettings(epochs=sizes.parallel_epochs, batch_size=sizes.batch, momentum=0.9, weight_decay=5e-4)
    data = []
    for i in range(m):
        classes = [(i * owned + j) % n_cls for j in range(owned)]
        labels = torch.tensor(classes).repeat_interleave(sizes.shots)
        feats = F.normalize(torch.randn(n_train, clip.embed_dim, generator=g), dim=-1).to(device)
        data.append(
            ClientData(train_labels=labels, test_labels=labels[:1], test_features=feats[:1], train_features=feats)
        )
    with torch.no_grad():  # each client's K experts (the K others after it), encoded once per round
        expert_text = [encoder.encode(pool[[(i + 1 + j) % m for j in range(k)]]) for i in range(m)]
    tables = {"": bench_ops(False)}
    if fused:
        tables[" --fused"] = bench_ops(True)

    def setup(table) -> tuple[list[Client], list[MixtureObjective]]:
        clients, objectives = [], []
        for i in range(m):
            client = Client(i, data[i], seed=500 + i)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(500 + i)
                gate = AttentionGate(sizes.d_gate, sizes.heads, 10.0, ops=table).to(device)
            clients.append(client)
            objectives.append(MixtureObjective(encoder, start, 0.002, gate, expert_text[i], 0.5, 0.01))
        return clients, objectives

    def sequential(clients: list[Client], objectives: list[MixtureObjective]) -> None:
        for client, objective in zip(clients, objectives, strict=True):
            client.train(objective, settings, clip)

    def together(clients: list[Client], objectives: list[MixtureObjective]) -> None:
        train_together(clients, objectives, settings, clip)

    counts, prompts, runs = {}, {}, {}
    for suffix, table in tables.items():
        for name, fn in (("sequential", sequential), ("lock step", together)):
            variant = name + suffix
            clients, objectives = setup(table)
            counter = OpCounter()  # the training only: the clients' and gates' set-up is the same either way
            with counter:
                fn(clients, objectives)
            counts[variant] = counter.count
            prompts[variant] = torch.stack([o.prompt.detach().cpu() for o in objectives])
            runs[variant] = lambda fn=fn, table=table: fn(*setup(table))
    if sizes.repeats > 0:
        stats = measure(runs, sizes.repeats, device)
    else:  # --repeats 0: the dispatched ops only (they are the same on every machine)
        stats = {v: {"seconds": float("nan")} for v in runs}
    steps = settings.epochs * math.ceil(n_train / sizes.batch)
    rows = []
    for variant in runs:
        base = "sequential" + (" --fused" if variant.endswith(" --fused") else "")
        rows.append(
            {
                "model": clip.model_name,
                "classes": n_cls,
                "clients": m,
                "experts": k,
                "epochs": settings.epochs,
                "steps_per_client": steps,
                "variant": variant,
                "gate_backend": tables[variant.removeprefix("sequential").removeprefix("lock step")].backends[
                    "gate_score"
                ],
                "ops": counts[variant],
                "ops_ratio": counts["sequential"] / counts[variant],
                "seconds": stats[variant]["seconds"],
                "speedup": stats["sequential"]["seconds"] / stats[variant]["seconds"],
                # against the sequential run of the same backend (lock step reorders float sums only)
                "prompt_max_abs_diff": float((prompts[base] - prompts[variant]).abs().max()),
            }
        )
    print(
        f"parallel {clip.model_name} C={n_cls}: ops "
        + ", ".join(f"{v} {counts[v]:,} ({stats[v]['seconds']:.2f} s)" for v in runs),
        file=sys.stderr,
        flush=True,
    )
    return rows
