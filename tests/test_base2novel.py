"""Base-to-novel evaluation (CoOp's protocol): the class split, the refusals, and each accuracy against an
independent computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.data import DatasetBundle, LabeledImages
from pfedmoap.data.subsample import base_novel_classes, subsample_classes
from pfedmoap.engine.federation import Federation
from pfedmoap.engine.records import RoundRecord, harmonic_mean
from pfedmoap.federated.prompt import PromptEncoder
from pfedmoap.gates import pfedmoap_logits

B2N = dict(subsample="base", eval_split="base2novel")


def build(tiny_clip, small_world, **overrides):
    base = dict(clients=4, experts=2, rounds=2, lr_prompt=0.5, lr_gate=0.1, **B2N)
    return Federation(small_config(**{**base, **overrides}), clip=tiny_clip, dataset=small_world, log=lambda m: None)


def test_split_is_the_first_half_of_the_labels_and_relabels_from_zero(small_world) -> None:
    assert base_novel_classes(5) == ([0, 1, 2], [3, 4])
    assert base_novel_classes(40) == (list(range(20)), list(range(20, 40)))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        base_novel_classes(1)
    base, new = subsample_classes(small_world, "base"), subsample_classes(small_world, "new")
    assert base.classnames == small_world.classnames[:20] and new.classnames == small_world.classnames[20:]
    for sub, offset in ((base, 0), (new, 20)):
        for split, full in ((sub.train, small_world.train), (sub.test, small_world.test)):
            rows = np.flatnonzero((full.labels >= offset) & (full.labels < offset + 20))
            np.testing.assert_array_equal(split.labels, full.labels[rows] - offset)
            assert torch.equal(split.images, full.images[torch.as_tensor(rows)])
    assert subsample_classes(small_world, "all") is small_world


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ConfigError, match="subsample=new is for evaluation only"):
        small_config(subsample="new", method="pfedmoap")
    small_config(subsample="new", method="zeroshot")  # evaluation only: fine
    with pytest.raises(ConfigError, match="eval_split=base2novel needs subsample=base"):
        small_config(eval_split="base2novel")
    with pytest.raises(ConfigError, match="subsample='half' is not one of"):
        small_config(subsample="half")
    with pytest.raises(ConfigError, match="eval_split='novel' is not one of"):
        small_config(eval_split="novel")


def test_a_one_class_dataset_is_refused(tiny_clip) -> None:
    one = LabeledImages(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), np.zeros(4, dtype=np.int64))
    bundle = DatasetBundle("one", ["thing"], one, one)
    cfg = small_config(clients=1, experts=0, shots=0, partition="iid", **B2N)
    with pytest.raises(ConfigError, match="needs at least 2 classes"):
        Federation(cfg, clip=tiny_clip, dataset=bundle, log=lambda m: None)


def test_cli_refusals_are_one_line_and_exit_2(tmp_path) -> None:
    for args, needle in (
        (["--subsample", "new"], "subsample=new is for evaluation only"),
        (["--eval-split", "base2novel"], "needs subsample=base"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "pfedmoap.train", "--print-config", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_clients_train_on_base_classes_only(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="promptfl")
    assert fed.encoder.classnames == small_world.classnames[:20]
    for client in fed.clients:
        assert int(client.data.train_labels.max()) < 20 and int(client.data.test_labels.max()) < 20
    base, novel = fed.world.eval_sets()
    assert (base.name, novel.name) == ("base", "novel")
    assert len(base.labels) == len(small_world.test.labels[small_world.test.labels < 20])
    assert novel.encoder.classnames == small_world.classnames[20:]


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)


def test_promptfl_base_and_novel_equal_the_global_prompt_scored_directly(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="promptfl")
    rec = fed.run_round(1)
    base, novel = fed.world.eval_sets()
    # independent encoders over each label space
    g = fed.server.global_prompt
    for es, names in ((base, small_world.classnames[:20]), (novel, small_world.classnames[20:])):
        text = PromptEncoder(tiny_clip, names, fed.cfg.n_ctx, mode="full").encode(g)
        expected = _acc(tiny_clip.gamma * es.features @ text.t(), es.labels)
        assert rec.client_split_acc[es.name] == pytest.approx([expected] * 4, abs=1e-9)
    means = rec.split_acc
    assert means["hm"] == pytest.approx(harmonic_mean([rec.mean_acc, means["base"], means["novel"]]))


def test_pfedmoap_novel_classes_use_the_experts_contexts_with_the_novel_names(tiny_clip, small_world) -> None:
    fed = build(tiny_clip, small_world, method="pfedmoap")
    fed.run_round(1)
    rec = fed.run_round(2)  # now clients have experts and gates
    _, novel = fed.world.eval_sets()
    names = small_world.classnames[20:]
    enc = PromptEncoder(tiny_clip, names, fed.cfg.n_ctx, mode="full")
    for client in fed.clients:
        assert client.gate is not None and client.expert_prompts is not None
        logits, _ = pfedmoap_logits(
            novel.features,
            enc.encode(client.prompt),
            enc.encode(client.expert_prompts),
            client.gate,
            tiny_clip.gamma,
            fed.cfg.lam,
        )
        assert rec.client_split_acc["novel"][client.cid] == pytest.approx(_acc(logits, novel.labels), abs=1e-9)


@pytest.mark.parametrize(
    "method",
    [
        "zeroshot",
        "local",
        "fedprox",
        "fedotp",
        "fedpgp",
        "pfedmoap-shared-gate",
        "promptfolio",
        "fedpha",
        "fedtpg",
        "dpfpl",
    ],
)
def test_every_method_reports_base_novel_and_hm(tiny_clip, small_world, method, tmp_path) -> None:
    from pfedmoap.engine.rundir import RunDir

    cfg = small_config(clients=4, experts=2, rounds=2, method=method, **B2N)
    fed = Federation(cfg, clip=tiny_clip, dataset=small_world, log=lambda m: None)
    history = fed.run(RunDir.create(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for key in ("local_acc", "base_acc", "novel_acc", "hm", "client_base_acc", "client_novel_acc", "client_hm"):
            assert key in line, key
        assert len(line["client_novel_acc"]) == 4 and all(math.isfinite(v) for v in line["client_novel_acc"])
        assert line["local_acc"] == line["mean_acc"]
        assert RoundRecord.from_json(line).to_json() == line  # the JSON form round-trips
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("final_local_acc", "final_base_acc", "final_novel_acc", "final_hm", "best_hm"):
        assert key in summary
    assert summary["final_hm"] == history.rounds[-1].split_acc["hm"]


def test_without_base2novel_the_record_has_no_split_fields(tiny_clip, small_world) -> None:
    fed = Federation(small_config(clients=4, experts=2), clip=tiny_clip, dataset=small_world, log=lambda m: None)
    line = fed.run_round(1).to_json()
    assert "hm" not in line and "base_acc" not in line


def test_experiments_base2novel_table_beside_pfedmma(tmp_path) -> None:
    from pfedmoap.research.sweeps import PAPER_RESULTS, base2novel_table, run_sweep

    overrides = dict(
        pretrained="none", rounds=1, local_epochs=1, train_per_class=10, test_per_class=4, clients=4, experts=2
    )
    results = run_sweep(
        ["synthetic-b2n"], ["zeroshot", "fedpgp"], [1], tmp_path, {**overrides, "progress": False}, log=lambda m: None
    )
    table = base2novel_table(results, "synthetic-b2n")
    assert table is not None
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    summary = json.loads((tmp_path / "synthetic-b2n" / "fedpgp" / "seed1" / "summary.json").read_text())
    assert f"{summary['final_hm']:.2f} ± 0.00" in rows["FedPGP (global + low-rank prompt)"]
    assert rows["FedPGP (global + low-rank prompt)"].endswith("| 95.38 / 76.49 / 71.68 / 79.09 |")
    assert base2novel_table(run_sweep(["synthetic"], ["zeroshot"], [1], tmp_path, overrides), "synthetic") is None
    assert PAPER_RESULTS["flowers102"]["fedotp"] == 96.23 and PAPER_RESULTS["dtd"]["fedotp"] == 87.64
