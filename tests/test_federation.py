import json

import numpy as np
import pytest
import torch
from conftest import small_config

from pfedmoap.engine.federation import Federation
from pfedmoap.engine.launch import run


def build(tiny_clip, small_world, **overrides):
    return Federation(small_config(**overrides), clip=tiny_clip, dataset=small_world, log=lambda m: None)


def test_first_participation_has_no_experts_then_k_nearest(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, rounds=2, experts=3)
    r1 = fed.run_round(1)
    assert all(v == [] for v in r1.experts.values())
    assert all(c.gate is None for c in fed.clients)  # no experts -> no gate was needed yet
    view = fed.server.snapshot()
    r2 = fed.run_round(2)
    for cid, ids in r2.experts.items():
        assert len(ids) == 3 and cid not in ids
        # the K nearest by L2 in the start-of-round pool
        d = {j: float((view[j] - view[cid]).pow(2).sum()) for j in view if j != cid}
        assert ids == sorted(d, key=lambda j: (d[j], j))[:3]
    assert all(c.gate is not None for c in fed.clients)


def test_pool_snapshot_vs_live(tiny_clip, small_world):
    """Snapshot (paper): every client of round t sees the pool as it was after round t-1. Live (reference
    code): later clients already see the prompts uploaded earlier in the same round."""
    seen = {}
    for view_name in ("snapshot", "live"):
        fed = build(tiny_clip, small_world, experts=2, pool_view=view_name)
        fed.run_round(1)
        before = {k: v.clone() for k, v in fed.server.pool.items()}
        order = fed.server.sample
        fed.server.sample = lambda order=order: sorted(order())
        calls = []
        select = fed.server.select_experts
        fed.server.select_experts = lambda cid, view, k, select=select, calls=calls: (
            calls.append((cid, view[0].clone())) or select(cid, view, k)
        )
        fed.run_round(2)
        last_cid, last_view_of_0 = calls[-1]
        assert last_cid != 0
        seen[view_name] = (before[0], last_view_of_0, fed.server.pool[0])
    old, viewed, new = seen["snapshot"]
    assert torch.equal(viewed, old) and not torch.equal(viewed, new)
    old, viewed, new = seen["live"]
    assert torch.equal(viewed, new) and not torch.equal(viewed, old)


def test_gate_never_leaves_its_client(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, rounds=3, experts=2, frac=0.5, clients=4)
    fed.run_round(1)
    fed.run_round(2)
    gates_before = {c.cid: {k: v.clone() for k, v in c.gate.state_dict().items()} for c in fed.clients if c.gate}
    rec = fed.run_round(3)
    sampled = set(rec.sampled)
    for cid, state in gates_before.items():
        now = fed.clients[cid].gate.state_dict()
        same = all(torch.equal(state[k], now[k]) for k in state)
        assert same == (cid not in sampled)  # only its own training changes a gate
    # uploads are prompts only: exactly n_ctx x W floats each
    prompt_bytes = 16 * tiny_clip.width * 4
    assert all(v == prompt_bytes for v in rec.client_bytes_up.values())
    assert not any(hasattr(fed.server, name) for name in ("gate", "gates"))


def test_no_state_leaks_between_clients(tiny_clip, small_world):
    """With the round-start pool, a client's update must not depend on who trained before it."""
    a = build(tiny_clip, small_world, experts=2, rounds=2)
    b = build(tiny_clip, small_world, experts=2, rounds=2)
    original = b.server.sample
    b.server.sample = lambda: list(reversed(original()))
    for t in (1, 2):
        a.run_round(t)
        b.run_round(t)
    for cid in a.server.pool:
        torch.testing.assert_close(a.server.pool[cid], b.server.pool[cid], rtol=0, atol=0)
    torch.testing.assert_close(a.server.global_prompt, b.server.global_prompt, rtol=1e-6, atol=1e-7)


def test_fedavg_weights_by_train_size(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, method="promptfl", partition="dirichlet", clients=4, min_client_size=5)
    fed.run_round(1)
    sizes = torch.tensor([c.data.num_train for c in fed.clients], dtype=torch.float64)
    expected = sum(sizes[i] / sizes.sum() * fed.server.pool[i].double() for i in range(4))
    torch.testing.assert_close(fed.server.global_prompt, expected.float())


def test_bytes_match_paper_shapes(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, experts=3, rounds=2, comm_dtype="float16")
    fed.run_round(1)
    rec = fed.run_round(2)
    per_prompt = 16 * tiny_clip.width * 2  # n_ctx x W values in fp16
    assert set(rec.client_bytes_down.values()) == {4 * per_prompt}  # P_g + K = 3 experts
    assert set(rec.client_bytes_up.values()) == {per_prompt}


