"""The target protocols (--eval-split cross-dataset, cross-domain, leave-one-domain-out) on the synthetic world."""

import numpy as np
import pytest
import torch
from conftest import small_config

from pfedmoap.base.errors import ConfigError
from pfedmoap.data import DatasetOptions, create_dataset, partition, protocols, synthetic
from pfedmoap.engine.federation import Federation
from pfedmoap.engine.records import RoundRecord, summarize
from pfedmoap.federated.prompt import PromptEncoder
from pfedmoap.train import main


def run(tiny_clip, **overrides):
    cfg = small_config(clients=4, rounds=2, experts=2, **overrides)
    return Federation(cfg, clip=tiny_clip, log=lambda m: None)


# ------------------------------------------------------------------------------------------------ data side
def test_targets_parse_and_default():
    assert protocols.parse_target("synthetic:noisy+outline") == protocols.Target(
        "synthetic:noisy+outline", "synthetic", ["noisy", "outline"]
    )
    assert protocols.parse_target("caltech101").domains is None
    for bad in ("", ":faded", "synthetic:", "synthetic:a++b"):
        with pytest.raises(ConfigError, match="DATASET or DATASET:DOMAIN"):
            protocols.parse_target(bad)
    assert protocols.default_targets("cross-dataset", "imagenet", None, []) == list(protocols.COOP_DATASETS[1:])
    assert len(protocols.default_targets("cross-dataset", "imagenet", None, [])) == 10
    assert protocols.default_targets("cross-domain", "imagenet", None, []) == list(protocols.IMAGENET_VARIANTS)
    assert protocols.default_targets("cross-dataset", "synthetic", ["faded"], []) == [
        "synthetic-shapes:faded",
        "synthetic-colours:faded",
    ]
    # the styles the run does not train on, in the world's order
    assert protocols.default_targets("cross-domain", "synthetic", ["faded", "photo"], []) == [
        "synthetic:noisy",
        "synthetic:striped",
        "synthetic:cluttered",
        "synthetic:outline",
    ]
    with pytest.raises(ConfigError, match="--eval-targets"):
        protocols.default_targets("cross-dataset", "cifar10", None, [])


def test_synthetic_class_sets_label_the_shape_or_the_colour():
    opts = DatasetOptions(domains=["photo"], train_per_class=2, test_per_class=3, image_size=32)
    shapes = create_dataset("synthetic-shapes", opts)
    colours = create_dataset("synthetic-colours", opts)
    assert shapes.classnames == list(synthetic.SHAPES) and len(shapes.test) == 3 * len(synthetic.SHAPES)
    assert colours.classnames == [f"{c} shape" for c in synthetic.COLOURS]
    assert sorted(set(colours.test.labels.tolist())) == list(range(len(synthetic.COLOURS)))
    # a colour class's images are drawn in that colour: blue over red is higher in the "blue shape" images
    red = colours.test.images[colours.test.labels == 0].float().mean(dim=(0, 2, 3))
    blue = colours.test.images[colours.test.labels == 2].float().mean(dim=(0, 2, 3))
    assert blue[2] - blue[0] > red[2] - red[0] + 30
    assert shapes.domain_names == ["photo"] and shapes.domain_ids == [synthetic.STYLES.index("photo")]


def test_hold_out_domain_keeps_every_other_row_and_scores_all_of_the_held_out_one():
    opts = DatasetOptions(domains=["faded", "noisy", "photo"], train_per_class=3, test_per_class=2)
    bundle = create_dataset("synthetic", opts)
    source, held = protocols.hold_out_domain(bundle, "noisy")
    noisy = synthetic.STYLES.index("noisy")
    assert noisy not in set(source.train.domains.tolist()) | set(source.test.domains.tolist())
    assert len(source.train) == len(bundle.train) * 2 // 3 and len(source.test) == len(bundle.test) * 2 // 3
    # its train rows then its test rows: 5 images per class
    assert len(held) == 40 * 5 and set(held.domains.tolist()) == {noisy}
    assert torch.equal(held.images[0], bundle.train.images[np.flatnonzero(bundle.train.domains == noisy)[0]])
    assert source.domain_names == bundle.domain_names  # ids keep naming the same domains
    with pytest.raises(ConfigError, match="not one of the run's domains: faded, noisy, photo"):
        protocols.hold_out_domain(bundle, "outline")
    with pytest.raises(ConfigError, match="leaves no domain"):
        protocols.hold_out_domain(create_dataset("synthetic", DatasetOptions(domains=["faded"])), "faded")


