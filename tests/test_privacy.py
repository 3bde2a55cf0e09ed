"""Differential privacy: the accountant against published values, the mechanism, and the round loop."""

import pytest
import torch
from conftest import small_config

from pfedmoap.engine.federation import Federation
from pfedmoap.federated import privacy

pytest.importorskip("dp_accounting")


@pytest.mark.parametrize(
    ("sigma", "epochs", "published"),
    # TF Privacy, tutorials/README.md "Select Parameters": MNIST, 60,000 examples, batch 256, delta 1e-5
    [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)],
)
def test_accountant_matches_published_dp_sgd_values(sigma, epochs, published):
    steps = epochs * 60000 // 256
    eps = privacy.epsilon(sigma, steps, 1e-5, sampling_rate=256 / 60000, conversion="classic")
    assert eps == pytest.approx(published, abs=0.03)
    # the default (improved) conversion is a valid and tighter bound
    assert privacy.epsilon(sigma, steps, 1e-5, sampling_rate=256 / 60000) < eps


def test_single_gaussian_matches_closed_form_rdp():
    """No subsampling: RDP of T Gaussian releases is T * a / (2 sigma^2) (Mironov 2017), in closed form."""
    import math

    sigma, releases, delta = 3.0, 10, 1e-5
    closed = min(releases * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in privacy.ORDERS)
    assert privacy.epsilon(sigma, releases, delta, conversion="classic") == pytest.approx(closed, rel=1e-9)


def test_noise_multiplier_hits_the_target():
    for target in (50.0, 25.0, 2.0):
        sigma = privacy.noise_multiplier_for(target, 0.05, 10)
        assert privacy.epsilon(sigma, 10, 0.05) <= target
        assert privacy.epsilon(sigma * 0.99, 10, 0.05) > target * 0.999


def test_privatize_update_clips_then_adds_noise():
    g = torch.Generator().manual_seed(0)
    update = torch.full((16, 64), 1.0)  # norm 32
    out = privacy.privatize_update(update, clip=2.0, noise_multiplier=0.0, generator=g)
    assert float(out.norm()) == pytest.approx(2.0, rel=1e-6)
    noisy = privacy.privatize_update(torch.zeros(4000), clip=2.0, noise_multiplier=0.5, generator=g)
    assert float(noisy.std()) == pytest.approx(1.0, rel=0.05)


def test_dp_round_noises_uploads_only_and_accounts(tiny_clip, small_world):
    cfg = small_config(clients=4, experts=2, rounds=2, dp_epsilon=25.0, dp_delta=0.05, dp_clip=0.05)
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    init = fed.server.global_prompt.clone()
    rec1 = fed.run_round(1)
    for cid, client in enumerate(fed.clients):
        uploaded = fed.server.pool[cid]
        assert not torch.equal(uploaded, client.prompt)  # the clean prompt stays on the client
        assert float((uploaded - init).norm()) > cfg.dp_clip  # clipped update + noise
    assert rec1.dp_max_uploads == 1 and rec1.dp_epsilon_spent < cfg.dp_epsilon
    rec2 = fed.run_round(2)
    assert rec2.dp_max_uploads == 2
    assert rec2.dp_epsilon_spent == pytest.approx(cfg.dp_epsilon, rel=1e-3)


def test_dp_needs_an_uploading_method():
    from pfedmoap.base.errors import ConfigError

    with pytest.raises(ConfigError, match="uploads nothing"):
        small_config(method="local", dp_epsilon=10.0)
