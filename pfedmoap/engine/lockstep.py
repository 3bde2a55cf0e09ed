"""Client-parallel local training: several sampled clients' local updates in lock step (``--parallel-clients``).

The sampled clients of a round are independent given the start-of-round pool snapshot. At each step every
client still training draws its own next batch (from its own generator, so its batch order is exactly the
sequential run's), builds its prompt contexts, and all of them go through the frozen text encoder in **one**
pass: the encoder's weights are the same for every client, so M small passes become one pass M times as tall.
Each client then scores its own batch with its own objective (its own gate): objectives of one kind with
equal shapes (every client at the same step, the usual case) in one ``torch.func.vmap`` call over their
stacked states, so the gate's ops also run once for all of them. The losses are summed and differentiated
once, and one multi-tensor SGD over every client's parameters (grouped by learning rate) steps them all.

The sum's gradient with respect to a client's parameters is that client's own loss gradient (no parameter is
shared), and SGD updates each parameter from its own gradient and momentum buffer only, so each client's update
is the sequential one up to float rounding (a taller GEMM may sum in another order). A client whose steps are
done leaves the lock step: its parameters get no gradient and SGD skips them (no momentum, no weight decay
applied), as if it had stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..base.tracing import nvtx_range
from ..federated.graphs import step_graphs

if TYPE_CHECKING:
    from ..federated.client import Client, Objective, TrainSettings
    from ..model.clip import FrozenCLIP


def default_parallel_clients(device: torch.device) -> int:
    """How many sampled clients train together when ``--parallel-clients`` is not given: all of a round's (0), on
    every device. On CUDA a step is bound by kernel launches; on the CPU lock step measured 1.4-2.5x faster at C = 10
    (profiling/RESULTS.md) and the README's published numbers were re-measured with it. ``--parallel-clients 1``
    trains one client after another (the sequential order, whose float rounding the numbers before this default
    had)."""
    return 0


def train_together(
    clients: Sequence[Client], objectives: Sequence[Objective], settings: TrainSettings, clip: FrozenCLIP
) -> None:
    """Train each client on its objective, all in lock step with one text-encoder pass per step (see above).

    Every objective must be :attr:`~pfedmoap.federated.objective.Objective.batchable` and encode with the same prompt
    encoder.
    """
    if len(clients) != len(objectives):
        raise ValueError(f"{len(clients)} clients but {len(objectives)} objectives")
    encoder = objectives[0].encoder
    if any(o.encoder is not encoder or not o.batchable for o in objectives):
        raise ValueError("train_together needs batchable objectives that share one prompt encoder")
    # one parameter group per learning rate (every client's prompts, every client's gates) and the multi-tensor
    # SGD: a handful of ops step every client; the update of each parameter is the same as in its own SGD
    merged: dict[tuple, dict] = {}
    for group in (g for o in objectives for g in o.param_groups()):
        options = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
        merged.setdefault(options, {**group, "params": []})["params"].extend(group["params"])
    opt = clients[0].optimizer(list(merged.values()), settings, foreach=True)
    streams = [c.batch_indices(settings) for c in clients]
    active = list(range(len(clients)))
    for o in objectives:
        o.begin()

    def step(active: list[int], *flat: torch.Tensor) -> None:
        """One lock step of the ``active`` clients on their batches (features, labels, features, labels, ...)."""
        with settings.autocast(clip.device):  # the forward only: the backward runs outside autocast
            contexts = [objectives[i].contexts() for i in active]
            with nvtx_range("step.text_encode"):
                text = encoder.encode(torch.cat(contexts))  # one pass for every active client
            parts = text.split([c.shape[0] for c in contexts])
            pairs = [(flat[2 * j], flat[2 * j + 1]) for j in range(len(active))]
            with nvtx_range("step.gate"):
                losses = _losses([objectives[i] for i in active], pairs, parts)
        with nvtx_range("step.backward"):
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
        with nvtx_range("step.optimizer"):
            opt.step()

    graphs = step_graphs(settings.cuda_graphs, clip.device, objectives)
    while True:
        indices = {}
        for i in active:
            idx = next(streams[i], None)
            if idx is not None:
                indices[i] = idx
        active = list(indices)
        if not active:
            break
        with nvtx_range("step"):
            with nvtx_range("step.features"), settings.autocast(clip.device):
                flat = [t for i in active for t in clients[i].batch(clip, indices[i])]
            if graphs is None:
                step(active, *flat)
            else:  # one graph per set of active clients (clients finish at different steps when sizes differ)
                graphs.run(functools.partial(step, active), flat, key=tuple(active))
    for o, c in zip(objectives, clients, strict=True):
        o.end()
        c.trained()


def _losses(
    objectives: Sequence[Objective],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    texts: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Each objective's loss on its batch. Objectives of one class whose tensors have the same shapes (the usual
    case: every client of a round at the same step) are computed in one ``torch.func.vmap`` call over their
    stacked states (:meth:`~pfedmoap.federated.objective.Objective.vector_state`), the others one by one. Stacking
    keeps each client's tensors in the graph, so each gets its own gradient. An objective that computes the stacked
    losses itself (:meth:`~pfedmoap.federated.objective.Objective.stacked_loss`: the fused gate's client axis) does,
    instead of vmap."""
    out: list[torch.Tensor | None] = [None] * len(objectives)
    groups: dict[tuple, list[int]] = {}
    states = [o.vector_state() for o in objectives]
    for i, (o, state) in enumerate(zip(objectives, states, strict=True)):
        if state is None:
            out[i] = o.loss_from_text(*batches[i], texts[i])
            continue
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(state.items()))
        key = (type(o), shapes, *(tuple(t.shape) for t in (*batches[i], texts[i])))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            out[i] = objectives[i].loss_from_text(*batches[i], texts[i])
            continue
        template = objectives[members[0]]
        stacked = {k: torch.stack([states[i][k] for i in members]) for k in states[members[0]]}
        features = torch.stack([batches[i][0] for i in members])
        labels = torch.stack([batches[i][1] for i in members])
        text = torch.stack([texts[i] for i in members])
        losses = template.stacked_loss(stacked, features, labels, text)  # batched ops (a fused gate's client axis)
        if losses is None:
            losses = torch.func.vmap(template.vector_loss)(stacked, features, labels, text)
        for j, i in enumerate(members):
            out[i] = losses[j]
    return out  # type: ignore[return-value]
