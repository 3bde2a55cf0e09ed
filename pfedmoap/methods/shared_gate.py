"""pFedMoAP with the gate aggregated across clients: the paper's ablation "attention-based, with aggregation"
(Table 7), which it finds worse than keeping the gate private.

Everything is pFedMoAP's except where the gate lives. The server holds a global gate, initialised once from the
run seed (the same start for every client, as P_g^0 is). A client that receives experts also receives the
global gate, starts its own gate from it, trains its prompt and the gate, and uploads both. The server FedAvg's
the accepted gates (weighted by training-set size, like the prompts) into the global gate. A client is
evaluated with the gate it last trained (the global gate after its own local epochs), as its prompt is. The
gate's 4(d^2 + d) values are counted on the wire in both directions. DP on uploads covers prompts only, so this
method refuses ``--dp-epsilon``. ``--method pfedmoap --gate-sharing aggregated`` runs this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..base.errors import ConfigError
from ..federated.client import Client, Objective
from ..federated.registry import register_method
from ..gates import create_gate
from .base import ClientContext, GlobalState, Payload, Upload, check_named_tensors
from .pfedmoap import MixtureObjective, PFedMoAP

if TYPE_CHECKING:
    from ..config import Config
    from ..federated.server import Server

PREFIX = "gate."  # wire names of the gate's tensors: "gate.q_proj.weight", ...


def _gate_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.detach().cpu().float().clone() for k, v in state.items()}


@register_method
class PFedMoAPSharedGate(PFedMoAP):
    name = "pfedmoap-shared-gate"
    help = "pFedMoAP with the gate FedAvg'd across clients instead of kept private (the paper's ablation)"
    dp_refusal = "aggregates the gate, so it also uploads its gate, which DP on prompt uploads does not cover"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.gate_sharing == "private":
            raise ConfigError(
                f"gate_sharing=private contradicts method={cfg.method}, which aggregates its gate "
                "(use method=pfedmoap for a private gate)"
            )
        super().check_config(cfg)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        # the global gate's first state, from the run seed (P_g^0's seed: every engine derives the same one)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.initial_gate = _gate_tensors(create_gate(cfg).state_dict())

    @classmethod
    def supports_dp(cls) -> bool:
        return False

    # ------------------------------------------------------------------------------------ server side
    def payload(self, server: Server, view: Mapping[int, torch.Tensor], cid: int) -> Payload:
        payload = super().payload(server, view, cid)
        if payload.expert_ids:  # only a client that trains a gate this round needs it
            payload.extras = dict(server.extras or self.initial_gate)
        return payload

    def check_extras(self, extras: Mapping[str, torch.Tensor]) -> str | None:
        if not extras:
            return None  # a first participation trains no gate and sends none
        return check_named_tensors(extras, self.initial_gate, "gate's")

    def aggregate(self, server: Server, uploads: Mapping[int, Upload]) -> None:
        super().aggregate(server, uploads)
        gates = {cid: up.extras for cid, up in uploads.items() if up.extras}
        if gates:
            names = self.initial_gate
            server.extras = {name: server.fedavg({cid: gate[name] for cid, gate in gates.items()}) for name in names}

    # ------------------------------------------------------------------------------------ client side
    def objective(self, ctx: ClientContext, state: GlobalState, client: Client, payload: Payload) -> Objective:
        objective = super().objective(ctx, state, client, payload)
        if isinstance(objective, MixtureObjective):
            downloaded = {k[len(PREFIX) :]: v for k, v in payload.extras.items()}
            objective.gate.load_state_dict(downloaded)
        return objective

    def upload(self, client: Client, objective: Objective) -> Upload | None:
        upload = super().upload(client, objective)
        if upload is not None and isinstance(objective, MixtureObjective):
            upload.extras = _gate_tensors(objective.gate.state_dict())
        return upload
