"""Settings that belong to their plug-in: declared in the plug-in's file, they make the flags, the checks and the
saved config; a method from outside the library brings its own through the real command line; run folders written
before the settings moved out of the shared config still load and resume exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import reopen_run

from pfedmoap.base.errors import ConfigError
from pfedmoap.config import Config
from pfedmoap.config.settings import Setting
from pfedmoap.engine.launch import resume, run
from pfedmoap.engine.rundir import read_metrics
from pfedmoap.federated import registry
from pfedmoap.federated.plan import config_from_dict, make_config, resolve_config, saved_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "pre-settings"
TIMING = {"seconds", "phase_seconds"}

OUTSIDE = '''
"""A method from outside the library: PromptFL whose new global prompt is scaled by --shrink-alpha."""
from pfedmoap import Setting, register_method
from pfedmoap.methods.promptfl import PromptFL

ALPHA = Setting("shrink_alpha", 1.0, "scale of the new global prompt", low=0.0, strict=True, high=1.0)


@register_method
class Shrink(PromptFL):
    name = "shrink"
    help = "PromptFL with its aggregate scaled by --shrink-alpha"
    settings = (ALPHA,)

    def aggregate(self, server, uploads):
        super().aggregate(server, uploads)
        server.global_prompt = server.global_prompt * ALPHA.of(self.cfg)
'''

SMALL = ["--pretrained", "none", "--clients", "3", "--local-epochs", "1", "--train-per-class", "8"]
SMALL += ["--test-per-class", "4", "--shots", "4", "--no-progress", "--threads", "1"]


def test_the_shared_config_names_no_plugin_setting() -> None:
    shared = {f.name for f in dataclasses.fields(Config)}
    declared = registry.settings()
    assert not shared & set(declared)
    # every plug-in setting the shared config once held is declared by its plug-in, with its flag
    owners = {name: owners for name, (_, owners) in declared.items()}
    assert owners["fedprox_mu"] == ["method fedprox"]
    assert owners["fedpgp_bottleneck"] == ["method fedpgp"]
    assert owners["fedotp_top_percent"] == ["method fedotp"]
    assert owners["expert_distance"] == ["expert_selection knn"]
    assert owners["heads"] == ["gate attention"]
    assert set(owners["d_gate"]) == {"gate attention", "gate average", "gate linear"}
    assert declared["lam"][0].flag == "--lambda"


def test_settings_come_from_their_declarations() -> None:
    cfg = make_config(None, method="fedprox", fedprox_mu=0.5)
    assert cfg.settings["fedprox_mu"] == 0.5 and cfg.fedprox_mu == 0.5  # the attribute read still works
    assert cfg.settings["fedotp_eps"] == 0.01  # every declared setting, with its default
    flat = cfg.to_dict()
    assert "settings" not in flat and flat["fedprox_mu"] == 0.5  # config.json keeps the flat names
    assert resolve_config(config_from_dict(flat)) == cfg
    assert cfg.replace(fedprox_mu=0.25).settings["fedprox_mu"] == 0.25
    with pytest.raises(ConfigError, match=r"^config: unknown key\(s\) fedprox_muu$"):
        config_from_dict({"fedprox_muu": 1.0})
    with pytest.raises(ConfigError, match="^fedotp_top_percent=0.0 must be a positive number$"):
        make_config(None, fedotp_top_percent=0.0)
    with pytest.raises(ConfigError, match="^heads=0 must be an integer >= 1$"):
        make_config(None, heads=0)


def test_a_declaration_is_checked() -> None:
    with pytest.raises(ConfigError, match="must be a number > 0 and <= 1"):
        Setting("x_alpha", 2.0, "refused: its own default is out of range", low=0.0, strict=True, high=1.0)
    with pytest.raises(ValueError, match="must be an identifier"):
        Setting("x-alpha", 1.0, "a config key must be an identifier")


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PFEDMOAP_PLUGINS": "outside_method"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pfedmoap.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_method_from_outside_brings_its_setting_through_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "outside_method.py").write_text(OUTSIDE)
    helped = _cli(tmp_path, "--help")
    assert helped.returncode == 0 and "--shrink-alpha" in helped.stdout and "method shrink" in helped.stdout
    bad = _cli(tmp_path, "--method", "shrink", "--shrink-alpha", "2", "--print-config")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["pfedmoap.train: error: shrink_alpha=2.0 must be a number > 0 and <= 1"]
    finals = {}
    for alpha in ("0.5", "1.0"):
        out = tmp_path / f"run-{alpha}"
        done = _cli(tmp_path, *SMALL, "--method", "shrink", "--shrink-alpha", alpha, "--rounds", "2", "--out", str(out))
        assert done.returncode == 0, done.stderr
        saved = json.loads((out / "config.json").read_text())
        assert saved["method"] == "shrink" and saved["shrink_alpha"] == float(alpha)
        finals[alpha] = [r["client_acc"] for r in read_metrics(out)]
    assert finals["0.5"] != finals["1.0"]  # the setting reached the method


@pytest.mark.parametrize("name", ["fedprox", "pfedmoap"])
def test_a_run_folder_from_before_the_move_resumes_exactly(tmp_path: Path, name: str) -> None:
    """config.json and the checkpoint of a 1-round run written by the commit before settings moved (fedprox with
    mu 0.5; pfedmoap with a cosine knn, 4 heads, sqrt scaling, lambda 1, a gate learning rate of 0.05) load, and
    resumed to 2 rounds the run equals a fresh 2-round run of the same config."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / name, old)
    data = reopen_run(old, 2)
    data.pop("_meta")  # the run's facts, not config
    cfg = resolve_config(config_from_dict({**data, "out": None}))
    if name == "fedprox":
        assert cfg.settings["fedprox_mu"] == 0.5
    else:
        wanted = {"expert_distance": "cosine", "heads": 4, "attn_scale": "sqrt", "lam": 1.0, "lr_gate": 0.05}
        assert {k: cfg.settings[k] for k in wanted} == wanted
    resumed = resume(old, log=lambda m: None)
    fresh = run(cfg, out=tmp_path / "fresh", log=lambda m: None)

    def results(history) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(history.run_dir)]

    assert len(results(resumed)) == 2
    assert results(resumed) == results(fresh)