def test_domain_shots_gives_each_client_its_own_draw_from_its_domain():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)  # 5 classes x 40 images, in 2 domains of 20 each
    domains = np.tile(np.repeat([3, 7], 20), 5)
    test_labels, test_domains = np.arange(60) % 5, np.repeat([3, 7], 30)
    splits = partition.domain_shots(labels, test_labels, domains, test_domains, 4, 4, rng)
    assert [s.domain for s in splits] == [3, 3, 7, 7]
    for s in splits:
        assert (domains[s.train] == s.domain).all() and (test_domains[s.test] == s.domain).all()
        assert np.bincount(labels[s.train], minlength=5).tolist() == [4] * 5
    # two clients of one domain: disjoint draws (20 images per class and domain, 4 shots each)
    assert not set(splits[0].train) & set(splits[1].train)
    assert not set(splits[0].test) & set(splits[1].test) and len(splits[0].test) == 15
    with pytest.raises(ConfigError, match="multiple of the 2 training domains"):
        partition.domain_shots(labels, test_labels, domains, test_domains, 3, 4, rng)


# ------------------------------------------------------------------------------------------------ runs
def test_cross_dataset_scores_every_client_and_the_global_prompt_on_each_target(tiny_clip):
    fed = run(tiny_clip, eval_split="cross-dataset", frac=0.5)
    hist = fed.run()
    names = ["synthetic-colours:faded", "synthetic-shapes:faded"]
    last = hist.rounds[-1]
    assert list(last.client_split_acc) == [*names, *(f"global@{n}" for n in names)]
    # the global model's columns: the same on every client, and P_g scored as a plain prompt over the target's names
    sets = {es.name: es for es in fed.world.eval_sets()}
    for name in names:
        column = last.client_split_acc[f"global@{name}"]
        assert len(set(column)) == 1
        es = sets[name]
        encoder = PromptEncoder(fed.world.clip, es.encoder.classnames, fed.cfg.n_ctx)
        text = encoder.encode(fed.server.global_prompt)
        text = text / text.norm(dim=-1, keepdim=True)
        feats = es.features / es.features.norm(dim=-1, keepdim=True)
        expected = 100.0 * int(((feats @ text.T).argmax(-1) == es.labels).sum()) / len(es.labels)
        assert column[0] == pytest.approx(expected, abs=1e-9)
        assert len(es.labels) == 6 * (8 if "shapes" in name else 5)  # the target's whole test split
    means = last.split_acc
    assert means["mean"] == pytest.approx(np.mean([means[n] for n in names]))
    assert means["global_mean"] == pytest.approx(np.mean([means[f"global@{n}"] for n in names]))
    summary = summarize(hist.rounds)
    assert summary["final_targets_mean_acc"] == means["mean"] and "final_hm" not in summary
    assert summary["best_targets_mean_round"] in (1, 2)
    # the record's JSON line keeps its columns (and reads back)
    again = RoundRecord.from_json(last.to_json())
    assert again.client_split_acc == last.client_split_acc


def test_cross_domain_targets_share_the_runs_text_features(tiny_clip):
    fed = run(tiny_clip, eval_split="cross-domain", eval_targets=["synthetic:noisy", "synthetic:photo+outline"])
    hist = fed.run()
    sets = fed.world.eval_sets()
    assert [es.name for es in sets] == ["synthetic:noisy", "synthetic:photo+outline"]
    assert all(es.encoder is fed.world.encoder for es in sets)  # same classes: the run's own label space
    assert len(sets[1].labels) == 40 * 6 * 2
    assert set(hist.rounds[-1].client_split_acc) >= {"synthetic:noisy", "global@synthetic:noisy"}


def test_leave_one_domain_out_trains_on_the_sources_and_scores_the_held_out_domain(tiny_clip):
    fed = run(
        tiny_clip,
        eval_split="leave-one-domain-out",
        domains=["faded", "noisy", "photo"],
        held_out_domain="photo",
        partition="domain-shots",
        shots=3,
    )
    hist = fed.run()
    photo = synthetic.STYLES.index("photo")
    assert photo not in fed.world.dataset.train.domains and photo not in fed.world.dataset.test.domains
    assert sorted({s.domain for s in fed.world.splits}) == sorted(synthetic.STYLES.index(d) for d in ("faded", "noisy"))
    (held,) = fed.world.eval_sets()
    assert held.name == "photo" and len(held.labels) == 40 * (20 + 6)
    assert list(hist.rounds[-1].client_split_acc) == ["photo", "global@photo"]


