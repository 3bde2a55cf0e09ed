"""The centralised gate study (pfedmoap.research.gate_study): gates learn, the exact identity holds, the numbers follow
from the seed, the source is chosen on the target shots alone, and the command's mistakes are one line + exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pfedmoap.base.errors import ConfigError
from pfedmoap.data import DatasetBundle, LabeledImages
from pfedmoap.experiments import main as experiments_main
from pfedmoap.federated.registry import gate_class
from pfedmoap.research import gate_study as gs

# three styles (two unseen in the tiny CLIP's pretraining), a few images each: every test here is fast
TINY = {
    "domains": ["noisy", "outline", "faded"],
    "train_per_class": 4,
    "test_per_class": 2,
    "prompt_epochs": 1,
    "gate_epochs": 4,
    "target_shots": 2,
}


@pytest.fixture(scope="module")
def study():
    cfg, settings = gs.study_config("synthetic", None, dict(TINY))
    return cfg, settings, gs.StudyWorld.build(cfg)


def _experts(world: gs.StudyWorld, seed: int = 1) -> torch.Tensor:
    """K+1 = 3 distinct expert text features: the zero-shot ones and two randomly perturbed contexts."""
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(2, world.cfg.n_ctx, world.clip.width, generator=gen) * 0.5
    with torch.no_grad():
        return torch.cat([world.encoder.zero_shot()[None], world.encoder.encode(ctx)])


def _target(world: gs.StudyWorld, t: int, shots: int = 2) -> gs.TargetData:
    f = world.features[t]
    rows = torch.as_tensor(gs.draw_shots(f.train_labels.numpy(), shots, gs.stream(1, gs.Stream.PARTITION)))
    return gs.TargetData(f.train_features[rows], f.train_labels[rows], f.test_features, f.test_labels)


@pytest.mark.parametrize("kind", gs.GATES)
def test_gate_training_decreases_its_loss(study, kind):
    cfg, settings, world = study
    target = _target(world, 1)
    result = gs.train_gate(
        kind, cfg, world.clip, _experts(world), target.shot_features, target.shot_labels, 123, settings
    )
    assert result.loss_after < result.loss_before


def test_uniform_average_is_the_average_gate_at_init(study):
    cfg, _, world = study
    experts, target = _experts(world), _target(world, 2)
    gate = gate_class("average").from_config(cfg.replace(experts=experts.shape[0] - 1))
    feats, gamma = target.test_features, world.clip.gamma
    with torch.no_grad():
        gated, _ = gate(feats, experts, gamma=gamma)
    torch.testing.assert_close(gated, gamma * feats @ experts.mean(0).t(), rtol=1e-6, atol=1e-5)
    assert (
        gs.text_accuracy(experts.mean(0), feats, target.test_labels, gamma)
        == gs.accuracy(lambda f, w: gate(f, experts, gamma=gamma, need_weights=w), feats, target.test_labels)[0]
    )


def test_same_seed_same_numbers(study):
    cfg, settings, world = study
    first = gs.run_study(cfg, settings, [1, 2], world=world)
    again = gs.run_study(cfg, settings, [1, 2], world=world)
    assert first["cells"] == again["cells"] and first["summary"] == again["summary"]
    one, two = (c for c in first["cells"] if c["target"] == "outline")
    assert one["gates"] != two["gates"]  # another seed: other prompts, shots and gate initialisations
    assert [c["target"] for c in first["cells"]] == ["noisy", "outline", "faded"] * 2
    assert set(first["summary"]) == set(gs.ROWS)


def test_best_source_is_chosen_on_the_target_shots_only(study, monkeypatch):
    cfg, settings, world = study
    experts, target = _experts(world), _target(world, 1)
    seen = []
    pick = gs.pick_prompt

    def spy(texts, features, labels, gamma):
        seen.append(features)
        return pick(texts, features, labels, gamma)

    monkeypatch.setattr(gs, "pick_prompt", spy)
    cell = gs.evaluate_target(cfg, settings, world.clip, experts, experts[0], target, 7)
    assert seen[0] is target.shot_features  # the choice; the second call is the oracle's, on the test split
    assert cell["chosen"] == pick(experts[1:], target.shot_features, target.shot_labels, world.clip.gamma)
    # another test split (another domain's images, shuffled labels): the same choice, only the scores move
    other = world.features[0]
    swapped = gs.TargetData(target.shot_features, target.shot_labels, other.test_features, other.test_labels.flip(0))
    assert gs.evaluate_target(cfg, settings, world.clip, experts, experts[0], swapped, 7)["chosen"] == cell["chosen"]


def test_domain_ids_positional_or_styles():
    def bundle(name, names, ids, domain_ids=None):
        rows = LabeledImages(torch.zeros(len(ids), 3, 2, 2), np.zeros(len(ids), dtype=np.int64), np.asarray(ids))
        return DatasetBundle(name, ["x"], rows, rows, names, domain_ids)

    assert [d.id for d in gs.study_domains(bundle("pacs", ["a", "b", "c"], [2, 0, 1]))] == [0, 1, 2]
    styles = gs.study_domains(bundle("synthetic", ["outline", "faded", "noisy"], [1, 4, 5], [4, 5, 1]))
    assert [(d.id, d.name) for d in styles] == [(4, "outline"), (5, "faded"), (1, "noisy")]
    with pytest.raises(ConfigError, match="do not match"):
        gs.study_domains(bundle("pacs", ["a", "b", "c"], [0, 1, 3]))
    with pytest.raises(ConfigError, match="at least 3"):
        gs.study_domains(bundle("pacs", ["a", "b", "c", "d"], [0, 1, 1]))


def test_pick_prompt_breaks_ties_by_loss():
    feats = torch.eye(2)
    labels = torch.tensor([0, 1])
    sure, unsure = torch.eye(2), 0.1 * torch.eye(2)
    assert gs.pick_prompt(torch.stack([unsure, sure]), feats, labels, 10.0) == 1
    assert gs.pick_prompt(torch.stack([sure, sure]), feats, labels, 10.0) == 0


def _cli(*args: str) -> list[str]:
    return ["--study", gs.STUDY, *args]


@pytest.mark.parametrize(
    "argv",
    [
        ["--study", "nope"],
        _cli("--target-shots", "0"),
        _cli("--target-shots", "x"),
        ["--target-shots", "4"],
        ["--dataset", "synthetic"],
        _cli("--preset", "synthetic"),
        _cli("--rounds", "2"),
        _cli("--suite", "ablations"),
        _cli("--dataset", "nope"),
        _cli("--dataset", "synthetic", "--data-root", "."),
        _cli("--dataset", "pacs", "--data-root", "/no/such/folder"),
        _cli("--seeds", ","),
        _cli("--seeds", "1,-2"),
        _cli("--set", "seed=3"),
        _cli("--set", "gate_epochs=0"),
        _cli("--set", "lam=-1"),
        _cli("--set", "no_such_key=1"),
        _cli("--set", 'domains=["noisy", "faded"]', "--set", "train_per_class=2", "--set", "test_per_class=1"),
        _cli("--set", 'domains=["noisy", "sepia"]'),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, capsys, tmp_path):
    try:
        code = experiments_main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own errors exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err, err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    assert experiments_main(_cli("--out", str(tmp_path / "f"))) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_command_writes_the_table(tmp_path, capsys):
    sets = [x for k, v in TINY.items() if k != "target_shots" for x in ("--set", f"{k}={json.dumps(v)}")]
    out = tmp_path / "study"
    assert experiments_main(_cli("--out", str(out), "--seeds", "1", "--target-shots", "2", *sets)) == 0
    report = json.loads((out / "gate_study.json").read_text())
    assert report["seeds"] == [1] and report["settings"]["target_shots"] == 2
    assert report["settings"]["d_gate"] == 32 and report["settings"]["lr_gate"] == 0.01  # the preset's, the gates'
    table = (out / "gate_study.md").read_text()
    assert all(label in table for label in gs.ROWS.values())
    assert "| noisy | outline | faded | mean |" in table
