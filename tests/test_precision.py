"""--precision bf16: autocast of the frozen encoders and the step's forward, float32 master prompt and gate, float32
features and loss; and one clear line for a precision the device cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfedmoap.base.errors import ConfigError
from pfedmoap.engine.federation import Federation
from pfedmoap.federated.plan import make_config
from pfedmoap.model import precision
from tests.conftest import small_config


def _linear_output_dtypes(fed: Federation) -> set[torch.dtype]:
    """Hook every Linear of the frozen CLIP and of the clients' gates; return the set of output dtypes seen."""
    seen: set[torch.dtype] = set()

    def hook(_module, _inputs, output):
        seen.add(output.dtype)

    modules = list(fed.clip.model.modules()) + [m for c in fed.clients if c.gate is not None for m in c.gate.modules()]
    for m in modules:
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("parallel", [1, 4])
def test_bf16_run_autocasts_encoders_and_gate_and_keeps_fp32_masters(parallel):
    cfg = small_config(method="pfedmoap", clients=4, experts=2, rounds=2, parallel_clients=parallel)
    ref = Federation(cfg, log=lambda _: None)
    fed = Federation(cfg.replace(precision="bf16"), log=lambda _: None)
    for c in fed.clients:  # the cached image features stay float32 (encoded under autocast)
        assert c.data.train_features.dtype == torch.float32 and c.data.test_features.dtype == torch.float32
    ref.run_round(1)
    fed.run_round(1)  # round 1 creates no gates (first participation); round 2 trains them
    seen = _linear_output_dtypes(fed)
    ref.run_round(2)
    rb = fed.run_round(2)
    assert torch.bfloat16 in seen  # text tower and gate linears ran in bf16
    for c, r in zip(fed.clients, ref.clients, strict=True):
        assert c.prompt.dtype == torch.float32 and torch.isfinite(c.prompt).all()
        assert all(p.dtype == torch.float32 for p in c.gate.parameters())
        # a bf16 update is a perturbation of the fp32 one, not another result
        assert (c.prompt - r.prompt).norm() <= 0.1 * (r.prompt - fed.world.init_prompt).norm(), c.cid
    assert all(0.0 <= a <= 100.0 for a in rb.client_acc)


def test_fp32_run_has_no_bf16_anywhere():
    fed = Federation(small_config(clients=4, experts=2, rounds=2), log=lambda _: None)
    fed.run_round(1)
    seen = _linear_output_dtypes(fed)
    fed.run_round(2)
    assert seen == {torch.float32}


def test_precision_the_device_cannot_run_is_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="precision='fp16' is not one of: fp32, bf16"):
        make_config("synthetic", precision="fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="precision=bf16: Tesla V100 has no native bfloat16.*--precision fp32"):
        precision.check_precision("bf16", torch.device("cuda"))
    precision.check_precision("fp32", torch.device("cuda"))  # fp32 runs anywhere
    precision.check_precision("bf16", torch.device("cpu"))


def test_autocast_is_a_no_op_at_fp32():
    a = torch.randn(4, 4)
    with precision.autocast("fp32", torch.device("cpu")):
        assert (a @ a).dtype == torch.float32
    with precision.autocast("bf16", torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