def test_methods_without_a_global_prompt_report_clients_only(tiny_clip):
    hist = run(tiny_clip, method="fedotp", eval_split="cross-domain", eval_targets=["synthetic:noisy"]).run()
    assert list(hist.rounds[-1].client_split_acc) == ["synthetic:noisy"]
    assert "global_mean" not in hist.rounds[-1].split_acc


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_targets": ["synthetic:noisy"]}, "eval_targets is for eval_split=cross-dataset or cross-domain"),
        ({"eval_split": "cross-dataset", "eval_targets": []}, "must be a non-empty list"),
        ({"eval_split": "leave-one-domain-out"}, "needs held_out_domain"),
        ({"held_out_domain": "faded"}, "is for eval_split=leave-one-domain-out"),
        ({"eval_split": "cross-dataset", "subsample": "base"}, "trains on every class"),
    ],
)
def test_bad_protocol_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small_config(**overrides)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-split", "leave-one-domain-out", "--held-out-domain", "faded"], "partition=domain-shots"),
        (
            ["--eval-split", "leave-one-domain-out", "--held-out-domain", "outline", "--partition", "domain-shots"],
            "held_out_domain='outline' is not one of the run's domains: faded",
        ),
        (["--eval-split", "cross-dataset", "--eval-targets", "nosuchset"], "dataset='nosuchset' is not one of"),
        (["--eval-split", "cross-domain", "--eval-targets", "synthetic:sepia"], "domains=['sepia']"),
        (["--eval-split", "cross-dataset", "--eval-targets", "synthetic-shapes,synthetic-shapes"], "names a target"),
        (["--eval-split", "cross-domain", "--dataset", "cifar10"], "needs --data-root"),
    ],
)
def test_cli_refusals_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    base = [
        "--rounds",
        "1",
        "--clients",
        "2",
        "--experts",
        "1",
        "--train-per-class",
        "2",
        "--test-per-class",
        "2",
        "--pretrained",
        "none",
    ]
    code = main([*base, *flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_an_evaluation_only_dataset_cannot_be_trained_on(tmp_path, capsys, monkeypatch):
    from pfedmoap.data import registry

    def eval_only(opts):
        world = create_dataset("synthetic", DatasetOptions(train_per_class=1, test_per_class=2))
        empty = registry.LabeledImages(world.train.images[:0], world.train.labels[:0])
        return registry.DatasetBundle("eval-only", world.classnames, empty, world.test)

    monkeypatch.setitem(registry._REGISTRY, "eval-only", eval_only)
    code = main(["--dataset", "eval-only", "--rounds", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dataset=eval-only has no train split" in err[0]
    assert "--eval-targets eval-only" in err[0] and not (tmp_path / "run").exists()


def test_sweep_target_table_has_one_column_per_target_and_the_summaries():
    from pfedmoap.research.sweeps import targets_table

    stats = {"local": (80.0, 1.0), "a": (50.0, 2.0), "b": (60.0, 0.5), "targets_mean": (55.0, 1.0)}
    stats["best_targets_mean"] = (57.0, 1.5)
    rows = {"promptfl": {"label": "PromptFL", "targets": {**stats, "global_targets_mean": (56.0, 0.0)}}}
    rows["local"] = {"label": "CoOp", "targets": stats}
    lines = targets_table({"p": rows}, "p").splitlines()
    assert lines[0] == (
        "| Method | Own split | a | b | Targets, mean | Global model, targets mean | Targets mean, best round |"
    )
    assert (
        lines[2]
        == "| PromptFL | 80.00 ± 1.00 | 50.00 ± 2.00 | 60.00 ± 0.50 | 55.00 ± 1.00 | 56.00 ± 0.00 | 57.00 ± 1.50 |"
    )
    assert lines[3].split(" | ")[5] == "-"  # no global model
    assert targets_table({"p": {"x": {"label": "X"}}}, "p") is None
