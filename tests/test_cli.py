"""The CLI as a user meets it: a smoke run, the run directory, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import pytest

from pfedmoap.train import main

FAST = [
    "--pretrained",
    "none",
    "--rounds",
    "2",
    "--local-epochs",
    "1",
    "--train-per-class",
    "20",
    "--test-per-class",
    "5",
    "--no-progress",
    "--clients",
    "4",
    "--experts",
    "2",
]


def test_cli_smoke_writes_run_dir(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "round   2/2" in printed.err + printed.out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rounds"] == 2 and cfg["method"] == "pfedmoap" and cfg["preset"] == "synthetic"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for key in ("mean_acc", "std_acc", "client_acc", "experts", "bytes_down", "bytes_up", "seconds", "phase_seconds"):
        assert key in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_mean_acc", "best_mean_acc", "last5_mean_acc"):
        assert key in summary
    assert (out / "checkpoints" / "last.pt").is_file()


def test_cli_fused_flag_logs_one_backend_per_op(tmp_path, capsys):
    assert main([*FAST, "--rounds", "1", "--fused", "--out", str(tmp_path / "f")]) == 0
    printed = capsys.readouterr()
    line = next(x for x in (printed.out + printed.err).splitlines() if x.startswith("ops: "))
    assert all(f"{op}=" in line for op in ("gate_score", "knn", "assemble_prompts"))


def test_list_presets(capsys):
    assert main(["--list-presets"]) == 0
    assert "synthetic" in capsys.readouterr().out


BAD = [
    (["--preset", "nope"], "preset='nope'"),
    (["--method", "fedsomething"], "method='fedsomething'"),
    (["--dataset", "imagenet-xxl"], "dataset='imagenet-xxl'"),
    (["--model", "NoSuchNet"], "model='NoSuchNet'"),
    (["--experts", "4"], "experts=4 must be smaller than clients=4"),
    (["--d-gate", "24"], "d_gate=24"),
    (["--d-gate", "48", "--heads", "8"], "d_gate=48 does not divide"),
    (["--frac", "0"], "frac=0.0"),
    (["--frac", "1.5"], "frac=1.5"),
    (["--lr-prompt", "0"], "lr_prompt=0.0"),
    (["--lr-gate", "-1"], "lr_gate=-1.0"),
    (["--rounds", "0"], "rounds=0"),
    (["--rounds", "three"], "invalid int value: 'three'"),
    (["--attn-scale", "big"], "'big' is not a positive number or 'sqrt'"),
    (["--partition", "zipf"], "partition='zipf'"),
    (["--domains", "watercolour"], "domains=['watercolour']"),
    (["--clients", "50"], "clients=50 does not fit a pathological split"),
    (["--pretrained", "/no/such/file.pt"], "no such weights file"),
    (["--pretrained", "laion9b"], "pretrained='laion9b' is not a tag"),
    (["--unknown-flag"], "unrecognized arguments"),
    (["--client-dropout", "1"], "client_dropout=1.0 is outside [0, 1)"),
    (["--max-prompt-norm", "0"], "max_prompt_norm=0.0 must be a positive number"),
    (["--dp-epsilon", "0"], "dp_epsilon=0.0 must be a positive number"),
    (["--dp-epsilon", "5", "--dp-delta", "1"], "dp_delta=1.0 is outside (0, 1)"),
    (["--dp-epsilon", "5", "--method", "local"], "method=local uploads nothing"),
    (["--dp-epsilon", "5", "--method", "pfedmoap-shared-gate"], "also uploads its gate"),
    (["--gate", "softmax"], "gate='softmax' is not one of: attention, average, linear"),
    (["--seed", "-1"], "seed=-1 must be an integer in 0..4294967295"),
    (["--seed", "99999999999999999999"], "seed=99999999999999999999 must be an integer"),
    (["--n-ctx", "80"], "n_ctx=80 leaves no room for the class names"),
    (["--precision", "fp16"], "precision='fp16' is not one of: fp32, bf16"),
    (["--parallel-clients", "0"], "parallel_clients=0 must be an integer >= 1"),
    (["--parallel-clients", "two"], "invalid int value: 'two'"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*FAST, *args, "--out", str(out)]
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert not (out / "config.json").exists()


def test_out_dir_holding_another_run_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--rounds", "1", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main([*FAST, "--rounds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pfedmoap.train: error: out=") and "already holds a run" in err[-1]
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_print_config_checks_and_prints_without_running(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--method", "promptfl", "--rounds", "3", "--out", str(out), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert (config["method"], config["rounds"], config["preset"]) == ("promptfl", 3, "synthetic")
    assert config["out"] == str(out) and not out.exists()
    assert main(["--resume", str(tmp_path), "--print-config"]) == 2
    assert "--print-config shows a new run's config" in capsys.readouterr().err
    # an --out the file system cannot take is refused before anything runs, whether checked or run
    for extra in (["--print-config"], []):
        assert main([*FAST, "--out", str(tmp_path / ("x" * 300)), *extra]) == 2
        assert capsys.readouterr().err.strip().endswith("cannot be used (File name too long)")


def test_list_methods_names_every_registered_method_and_gate(capsys):
    from pfedmoap.federated import registry

    assert main(["--list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[1] for line in lines}
    assert set(registry.methods()) | set(registry.gates()) <= names
    assert any(line.startswith("method pfedmoap-shared-gate") for line in lines)


def test_module_entry_point_exit_code(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pfedmoap.train", "--frac", "2", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pfedmoap.train: error: frac=2.0 is outside (0, 1]"
    assert "Traceback" not in proc.stderr