@pytest.mark.parametrize("method", ["promptfl", "fedprox", "local", "zeroshot", "pfedmoap"])
def test_every_method_runs(tiny_clip, small_world, method):
    fed = build(tiny_clip, small_world, method=method, clients=4, experts=2, rounds=2)
    hist = fed.run()
    assert hist.rounds and all(0.0 <= r.mean_acc <= 100.0 for r in hist.rounds)
    if method == "local":
        assert hist.summary["total_bytes_down"] == hist.summary["total_bytes_up"] == 0
    if method == "zeroshot":
        assert [r.round for r in hist.rounds] == [0]


def test_hundred_clients_ten_percent(tiny_clip):
    from pfedmoap.data import DatasetOptions, create_dataset

    world = create_dataset("synthetic", DatasetOptions(train_per_class=40, test_per_class=10))
    cfg = small_config(
        clients=100,
        frac=0.1,
        partition="dirichlet",
        min_client_size=4,
        rounds=3,
        train_per_class=40,
        test_per_class=10,
        experts=9,
    )
    fed = Federation(cfg, clip=tiny_clip, dataset=world, log=lambda m: None)
    hist = fed.run()
    assert [len(r.sampled) for r in hist.rounds] == [10, 10, 10]
    assert len(hist.rounds[-1].client_acc) == 100
    assert len(fed.server.pool) <= 30


def test_same_seed_same_metrics_different_seed_differs(tiny_clip, small_world, tmp_path):
    cfg = small_config(experts=2, clients=4, rounds=2)
    h1 = run(cfg, out=tmp_path / "a", log=lambda m: None)
    h2 = run(cfg, out=tmp_path / "b", log=lambda m: None)
    h3 = run(cfg.replace(seed=2), out=tmp_path / "c", log=lambda m: None)
    accs = lambda h: [r.client_acc for r in h.rounds]  # noqa: E731
    assert accs(h1) == accs(h2)
    assert torch.equal(h1.federation.server.global_prompt, h2.federation.server.global_prompt)
    assert not torch.equal(h1.federation.server.global_prompt, h3.federation.server.global_prompt)
    assert np.isfinite(h1.summary["last5_mean_acc"])


def test_rejected_upload_does_not_enter_pool(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, clients=4, experts=2)
    bad = torch.full((16, tiny_clip.width), float("nan"))
    assert not fed.server.receive(0, bad)
    assert not fed.server.receive(1, torch.zeros(3, 3))
    assert fed.server.pool == {} and [c for c, _ in fed.server.rejected] == [0, 1]


def test_image_encoder_runs_once_per_image_unless_augmenting(tiny_clip, small_world, monkeypatch):
    fed = build(tiny_clip, small_world, clients=4, experts=2, rounds=1)
    assert fed.clients[0].data.train_features is not None and fed.clients[0].data.train_images is None
    calls = []
    original = tiny_clip.encode_images
    monkeypatch.setattr(tiny_clip, "encode_images", lambda x: calls.append(len(x)) or original(x))
    fed.run_round(1)
    assert calls == []  # training and evaluation use the cached features
    aug = build(tiny_clip, small_world, clients=4, experts=2, rounds=1, augment=True)
    assert aug.clients[0].data.train_features is None and aug.clients[0].data.train_images is not None
    calls.clear()  # building it encoded the test images once
    aug.run_round(1)
    n_train = sum(c.data.num_train for c in aug.clients)
    assert sum(calls) == n_train  # one epoch: every train image re-encoded once, augmented


