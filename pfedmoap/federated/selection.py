"""Expert-selection rules: which K pool prompts a client receives as its non-local experts.

A rule is one class registered with :func:`~pfedmoap.federated.registry.register_selection` and picked by
``--expert-selection``. Every rule sees the same candidates: the other clients' entries in the pool view the
round driver fixed at the start of the round (a client without a pool entry of its own gets no experts, as in
the paper; the server's upload checks decide what is in the pool). Built in:

- ``knn`` (the paper): the K nearest prompts to the client's own, by ``--expert-distance`` ``l2`` (the paper's)
  or ``cosine`` (1 - cos of the flattened prompts), through the run's KNN op;
- ``random``: K distinct candidates drawn from the server's selection stream (what the reference code does);
- ``fixed``: every client receives the same experts, the K lowest ids other than its own: the control that
  tells whether choosing by similarity matters at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..base.errors import ConfigError
from ..config.settings import Setting
from .registry import register_selection

if TYPE_CHECKING:
    from ..config import Config
    from .server import Server

DISTANCES = ("l2", "cosine")
DISTANCE = Setting("expert_distance", "l2", "knn's distance between flattened prompts", kind=str, choices=DISTANCES)


class ExpertSelection:
    """Base of the registered rules. ``select`` gets at least one candidate and k >= 1."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    settings: ClassVar[tuple[Setting, ...]] = ()

    def __init__(self, distance: str = "l2"):
        self.distance = distance

    @classmethod
    def from_config(cls, cfg: Config) -> ExpertSelection:
        """The rule with the config's settings."""
        return cls(DISTANCE.of(cfg))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse settings this rule cannot run with (ConfigError, one line)."""
        distance = DISTANCE.of(cfg)
        if distance != "l2" and DISTANCE not in cls.settings:
            raise ConfigError(
                f"expert_distance={distance} applies to expert_selection=knn only (got expert_selection={cls.name})"
            )

    def select(self, server: Server, cid: int, view: Mapping[int, torch.Tensor], candidates: list[int], k: int):
        """The ids (at most ``k``, from ``candidates``, sorted ascending) of client ``cid``'s experts, in the
        order they are sent."""
        raise NotImplementedError


@register_selection
class KnnSelection(ExpertSelection):
    name = "knn"
    help = "the K nearest pool prompts to the client's own (--expert-distance l2 or cosine)"
    settings = (DISTANCE,)

    def select(self, server, cid, view, candidates, k):
        ids = sorted([cid, *candidates])
        rows = torch.stack([view[j].reshape(-1).float() for j in ids])
        if self.distance == "cosine":
            # on unit vectors ||a - b||^2 = 2 - 2 cos(a, b): the L2 ranking of normalised rows is the cosine one
            rows = F.normalize(rows, dim=-1)
        present = torch.ones(len(ids), dtype=torch.bool)
        nearest = server.knn(rows, present, torch.tensor([ids.index(cid)]), k)[0]
        return [ids[int(i)] for i in nearest]


@register_selection
class RandomSelection(ExpertSelection):
    name = "random"
    help = "K pool prompts at random (the reference code's behaviour)"

    def select(self, server, cid, view, candidates, k):
        take = min(k, len(candidates))
        return [int(j) for j in server.select_rng.choice(candidates, size=take, replace=False)]


@register_selection
class FixedSelection(ExpertSelection):
    name = "fixed"
    help = "the same experts for every client: the K lowest ids other than its own (a control)"

    def select(self, server, cid, view, candidates, k):
        return candidates[:k]
