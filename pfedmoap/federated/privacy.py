"""Differential privacy on uploaded prompts (the paper's Table 6): clip the prompt update, add Gaussian noise.

Each upload is a Gaussian mechanism on the client's update ``P_i - P_g`` (L2 sensitivity ``clip`` after
clipping). A client uploads at most once per round, so over R rounds its uploads compose R Gaussian
mechanisms. The accounting is client-level and makes no claim of amplification by client sampling:
fixed-size sampling without replacement is not the Poisson sampling that the usual amplification bounds
assume. The Rényi-DP accounting comes from Google's ``dp-accounting`` package
(``pip install 'pfedmoap[dp]'``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from ..base.errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config

# Rényi orders: the grid TF Privacy and dp-accounting use, plus large orders for small epsilons
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512]


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(
            "differential privacy needs the optional package dp-accounting: pip install 'pfedmoap[dp]'"
        ) from None
    return dp_accounting


def epsilon(
    noise_multiplier: float,
    releases: int,
    delta: float,
    sampling_rate: float = 1.0,
    conversion: str = "improved",
) -> float:
    """(epsilon, delta)-DP of ``releases`` Gaussian mechanisms with noise std = noise_multiplier x sensitivity,
    optionally Poisson-subsampled at ``sampling_rate``.

    ``conversion`` turns Rényi DP into (epsilon, delta): "improved" (Balle et al. 2020, what dp-accounting
    reports, tighter) or "classic" (Mironov 2017, Prop. 3, what TF Privacy's tutorials report).
    """
    if releases <= 0:
        return 0.0
    dpa = _dp_accounting()
    accountant = dpa.rdp.RdpAccountant(ORDERS)
    event = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dpa.PoissonSampledDpEvent(sampling_rate, event)
    accountant.compose(event, releases)
    if conversion == "improved":
        return float(accountant.get_epsilon(delta))
    if conversion == "classic":
        return min(r + math.log(1.0 / delta) / (a - 1.0) for a, r in zip(ORDERS, accountant.rdp, strict=True))
    raise ValueError(f"conversion={conversion!r} is not one of: improved, classic")


@functools.lru_cache(maxsize=64)  # a pure function, asked for by the server and every client of a run
def noise_multiplier_for(target_epsilon: float, delta: float, releases: int, tolerance: float = 1e-4) -> float:
    """The smallest noise multiplier (within ``tolerance``) whose ``releases`` uploads stay within the target."""
    low, high = 1e-3, 1.0
    while epsilon(high, releases, delta) > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ConfigError(f"dp_epsilon={target_epsilon} is not reachable with dp_delta={delta}")
    while high - low > tolerance * high:
        mid = 0.5 * (low + high)
        if epsilon(mid, releases, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def run_noise_multiplier(cfg: Config) -> float | None:
    """The noise multiplier that keeps each client within (dp_epsilon, dp_delta) over its at most ``rounds``
    uploads (one per round), or None when DP is off. Server and clients derive the same value."""
    if cfg.dp_epsilon is None:
        return None
    return noise_multiplier_for(cfg.dp_epsilon, cfg.dp_delta, cfg.rounds)


def privatize_update(
    update: torch.Tensor, clip: float, noise_multiplier: float, generator: torch.Generator
) -> torch.Tensor:
    """Clip the update to L2 norm ``clip`` and add N(0, (noise_multiplier x clip)^2) to every coordinate."""
    norm = float(update.double().norm())
    clipped = update * min(1.0, clip / norm) if norm > 0 else update
    noise = torch.randn(update.shape, generator=generator, dtype=torch.float32) * (noise_multiplier * clip)
    return clipped + noise.to(update.device, update.dtype)
