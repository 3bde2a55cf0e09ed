"""Client-parallel local training (``--parallel-clients``) equals the sequential run: every client's prompt, gate
and private tensors, the server's pool and global prompt, and the accuracies, round after round."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pfedmoap.engine.runtime as runtime_module
from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.plan import make_config
from tests.conftest import federation_tensors, small_config

RTOL = 1e-5  # a taller batched GEMM may sum in another order (on these CPUs the results were bit-equal)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _assert_same(seq: Federation, par: Federation) -> None:
    a, b = federation_tensors(seq), federation_tensors(par)
    assert a.keys() == b.keys()
    worst = max((_rel(b[k], a[k]), k) for k in a)
    assert worst[0] <= RTOL, worst


def _run_both(cfg, rounds: int, together: int = 100) -> tuple[Federation, Federation, list[int]]:
    seq = Federation(cfg.replace(parallel_clients=1), log=lambda _: None)
    par = Federation(cfg.replace(parallel_clients=together), log=lambda _: None)
    groups = []
    spy = runtime_module.train_together

    def counting(clients, objectives, *args, **kwargs):
        groups.append(len(clients))
        return spy(clients, objectives, *args, **kwargs)

    runtime_module.train_together = counting
    try:
        for t in range(1, rounds + 1):
            ra, rb = seq.run_round(t), par.run_round(t)
            _assert_same(seq, par)
            assert ra.client_acc == pytest.approx(rb.client_acc, abs=1e-9, nan_ok=True)
            assert ra.client_bytes_up == rb.client_bytes_up and ra.dropped == rb.dropped and ra.failed == rb.failed
    finally:
        runtime_module.train_together = spy
    return seq, par, groups


@pytest.mark.parametrize(
    "method",
    ["pfedmoap", "promptfl", "fedprox", "local", pytest.param("fedotp", marks=pytest.mark.slow), "fedpgp"],
)
def test_parallel_round_equals_sequential(method):
    # round 1: every client's first participation (pFedMoAP: prompt only); round 2: with experts and gates
    cfg = small_config(method=method, clients=4, experts=2, rounds=2)
    _, _, groups = _run_both(cfg, rounds=2)
    assert groups == [4, 4]  # every sampled client trained in one lock-step group


def test_parallel_with_partial_participation_dropout_dp_and_groups():
    cfg = small_config(
        method="pfedmoap", clients=6, experts=2, rounds=3, frac=0.7, client_dropout=0.25, dp_epsilon=50.0
    )
    seq, _, groups = _run_both(cfg, rounds=3, together=2)
    assert all(g <= 2 for g in groups) and groups
    assert sum(len(r.dropped) for r in seq.rounds) > 0  # dropout happened, identically


def test_parallel_aggregated_gate():
    _run_both(small_config(method="pfedmoap", gate_sharing="aggregated", clients=4, experts=2, rounds=2), rounds=2)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("pfedmoap", {}), ("fedotp", {}), ("pfedmoap", {"eval_split": "base2novel", "subsample": "base", "frac": 0.5})],
)
def test_parallel_evaluation_encodes_all_clients_in_one_pass(method, extra, monkeypatch):
    """Issue 15, item 2: the evaluation of a lock-step run encodes every evaluated prompt's text in one pass per
    class set (the experts a client trained with this round come from its update), with the sequential accuracies.
    """
    cfg = small_config(method=method, clients=4, experts=2, rounds=2, **extra)
    seq = Federation(cfg.replace(parallel_clients=1), log=lambda _: None)
    par = Federation(cfg.replace(parallel_clients=4), log=lambda _: None)
    world = par.runtime.world
    encoders = [par.encoder] + [es.encoder for es in world.eval_sets() if es.encoder is not par.encoder]
    calls: list[tuple[int, int]] = []  # (which encoder, how many prompts) of every encode call
    for i, enc in enumerate(encoders):
        monkeypatch.setattr(enc, "encode", _recording(enc.encode, i, calls))
    prefetched: list[tuple[int, int]] = []  # what prefetch_text reported: (passes, encode calls)
    evaluated: list[list[tuple[int, int]]] = []  # the encode calls of each whole evaluation
    prefetch, evaluate = par.runtime.prefetch_text, par.evaluate

    def counting_prefetch(*args, **kwargs):
        start = len(calls)
        count = prefetch(*args, **kwargs)
        prefetched.append((count, len(calls) - start))
        return count

    def counting_evaluate():
        start = len(calls)
        out = evaluate()
        evaluated.append(calls[start:])
        return out

    monkeypatch.setattr(par.runtime, "prefetch_text", counting_prefetch)
    monkeypatch.setattr(par, "evaluate", counting_evaluate)
    for t in (1, 2):
        ra, rb = seq.run_round(t), par.run_round(t)
        assert ra.client_acc == pytest.approx(rb.client_acc, abs=1e-9, nan_ok=True)
        assert ra.split_acc == rb.split_acc
        made = evaluated[-1]
        # every encode of the evaluation is prefetch's, one per class set
        assert prefetched[-1] == (len(made), len(made)) and len(made) == len({i for i, _ in made}), made
        if t == 2 and method == "pfedmoap" and not extra:
            # every client trained this round and keeps its experts' features: its own 4 new prompts, one pass
            assert made == [(0, 4)]


def _recording(encode, which: int, calls: list[tuple[int, int]]):
    def wrapped(ctx: torch.Tensor) -> torch.Tensor:
        calls.append((which, 1 if ctx.dim() == 2 else ctx.shape[0]))
        return encode(ctx)

    return wrapped


def test_bad_parallel_settings_are_one_line():
    with pytest.raises(ConfigError, match=r"parallel_clients=0 must be an integer >= 1"):
        make_config("synthetic", parallel_clients=0)
    with pytest.raises(ConfigError, match="parallel_clients=10 needs pool_view=snapshot"):
        make_config("synthetic", parallel_clients=10, pool_view="live")
    make_config("synthetic", parallel_clients=1, pool_view="live")  # sequential is fine with the live pool
    pytest.importorskip("flwr")
    from pfedmoap.flower.run_config import check_flower_config

    with pytest.raises(ConfigError, match="parallel_clients=4 applies to the in-process engine"):
        check_flower_config(make_config("synthetic", parallel_clients=4))


@pytest.mark.parametrize("backend", ["triton", "factored"])
def test_fused_lock_step_scores_every_client_in_one_launch(backend, monkeypatch):
    """Issue 28, item 1: with ``--fused`` the lock step no longer falls back to one client at a time. Every
    client's gate is scored in one client-axis call per step (the Triton kernels in the interpreter without a GPU,
    or the factored CPU backend), and the run equals the sequential ``--fused`` run within the lock step's
    tolerance."""
    import os

    from pfedmoap import ops

    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    clients_per_call: list[int] = []
    pinned = ops.select_ops(pins={"gate_score": backend})

    def counted(query, *args, **kwargs):
        clients_per_call.append(query.shape[0])
        return pinned.gate_score_clients(query, *args, **kwargs)

    table = dataclasses.replace(pinned, gate_score_clients=counted)
    monkeypatch.setattr("pfedmoap.engine.federation.select_ops", lambda fused: table)
    # 1 shot x 10 classes, one local epoch: one step per client and round (the interpreter is slow)
    cfg = small_config(method="pfedmoap", clients=4, experts=2, rounds=2, shots=1, fused=True)
    seq, par, groups = _run_both(cfg, rounds=2)
    assert groups == [4, 4] and seq.backends["gate_score"] == par.backends["gate_score"] == backend
    # round 2 trains the gates: its one lock step scored all 4 clients in one client-axis call (the sequential run
    # and the evaluations score one client at a time, through gate_score)
    assert clients_per_call == [4]


def test_lock_step_is_the_default_on_every_device_and_sequential_one_flag_away():
    fed = Federation(small_config(clients=2, experts=1, rounds=1), log=lambda _: None)
    assert fed.parallel_clients == 0  # all of a round's sampled clients, CPU included
    assert Federation(small_config(clients=2, experts=1, parallel_clients=1), log=lambda _: None).parallel_clients == 1
    live = Federation(small_config(clients=2, experts=1, pool_view="live", lam=0.0), log=lambda _: None)
    assert live.parallel_clients == 1  # the live pool: each client sees the uploads before it


@pytest.mark.slow
def test_default_run_parallel_accuracy_within_half_a_point():
    """The default run (shipped weights, 10 rounds), all clients in lock step: per-round mean accuracy within 0.5."""
    cfg = make_config("synthetic", progress=False)
    seq = Federation(cfg.replace(parallel_clients=1), log=lambda _: None).run()
    par = Federation(cfg.replace(parallel_clients=cfg.clients), log=lambda _: None).run()
    for a, b in zip(seq.rounds, par.rounds, strict=True):
        assert abs(a.mean_acc - b.mean_acc) <= 0.5, (a.round, a.mean_acc, b.mean_acc)
