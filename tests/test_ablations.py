"""The ablation suite: grid files are checked before anything runs, runs are shared and resumed, the report
and plots come from the run folders, and the README section is filled from the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pfedmoap.base.errors import ConfigError, UserError
from pfedmoap.experiments import main
from pfedmoap.research import ablations

# a smoke-size world: 4 clients, 2 rounds of 1 epoch on random weights (seconds per run)
SMOKE_SET = {
    "pretrained": "none",
    "clients": 4,
    "rounds": 2,
    "local_epochs": 1,
    "train_per_class": 8,
    "test_per_class": 4,
    "shots": 8,
    "experts": 2,
}
SMOKE = {
    "description": "smoke",
    "seeds": [1],
    "preset": "synthetic",
    "method": "pfedmoap",
    "set": SMOKE_SET,
    "studies": [
        {"name": "experts", "title": "K", "vary": {"experts": [1, 2]}, "plot": "line"},
        {"name": "gates", "vary": {"gate": ["attention", "average"], "gate_sharing": ["private"]}, "plot": "bar"},
        {"name": "n_ctx", "vary": {"n_ctx": [4, 16]}, "plot": "bytes", "scale": {"width": 512, "experts": [1, 9]}},
        {
            "name": "alpha",
            "preset": "synthetic-dirichlet",
            "set": {"frac": 1.0, "min_client_size": 2},
            "vary": {"dirichlet_alpha": [0.5, 1.0], "experts": [1, 2]},
            "plot": "heatmap",
        },
    ],
}


def _write(tmp_path: Path, suite: dict, name: str = "smoke.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(suite))
    return path


def test_builtin_suite_loads_with_its_grid():
    suite = ablations.load_suite("ablations")
    studies = {s.name: s for s in suite.studies}
    assert [c.values["experts"] for c in studies["experts"].cases] == [1, 3, 5, 9]
    assert [c.values["lam"] for c in studies["lambda"].cases] == [0, 0.25, 0.5, 1, 2]
    assert len(studies["gates"].cases) == 6 and len(studies["dirichlet"].cases) == 9
    assert {c.config.expert_selection for c in studies["selection"].cases} == {"knn", "random", "fixed"}
    # the default config appears in several studies and runs once per seed
    keys = [c.key for s in suite.studies for c in s.cases if c.config.preset == "synthetic"]
    assert keys.count("default") == 6
    assert len(suite.runs()) == 3 * len({ablations.run_folder(c) for s in suite.studies for c in s.cases})
    # gate_sharing=private is pFedMoAP's own sharing: the same run as the default
    private = next(c for c in studies["gates"].cases if c.values == {"gate": "attention", "gate_sharing": "private"})
    assert private.key == "default" and private.config.gate_sharing is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown key 'colour'; valid keys: description, seeds"),
        ({"studies": [{"name": "a", "vary": {"experts": [1]}, "plots": "line"}]}, "unknown key 'plots'"),
        ({"studies": [{"name": "a", "vary": {"expertz": [1]}}]}, "'expertz' is not a config field"),
        ({"studies": [{"name": "a", "vary": {"experts": [1]}, "plot": "pie"}]}, "plot='pie' is not one of"),
        ({"studies": [{"name": "a", "cases": [{"seed": 3}]}]}, "'seed' is not a config field a suite can set"),
        ({"studies": [{"name": "a", "vary": {"experts": [1]}, "cases": [{}]}]}, "exactly one of 'vary'"),
        ({"studies": [{"name": "a", "vary": {"gate": ["attention", "lstm"]}}]}, "(gate=lstm): gate='lstm'"),
        ({"studies": [{"name": "a", "vary": {"experts": [1], "lam": [0]}, "plot": "line"}]}, "exactly one varied"),
        ({"seeds": []}, "seeds=[] must be a non-empty list"),
    ],
)
def test_bad_grid_is_one_line_and_runs_nothing(tmp_path, capsys, change, message):
    path = _write(tmp_path, {**SMOKE, **change})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=None) as info:
        ablations.load_suite(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert main(["--suite", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_unknown_suite_and_flags_that_do_not_apply(tmp_path, capsys):
    assert main(["--suite", "ablation", "--out", str(tmp_path / "o")]) == 2
    assert "suite='ablation' is not one of: ablations (or a .json file)" in capsys.readouterr().err
    assert main(["--suite", "ablations", "--methods", "pfedmoap", "--out", str(tmp_path / "o")]) == 2
    assert "--methods does not apply to --suite" in capsys.readouterr().err
    assert main(["--readme", "README.md", "--out", str(tmp_path / "o")]) == 2
    assert "--readme needs --suite" in capsys.readouterr().err
    assert main(["--report-only", "--out", str(tmp_path / "o")]) == 2
    assert "--report-only needs --suite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_smoke_suite_end_to_end_resumes_and_fills_the_readme(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = _write(tmp_path, SMOKE)
    out = tmp_path / "out"
    # before anything ran: --report-only runs nothing and marks every point
    assert main(["--suite", str(path), "--out", str(out), "--report-only"]) == 0
    assert "| 1 | not run yet |" in (out / "smoke.md").read_text() and not (out / "runs").exists()
    capsys.readouterr()
    assert main(["--suite", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # 2 + 1 new (average) + 1 new (n_ctx=4) synthetic configs, 4 dirichlet ones: one seed each
    assert "suite smoke: 8 runs (8 configs x 1 seeds), 0 already finished" in err
    assert "[8/8]" in err and "ran 8 runs" in err
    report = json.loads((out / "smoke.json").read_text())
    md = (out / "smoke.md").read_text()
    for name in ("experts", "gates", "n_ctx", "alpha"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"(plots/{name}.png)" in md
    # bytes: measured in the last round equal (K+1) x n_ctx x W x 4 down and n_ctx x W x 4 up per participant
    for row in report["studies"]["n_ctx"]["rows"]:
        assert row["prompt_width"] == 64
        assert row["last_round_bytes_down"] == row["theoretical_bytes_down"] == 4 * 3 * row["values"]["n_ctx"] * 64 * 4
        assert row["last_round_bytes_up"] == row["theoretical_bytes_up"]
    assert "| 9 | 80.0 KiB | 320.0 KiB |" in md  # the width-512 table: (9+1) x {4,16} x 512 x 4
    heat = report["studies"]["alpha"]["rows"]
    assert [r["values"] for r in heat][0] == {"dirichlet_alpha": 0.5, "experts": 1}
    # the default config is one folder shared by the studies that contain it
    runs = sorted(p.parent.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("summary.json"))
    assert len(runs) == 8 and "synthetic/default/seed1" not in runs  # experts=2 is set: not the preset's own
    assert report["studies"]["experts"]["rows"][1]["run"] == report["studies"]["gates"]["rows"][0]["run"]

    # rerun: nothing runs again, the report is the same
    assert main(["--suite", str(path), "--out", str(out)]) == 0
    assert "8 already finished" in capsys.readouterr().err
    assert json.loads((out / "smoke.json").read_text()) == report

    # an interrupted run (no summary) resumes from its checkpoint and ends with the same numbers
    victim = out / "runs" / report["studies"]["experts"]["rows"][0]["run"] / "seed1"
    before = (victim / "metrics.jsonl").read_text()
    (victim / "summary.json").unlink()
    assert main(["--suite", str(path), "--out", str(out)]) == 0
    assert ": resumed," in capsys.readouterr().err
    assert (victim / "metrics.jsonl").read_text() == before

    # README: the section between the markers is replaced, the plots are copied beside it
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Ablations\n\n{ablations.README_BEGIN}\nold\n{ablations.README_END}\n\nafter\n")
    assert main(["--suite", str(path), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{ablations.README_END}\n\nafter\n")
    assert "(docs/img/smoke/experts.png)" in text and (tmp_path / "docs/img/smoke/experts.png").is_file()
    assert "| experts | final accuracy (%)" in text

    # a run folder whose config is not the case's (the preset changed since) is refused, and nothing changes
    saved = json.loads((victim / "config.json").read_text())
    (victim / "config.json").write_text(json.dumps({**saved, "lr_gate": 0.5}))
    capsys.readouterr()
    assert main(["--suite", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with another config (lr_gate=0.5 (wanted 0.01))" in err and err.count("\n") == 1
    assert (victim / "metrics.jsonl").read_text() == before


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to fill\n")
    with pytest.raises(UserError, match="has no .* markers"):
        ablations.splice_readme(readme, "text", [], tmp_path / "img")
    assert readme.read_text() == "# nothing to fill\n"
    assert not (tmp_path / "img").exists()
