"""What each method trains, sends and is judged with: tests that fail when a method's one difference is lost."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.gates import mixture_scorer
from pfedmoap.methods.shared_gate import PREFIX


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=4, experts=2, rounds=3, lr_prompt=0.5, lr_gate=0.1)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


def test_fedprox_proximal_term_changes_the_update(tiny_clip, small_world):
    """mu = 0 is PromptFL exactly; a large mu pulls every local prompt toward P_g, so uploads move less."""
    promptfl = build(tiny_clip, small_world, method="promptfl")
    free = build(tiny_clip, small_world, method="fedprox", fedprox_mu=0.0)
    pulled = build(tiny_clip, small_world, method="fedprox", fedprox_mu=1.0)
    start = promptfl.server.global_prompt.clone()
    for fed in (promptfl, free, pulled):
        fed.run_round(1)
    for cid in range(4):
        assert torch.equal(free.server.pool[cid], promptfl.server.pool[cid])
        moved_free = float((free.server.pool[cid] - start).norm())
        moved_pulled = float((pulled.server.pool[cid] - start).norm())
        assert moved_pulled < 0.9 * moved_free, (cid, moved_pulled, moved_free)


def test_promptfl_clients_are_evaluated_with_the_global_prompt(tiny_clip, small_world, monkeypatch):
    # one client after another: each evaluation encodes its own prompt (lock step stacks them all in one pass)
    fed = build(tiny_clip, small_world, method="promptfl", rounds=2, parallel_clients=1)
    rec = fed.run_round(1)
    encoded = []
    encode = fed.encoder.encode
    monkeypatch.setattr(fed.encoder, "encode", lambda ctx: encoded.append(ctx.clone()) or encode(ctx))
    for client in fed.clients:
        client.eval_key = None  # forget the cached accuracy: evaluate again, watching what is encoded
        assert not torch.equal(client.prompt, fed.server.global_prompt)  # its own prompt exists, and is not used
    assert fed.evaluate() == rec.client_acc
    assert encoded and all(torch.equal(ctx, fed.server.global_prompt) for ctx in encoded)
    text = encode(fed.server.global_prompt)
    for client in fed.clients:
        assert rec.client_acc[client.cid] == client.evaluate_with(
            mixture_scorer(text, None, None, fed.clip.gamma, fed.cfg.lam)
        )


def test_non_local_experts_get_no_gradient(tiny_clip, small_world):
    """The K experts are constants: even experts sent as tensors that require grad receive none; the prompt and
    every gate parameter do."""
    fed = build(tiny_clip, small_world)
    fed.run_round(1)
    client = fed.clients[0]
    driver = fed.driver
    driver.begin(2)
    payload = driver.dispatch(0)
    payload = payload.with_tensors({k: t.float() for k, t in payload.tensors().items()})
    payload.expert_prompts.requires_grad_(True)
    objective = fed.method.objective(fed.runtime.context, fed.server, client, payload)
    assert objective.expert_text is not None and not objective.expert_text.requires_grad
    data = client.data
    objective.loss(data.train_features[:8], data.train_labels[:8]).backward()
    assert payload.expert_prompts.grad is None
    assert objective.prompt.grad is not None and objective.prompt.grad.abs().sum() > 0
    for name, p in objective.gate.named_parameters():
        assert p.grad is not None, name


# ---------------------------------------------------------------------------------------------- shared gate
def test_shared_gate_travels_both_ways_and_is_fedavgd(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, method="pfedmoap-shared-gate")
    prompt_bytes = 16 * tiny_clip.width * 4
    gate_bytes = 4 * (32 * 32 + 32) * 4  # d_gate = 32, float32 on the wire
    r1 = fed.run_round(1)  # first participation: no experts, no gate either way
    assert set(r1.client_bytes_down.values()) == {prompt_bytes} and set(r1.client_bytes_up.values()) == {prompt_bytes}
    assert fed.server.extras == {}
    r2 = fed.run_round(2)
    assert set(r2.client_bytes_down.values()) == {3 * prompt_bytes + gate_bytes}  # P_g + K = 2 experts + gate
    assert set(r2.client_bytes_up.values()) == {prompt_bytes + gate_bytes}
    # the server's gate is the train-size-weighted average of the gates the clients trained
    sizes = torch.tensor([c.data.num_train for c in fed.clients], dtype=torch.float64)
    weights = sizes / sizes.sum()
    for name, value in fed.server.extras.items():
        key = name[len(PREFIX) :]
        stacked = torch.stack([c.gate.state_dict()[key].double() for c in fed.clients])
        want = (weights.view(-1, *([1] * (stacked.dim() - 1))) * stacked).sum(0).float()
        assert torch.equal(value, want), name
    # next round: every client downloads that gate and starts its own from it
    fed.driver.begin(3)
    for cid in range(4):
        payload = fed.driver.dispatch(cid)
        assert payload.extras.keys() == fed.server.extras.keys()
        for name, value in payload.extras.items():
            assert torch.equal(value, fed.server.extras[name])
        objective = fed.method.objective(fed.runtime.context, fed.server, fed.clients[cid], payload)
        for key, value in objective.gate.state_dict().items():
            assert torch.equal(value, fed.server.extras[PREFIX + key])


def test_private_gate_method_never_shares_a_gate(tiny_clip, small_world):
    fed = build(tiny_clip, small_world, rounds=2)
    fed.run()
    assert fed.server.extras == {}
    gates = [c.gate.state_dict()["q_proj.weight"] for c in fed.clients]
    assert not any(torch.equal(gates[0], g) for g in gates[1:])  # each client trained its own


def test_shared_gate_refuses_dp_and_a_bad_gate_upload(tiny_clip, small_world):
    with pytest.raises(ConfigError, match="pfedmoap-shared-gate aggregates the gate, so it also uploads its gate"):
        small_config(method="pfedmoap-shared-gate", dp_epsilon=10.0)
    fed = build(tiny_clip, small_world, method="pfedmoap-shared-gate", rounds=2)
    method = fed.method
    good = {name: t.clone() for name, t in method.initial_gate.items()}
    assert method.check_extras(good) is None and method.check_extras({}) is None
    assert "are not this run's gate's" in method.check_extras({"gate.nope": torch.zeros(1)})
    bad = dict(good)
    bad["gate.q_proj.weight"] = torch.zeros(3, 3)
    assert "has shape (3, 3)" in method.check_extras(bad)
    bad["gate.q_proj.weight"] = torch.full_like(good["gate.q_proj.weight"], float("nan"))
    assert "not finite" in method.check_extras(bad)


@pytest.mark.parametrize("method", ["pfedmoap", "pfedmoap-shared-gate", "promptfl", "fedprox", "fedotp", "fedpgp",
                                    "local", "zeroshot", "promptfolio", "fedpha", "fedtpg", "dpfpl"])  # fmt: skip
def test_eval_needs_global_agrees_with_the_eval_state_key(tiny_clip, small_world, method):
    """``Method.eval_needs_global`` (what lets a Flower node's evaluation ride on its train reply) says True exactly
    when the client's evaluation key moves with the global version, for trained and never-trained clients alike."""
    from dataclasses import dataclass

    from pfedmoap.federated import registry

    assert set(registry.methods()) >= {method}
    cfg = small_config(method=method, clients=4, frac=0.5, experts=1, rounds=1)
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    fed.run()

    @dataclass
    class State:
        init_prompt: torch.Tensor
        global_prompt: torch.Tensor
        global_version: int
        extras: dict

    server = fed.server
    now = State(server.init_prompt, server.global_prompt, server.global_version, dict(server.extras))
    later = State(server.init_prompt, server.global_prompt + 1, server.global_version + 1, dict(server.extras))
    kinds = set()
    for client in fed.clients:
        moves = fed.method.eval_state(now, client).key != fed.method.eval_state(later, client).key
        assert fed.method.eval_needs_global(client) == moves, (method, client.cid)
        kinds.add((client.rounds_trained > 0, moves))
    if method != "zeroshot":
        assert {trained for trained, _ in kinds} == {True, False}  # both kinds of client were checked