def test_experiments_sweep_writes_table(tmp_path):
    from pfedmoap.research.sweeps import markdown_table, run_sweep

    overrides = dict(
        pretrained="none",
        rounds=2,
        local_epochs=1,
        train_per_class=10,
        test_per_class=4,
        progress=False,
        clients=4,
        experts=2,
    )
    results = run_sweep(["synthetic"], ["zeroshot", "pfedmoap"], [1, 2], tmp_path, overrides, log=lambda m: None)
    table = markdown_table(results)
    pytest.importorskip("matplotlib")
    from pfedmoap.research.sweeps import write_plots

    written = write_plots(tmp_path, ["synthetic"], ["zeroshot", "pfedmoap"], [1, 2])
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "attention.png", "bytes.png", "client_accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert "| Zero-shot CLIP |" in table and "| pFedMoAP, lambda = 0.5 |" in table
    assert (tmp_path / "synthetic" / "pfedmoap" / "seed2" / "summary.json").is_file()
    # finished runs are reused, not rerun
    stamp = (tmp_path / "synthetic" / "pfedmoap" / "seed1" / "summary.json").stat().st_mtime_ns
    run_sweep(["synthetic"], ["pfedmoap"], [1], tmp_path, overrides, log=lambda m: None)
    assert (tmp_path / "synthetic" / "pfedmoap" / "seed1" / "summary.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("preset", ["synthetic", "synthetic-dirichlet", "synthetic-domains"])
def test_every_preset_builds_and_runs_a_round(tiny_clip, preset):
    from pfedmoap.config import list_presets
    from pfedmoap.federated.plan import make_config

    assert preset in list_presets()
    cfg = make_config(preset, pretrained="none", rounds=1, local_epochs=1, progress=False)
    fed = Federation(cfg, clip=tiny_clip, log=lambda m: None)
    rec = fed.run_round(1)
    assert len(rec.sampled) == max(1, int(cfg.frac * cfg.clients))
    assert len(rec.client_acc) == cfg.clients
    if cfg.partition == "domain-dirichlet":
        assert sorted({s.domain for s in fed.world.splits}) == sorted(set(fed.dataset.train.domains.tolist()))


def test_client_dropout_round_goes_on(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, clients=6, experts=2, rounds=4, client_dropout=0.5)
    hist = fed.run()
    dropped = [set(r.dropped) for r in hist.rounds]
    assert any(dropped) and not all(d == set(r.sampled) for d, r in zip(dropped, hist.rounds, strict=True))
    for d, r in zip(dropped, hist.rounds, strict=True):
        assert d <= set(r.sampled)
        assert all(r.client_bytes_up[c] == 0 for c in d)
        assert len(r.client_acc) == 6 and all(np.isfinite(r.client_acc))
    never_ok = set(range(6)) - {c for d, r in zip(dropped, hist.rounds, strict=True) for c in r.sampled if c not in d}
    assert not (never_ok & set(fed.server.pool))
    # the failures come from their own seeded stream: same config, same failures
    again = build(tiny_clip, small_world, clients=6, experts=2, rounds=4, client_dropout=0.5).run()
    assert [r.dropped for r in again.rounds] == [r.dropped for r in hist.rounds]
    assert [r.client_acc for r in again.rounds] == [r.client_acc for r in hist.rounds]


def test_upload_norm_bound_rejects_and_leaves_pool_and_global_alone(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, clients=4, experts=2, rounds=1, max_prompt_norm=1e-6)
    init = fed.server.global_prompt.clone()
    rec = fed.run_round(1)
    assert fed.server.pool == {}
    assert torch.equal(fed.server.global_prompt, init)
    assert sorted(c for c, _ in rec.rejected_uploads) == sorted(rec.sampled)
    assert all("max_prompt_norm" in reason for _, reason in rec.rejected_uploads)


def test_gate_attention_is_recorded_per_client(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, clients=4, experts=2, rounds=2)
    r1 = fed.run_round(1)
    assert r1.client_attention == {}  # first participation: no experts, no gate
    r2 = fed.run_round(2)
    assert sorted(r2.client_attention) == [0, 1, 2, 3]
    for weights in r2.client_attention.values():
        assert len(weights) == 3 and abs(sum(weights) - 1.0) < 1e-5  # local + K = 2 experts, a distribution


def test_experiments_command_end_to_end(tmp_path, capsys):
    """The CLI itself: table (markdown + JSON) and plots on the synthetic world, tiny sizes."""
    from pfedmoap.experiments import main as experiments_main

    sets = [
        "pretrained=none",
        "rounds=2",
        "local_epochs=1",
        "train_per_class=10",
        "test_per_class=4",
        "clients=4",
        "experts=2",
    ]
    argv = ["--methods", "zeroshot,promptfl,pfedmoap", "--seeds", "1,2", "--out", str(tmp_path)]
    for item in sets:
        argv += ["--set", item]
    assert experiments_main(argv) == 0
    report = (tmp_path / "results.md").read_text()
    assert "| pFedMoAP, lambda = 0.5 |" in report and "| PromptFL (FedAvg prompt) |" in report
    assert json.loads((tmp_path / "results.json").read_text())["synthetic"]["pfedmoap"]["seeds"] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "plots" / "synthetic").iterdir()) == [
        "accuracy.png",
        "attention.png",
        "bytes.png",
        "client_accuracy.png",
    ]
    assert experiments_main([*argv[:6], "--set", "nonsense"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
