"""Shared fixtures: a tiny random-weight CLIP and a small synthetic world, built once per session."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # without a GPU the Triton kernels run on CPU tensors in the interpreter, chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pfedmoap.data import DatasetOptions, create_dataset  # noqa: E402
from pfedmoap.federated.plan import make_config  # noqa: E402
from pfedmoap.model.clip import load_clip  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny architecture with fixed random weights (no pretraining needed)."""
    return load_clip("pfedmoap-tiny", "none", torch.device("cpu"), progress=False)


@pytest.fixture(scope="session")
def small_world():
    return create_dataset("synthetic", DatasetOptions(domains=["faded"], train_per_class=20, test_per_class=6))


def federation_tensors(fed) -> dict[str, torch.Tensor]:
    """Every tensor a run's state holds after a round, by name: each client's prompt, gate and private tensors, the
    server's global prompt and pool (for comparing two runs that must agree)."""
    out = {}
    for c in fed.clients:
        if c.prompt is not None:
            out[f"{c.cid}.prompt"] = c.prompt
        if c.gate is not None:
            out.update({f"{c.cid}.gate.{k}": v for k, v in c.gate.state_dict().items()})
        out.update({f"{c.cid}.private.{k}": v for k, v in c.private.items()})
    out["server.global"] = fed.server.global_prompt
    out.update({f"server.pool.{cid}": p for cid, p in fed.server.pool.items()})
    return out


def small_config(**overrides):
    """A fast config on the tiny random CLIP: few rounds, one local epoch, a small world."""
    base = dict(
        pretrained="none",
        rounds=2,
        local_epochs=1,
        train_per_class=20,
        test_per_class=6,
        shots=8,
        progress=False,
        d_gate=32,
    )
    base.update(overrides)
    return make_config("synthetic", **base)


# python -m pfedmoap.train's value flags in the order of its override table before the plug-ins owned their settings
# (the plug-in flags were interleaved). The command-line fuzzers draw from this list, so they keep drawing the cases
# (and, in tests/test_cli_fuzz_run.py, the outcome counts) they were written with.
FLAGS_BEFORE_SETTINGS_MOVED = (
    "--method --dataset --data-root --model --pretrained --partition --clients --frac --rounds --local-epochs "
    "--batch-size --shots --dirichlet-alpha --min-client-size --domains --train-per-class --test-per-class "
    "--data-seed --n-ctx --ctx-init --text-encoder --experts --gate --lambda --d-gate --heads --attn-scale "
    "--reduction --expert-selection --expert-distance --gate-sharing --pool-view --parallel-clients --lr-prompt "
    "--lr-gate --momentum --weight-decay --fedprox-mu --fedotp-eps --fedotp-top-percent --fedotp-thresh "
    "--fedotp-max-iter --fedpgp-bottleneck --fedpgp-mu --fedpgp-temperature --subsample --eval-split "
    "--client-dropout --max-prompt-norm --dp-epsilon --dp-delta --dp-clip --seed --device --threads --comm-dtype "
    "--feature-cache --precision --cuda-graphs --eval-batch-size --out"
).split()


def cli_value_flags() -> list[tuple]:
    """Every value flag of python -m pfedmoap.train as (flag, config key, type, help): the shared config's and every
    registered plug-in's, in FLAGS_BEFORE_SETTINGS_MOVED's order (a flag added since goes last). A plug-in flag with
    choices lists them as its help, ``a | b``, as the override table did."""
    from pfedmoap.federated import registry
    from pfedmoap.train import override_table

    rows = {row[0]: row for row in override_table()}
    for name, (setting, _) in registry.settings().items():
        text = " | ".join(setting.choices) if setting.choices else setting.help
        rows[setting.flag] = (setting.flag, name, setting.cli_type(), text)
    order = {flag: i for i, flag in enumerate(FLAGS_BEFORE_SETTINGS_MOVED)}
    return sorted(rows.values(), key=lambda row: order.get(row[0], len(order)))


def reopen_run(run_dir, rounds: int | None = None, **meta) -> dict:
    """A finished run directory made resumable: its config.json's rounds raised to ``rounds``, ``meta`` set in its
    ``_meta``, its summary.json dropped. Returns the config.json object it now holds."""
    path = run_dir / "config.json"
    data = json.loads(path.read_text())
    if rounds is not None:
        data["rounds"] = rounds
    data["_meta"].update(meta)
    path.write_text(json.dumps(data))
    (run_dir / "summary.json").unlink()
    return data