def test_a_setting_added_later_resumes_a_saved_run_as_it_ran(tmp_path: Path) -> None:
    """fedotp_stop came after runs were saved with our log-v rule: a saved FedOTP run (1 round, eps 0.1, written by
    the commit before the setting) resumes with log-v, equal to a fresh log-v run; a new config gets FedOTP's
    published rule, the default."""
    old = tmp_path / "old"
    shutil.copytree(FIXTURES / "fedotp", old)
    data = reopen_run(old, 2)
    data.pop("_meta")
    assert "fedotp_stop" not in data
    assert resolve_config(saved_config_from_dict(dict(data))).settings["fedotp_stop"] == "log-v"
    fresh_cfg = resolve_config(config_from_dict({**data, "out": None}))
    assert fresh_cfg.settings["fedotp_stop"] == "published"
    resumed = resume(old, log=lambda m: None)
    ours = run(fresh_cfg.replace(settings={**fresh_cfg.settings, "fedotp_stop": "log-v"}), out=tmp_path / "ours")

    def results(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]

    assert results(resumed.run_dir) == results(ours.run_dir)


def test_an_outside_module_that_cannot_be_imported_is_one_line(monkeypatch, capsys) -> None:
    from pfedmoap.federated import registry
    from pfedmoap.train import main

    monkeypatch.setenv("PFEDMOAP_PLUGINS", "no_such_plugin_module")
    monkeypatch.setattr(registry, "_outside_loaded", False)
    assert main(["--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pfedmoap.train: error: PFEDMOAP_PLUGINS names module 'no_such_plugin_module', which cannot be imported "
        "(ModuleNotFoundError: No module named 'no_such_plugin_module')"
    ]
    monkeypatch.delenv("PFEDMOAP_PLUGINS")
    assert main(["--print-config"]) == 0  # nothing was left half-loaded


def test_the_library_calls_refuse_a_bad_engine(tmp_path: Path) -> None:
    import pfedmoap
    from pfedmoap.base.errors import UserError

    with pytest.raises(ConfigError, match=r"^engine='ray' is not one of: local, flower$"):
        pfedmoap.run(make_config(None), engine="ray")
    made = tmp_path / "made-by-flower"
    shutil.copytree(FIXTURES / "fedprox", made)
    reopen_run(made, engine="flower")
    with pytest.raises(UserError, match="was made with --engine flower; resume it with --engine flower, not local$"):
        pfedmoap.resume(made, engine="local")
