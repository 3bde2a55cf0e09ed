"""The research plug-ins: the average gate, gate sharing, expert-selection rules and distances, TensorBoard logging;
each against a small independent reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.selection import FixedSelection, KnnSelection, RandomSelection
from pfedmoap.federated.server import Server
from pfedmoap.gates import AverageGate, pfedmoap_logits
from pfedmoap.methods import create_method
from pfedmoap.methods.shared_gate import PREFIX, PFedMoAPSharedGate


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=5, experts=3, rounds=2, lr_prompt=0.5, lr_gate=0.1)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


# ------------------------------------------------------------------------------------------ average gate
def test_average_gate_against_explicit_loops() -> None:
    gen = torch.Generator().manual_seed(0)
    gate = AverageGate(slots=4)
    with torch.no_grad():
        gate.logits.copy_(torch.randn(4, generator=gen))
    image = F.normalize(torch.randn(3, 8, generator=gen, dtype=torch.float32), dim=-1)
    experts = F.normalize(torch.randn(3, 5, 8, generator=gen), dim=-1)  # E = 3 < 4 slots: slot 3 left out
    local = torch.randn(3, 5, generator=gen)
    logits, weights = gate(image, experts, gamma=7.0, local_logits=local, lam=0.5, need_weights=True)
    w = torch.exp(gate.logits[:3]) / torch.exp(gate.logits[:3]).sum()
    for b in range(3):
        for c in range(5):
            mixed = sum(w[e] * experts[e, c] for e in range(3))
            assert torch.allclose(logits[b, c], 7.0 * image[b] @ mixed + 0.5 * local[b, c], atol=1e-5)
    assert weights.shape == (3, 5, 3) and torch.allclose(weights.sum(-1), torch.ones(3, 5))
    logits.sum().backward()
    assert gate.logits.grad[:3].abs().sum() > 0 and gate.logits.grad[3] == 0  # the missing slot learns nothing
    assert sum(p.numel() for p in gate.parameters()) == 4  # K + 1 parameters


def test_average_gate_starts_as_the_plain_mean_and_ignores_d_gate(tiny_clip, small_world) -> None:
    gate = AverageGate(3)
    image = F.normalize(torch.randn(2, 64), dim=-1)
    experts = F.normalize(torch.randn(3, 4, 64), dim=-1)
    logits, _ = pfedmoap_logits(image, experts[0], experts[1:], gate, gamma=2.0, lam=0.0)
    torch.testing.assert_close(logits, 2.0 * image @ experts.mean(0).t())
    fed = build(tiny_clip, small_world, gate="average", d_gate=48)  # 48 does not divide 64: irrelevant here
    history = fed.run()
    assert all(isinstance(c.gate, AverageGate) for c in fed.clients if c.gate is not None)
    assert history.rounds[-1].client_attention  # its weights are reported like any gate's


# ------------------------------------------------------------------------------------------ gate sharing
def test_aggregated_gate_sharing_is_the_shared_gate_method(tiny_clip, small_world) -> None:
    assert isinstance(create_method(small_config(gate_sharing="aggregated")), PFedMoAPSharedGate)
    flag = build(tiny_clip, small_world, gate_sharing="aggregated").run()
    named = build(tiny_clip, small_world, method="pfedmoap-shared-gate").run()
    private = build(tiny_clip, small_world).run()
    for a, b in zip(flag.rounds, named.rounds, strict=True):
        assert a.client_acc == b.client_acc and a.client_bytes_up == b.client_bytes_up
    assert flag.rounds[-1].bytes_up > private.rounds[-1].bytes_up  # the gates go up too
    assert flag.rounds[-1].bytes_down > private.rounds[-1].bytes_down  # and the global gate down


def test_aggregated_gate_is_the_train_size_weighted_mean_of_the_uploaded_gates(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, gate_sharing="aggregated", frac=0.6)
    fed.run_round(1)
    fed.run_round(2)
    rec = fed.rounds[-1]
    gated = [c for c in rec.sampled if rec.experts[c]]
    assert gated
    sizes = np.array([fed.clients[c].data.num_train for c in gated], dtype=np.float64)
    for name, value in fed.server.extras.items():
        key = name[len(PREFIX) :]
        stack = np.stack([fed.clients[c].gate.state_dict()[key].double().numpy() for c in gated])
        expected = np.tensordot(sizes / sizes.sum(), stack, axes=1)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (dict(gate_sharing="aggregated", method="promptfl"), "gate_sharing=aggregated needs a method with a gate"),
        (dict(gate_sharing="private", method="pfedmoap-shared-gate"), "gate_sharing=private contradicts"),
        (dict(gate_sharing="everyone"), "gate_sharing='everyone' is not one of"),
        (dict(gate="avg"), "gate='avg' is not one of"),
        (dict(expert_selection="near"), "expert_selection='near' is not one of: fixed, knn, random"),
        (dict(expert_distance="manhattan"), "expert_distance='manhattan' is not one of: l2, cosine"),
        (dict(expert_selection="random", expert_distance="cosine"), "applies to expert_selection=knn only"),
    ],
)
def test_bad_plugin_settings_are_refused(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        small_config(**overrides)


def test_cli_refuses_a_gateless_aggregated_run_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--method", "local", "--gate-sharing", "aggregated", "--print-config"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "gate_sharing=aggregated needs a method with a gate" in proc.stderr


# ------------------------------------------------------------------------------------------ expert selection
def _view(n: int, seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.rand(n, generator=gen) * 3 + 0.1  # different norms: l2 and cosine rank differently
    return {j: torch.randn(4, 6, generator=gen) * scales[j] for j in range(n)}


def test_knn_l2_and_cosine_against_brute_force() -> None:
    view = _view(12)
    flat = {j: v.reshape(-1).double().numpy() for j, v in view.items()}
    for distance in ("l2", "cosine"):
        server = Server(12, torch.zeros(4, 6), [1] * 12, 1.0, seed=0, selection=KnnSelection(distance))
        for cid in range(12):

            def dist(j: int, cid: int = cid, distance: str = distance) -> float:
                a, b = flat[cid], flat[j]
                if distance == "l2":
                    return float(np.linalg.norm(a - b))
                return 1.0 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

            expected = sorted((j for j in view if j != cid), key=lambda j: (dist(j), j))[:4]
            assert server.select_experts(cid, view, 4) == expected, (distance, cid)
    l2 = Server(12, torch.zeros(4, 6), [1] * 12, 1.0, seed=0, selection=KnnSelection("l2"))
    cos = Server(12, torch.zeros(4, 6), [1] * 12, 1.0, seed=0, selection=KnnSelection("cosine"))
    assert any(l2.select_experts(c, view, 4) != cos.select_experts(c, view, 4) for c in range(12))


def test_fixed_gives_every_client_the_lowest_other_ids() -> None:
    view = _view(8)
    del view[2]  # not in the pool (e.g. refused): never an expert
    server = Server(8, torch.zeros(4, 6), [1] * 8, 1.0, seed=0, selection=FixedSelection())
    assert server.select_experts(0, view, 3) == [1, 3, 4]
    assert server.select_experts(5, view, 3) == [0, 1, 3]
    assert server.select_experts(2, view, 3) == []  # no own entry: first participation, no experts
    assert server.select_experts(1, view, 10) == [0, 3, 4, 5, 6, 7]


def test_random_selection_draws_from_the_selection_stream() -> None:
    view = _view(10)
    a = Server(10, torch.zeros(4, 6), [1] * 10, 1.0, seed=3, selection=RandomSelection())
    b = Server(10, torch.zeros(4, 6), [1] * 10, 1.0, seed=3, selection=RandomSelection())
    draws = [a.select_experts(c, view, 3) for c in range(10)]
    assert draws == [b.select_experts(c, view, 3) for c in range(10)]
    assert all(len(set(d)) == 3 and c not in d for c, d in enumerate(draws))


def test_a_selection_rule_runs_end_to_end(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, expert_selection="fixed", rounds=2)
    rec = fed.run().rounds[-1]
    assert rec.experts == {c: [j for j in range(5) if j != c][:3] for c in range(5)}


# ------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_event_file_holds_the_rounds(tiny_clip, small_world, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pfedmoap.engine.rundir import RunDir

    fed = build(tiny_clip, small_world, tensorboard=True, rounds=2)
    history = fed.run(RunDir.create(tmp_path / "run"))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("accuracy/mean", "accuracy/std", "bytes/down", "bytes/up", "time/round", "gate_attention/00_local"):
        assert tag in tags, tag
    means = [e.value for e in acc.Scalars("accuracy/mean")]
    assert means == pytest.approx([r.mean_acc for r in history.rounds], rel=1e-6)
    assert [e.value for e in acc.Scalars("bytes/up")] == [r.bytes_up for r in history.rounds]


def test_tensorboard_is_off_by_default_and_needs_a_run_directory(tiny_clip, small_world, tmp_path) -> None:
    from pfedmoap.engine.rundir import RunDir

    build(tiny_clip, small_world, rounds=1).run(RunDir.create(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "tensorboard").exists()
    with pytest.raises(ConfigError, match="writes into the run directory"):
        build(tiny_clip, small_world, tensorboard=True, rounds=1).run()


def test_tensorboard_missing_says_how_to_install(tiny_clip, small_world, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'pfedmoap\[tensorboard\]'"):
        build(tiny_clip, small_world, tensorboard=True)


# ------------------------------------------------------------------------------------------ context init
def test_ctx_init_in_coops_form_starts_at_the_hand_written_prompt(tiny_clip, small_world) -> None:
    """n_ctx = the phrase's token count: P_g^0's text features are those of "a photo of a {class}." exactly."""
    fed = build(tiny_clip, small_world, ctx_init="a photo of a", n_ctx=4, method="promptfl")
    torch.testing.assert_close(fed.encoder.encode(fed.server.global_prompt), fed.world.zero_shot_text())
    rec = fed.run_round(1)
    assert rec.mean_acc == rec.mean_acc  # trains from there


def test_ctx_init_pads_with_random_vectors_in_front_and_refuses_too_short_contexts(tiny_clip, small_world) -> None:
    from pfedmoap.federated.prompt import phrase_embedding

    padded = build(tiny_clip, small_world, ctx_init="a photo of a", n_ctx=6).server.global_prompt
    plain = build(tiny_clip, small_world, n_ctx=6).server.global_prompt
    phrase = phrase_embedding(tiny_clip, "a photo of a")
    assert phrase.shape == (4, tiny_clip.width)
    torch.testing.assert_close(padded[2:], phrase)
    torch.testing.assert_close(padded[:2], plain[:2])  # the same random draw where the phrase is not
    with pytest.raises(ConfigError, match="is 4 tokens, more than n_ctx=3: use --n-ctx 4"):
        build(tiny_clip, small_world, ctx_init="a photo of a", n_ctx=3)
    with pytest.raises(ConfigError, match="must be a non-empty phrase"):
        small_config(ctx_init="  ")
