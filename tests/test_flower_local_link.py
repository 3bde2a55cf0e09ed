"""``--engine flower`` through ``flwr run``: the generated Flower App, the run-config file, the federation config, the
run-config ``resume`` key, the simulated nodes' shared state folder, and the supervisor that takes a local
SuperLink's whole process tree down. Fast: no SuperLink is started here (the slow tests run the real thing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from pfedmoap.base.errors import ConfigError, UserError  # noqa: E402
from pfedmoap.engine.rundir import RunDir  # noqa: E402
from pfedmoap.federated.plan import make_config  # noqa: E402
from pfedmoap.flower.client_app import node_settings  # noqa: E402
from pfedmoap.flower.local_link import pid_alive, write_toml_table  # noqa: E402
from pfedmoap.flower.run_config import APP_CONFIG, config_from_run_config  # noqa: E402
from pfedmoap.flower.simulation import federation_config_for, write_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the app
def test_pyproject_declares_the_run_config_the_engine_writes():
    import tomllib

    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == APP_CONFIG


def test_the_generated_app_is_valid_and_ships_no_code(tmp_path):
    """Flower's validator accepts the app `--engine flower` writes and imports both components; its FAB holds the
    pyproject only, so every Flower process runs the installed pfedmoap (weights and _C included)."""
    import zipfile

    import tomllib
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    app = write_app(tmp_path / "app")
    config = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert valid, errors
    assert config["tool"]["flwr"]["app"]["config"] == APP_CONFIG
    with zipfile.ZipFile(__import__("io").BytesIO(build_fab_from_disk(app))) as fab:
        assert [n for n in fab.namelist() if not n.startswith(".")] == ["pyproject.toml"]


def test_a_whole_config_survives_the_run_config_file(tmp_path):
    """The config travels as JSON inside a TOML file that Flower parses: quotes, backslashes and non-ASCII in a
    string field come back unchanged, and the ServerApp builds exactly the config that was sent."""
    from flwr.common.config import parse_config_args

    cfg = make_config("synthetic", rounds=3, lr_prompt=0.123456789, data_root='/tmp/a "b" \\c\\ é', out="/x/y")
    path = tmp_path / "run-config.toml"
    write_toml_table(path, {"preset": "", "config-json": json.dumps(cfg.to_dict()), "out": "/x/y", "resume": False})
    parsed = parse_config_args([str(path)])
    assert parsed["resume"] is False and parsed["out"] == "/x/y"
    back, opts = config_from_run_config({**APP_CONFIG, **parsed})
    assert back == cfg and opts.out == "/x/y" and not opts.resume


def test_config_json_and_preset_must_agree():
    with pytest.raises(ConfigError, match="config-json names preset 'cifar10'"):
        config_from_run_config({"preset": "synthetic", "config-json": '{"preset": "cifar10"}'})


def test_flower_processes_find_this_pythons_commands_first(monkeypatch):
    """Flower's processes start each other by name (flower-superexec, flwr-simulation, flwr-clientapp): this Python's
    bin folder comes first on their PATH, once, whatever PATH the caller had (none, another venv's, this one's)."""
    from pfedmoap.flower.local_link import flower_env, flower_path

    here = os.path.dirname(sys.executable)
    assert flower_path("") == here
    assert flower_path(os.pathsep.join(["/usr/bin", "/other/venv/bin"])).split(os.pathsep) == [
        here,
        "/usr/bin",
        "/other/venv/bin",
    ]
    assert flower_path(os.pathsep.join(["/usr/bin", here])).split(os.pathsep) == [here, "/usr/bin"]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert flower_env(Path("/tmp/h"))["PATH"].split(os.pathsep) == [here, "/usr/bin", "/bin"]


# ---------------------------------------------------------------------------------------------- federation config
def test_federation_config_defaults_and_overrides():
    cfg = make_config("synthetic", clients=6, experts=2, threads=2, device="cpu")
    assert federation_config_for(cfg, None) == {
        "num-supernodes": 6,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": 0.0,
    }
    assert federation_config_for(cfg, {"client-resources-num-gpus": 0.25})["client-resources-num-gpus"] == 0.25
    with pytest.raises(ConfigError, match="'num-gpus' is not one of Flower's: num-supernodes, "):
        federation_config_for(cfg, {"num-gpus": 1})
    with pytest.raises(ConfigError, match="num-supernodes=3 is fewer than clients=6"):
        federation_config_for(cfg, {"num-supernodes": 3})


# ---------------------------------------------------------------------------------------------- resume=true
def test_run_config_resume_takes_the_saved_config(tmp_path):
    cfg = make_config("synthetic", rounds=4, clients=3, experts=1)
    run = RunDir.create(tmp_path / "run")
    run.write_config({**cfg.to_dict(), "_meta": {"engine": "flower"}})
    back, opts = config_from_run_config({**APP_CONFIG, "resume": True, "out": str(run.path)})
    assert back == cfg and opts.resume
    with pytest.raises(ConfigError, match="continues .* with its saved config: drop rounds"):
        config_from_run_config({**APP_CONFIG, "resume": True, "out": str(run.path), "rounds": 9})
    with pytest.raises(ConfigError, match="drop config-json"):
        config_from_run_config({**APP_CONFIG, "resume": True, "out": str(run.path), "config-json": '{"seed": 2}'})
    with pytest.raises(ConfigError, match="resume=true needs out='RUN_DIR'"):
        config_from_run_config({**APP_CONFIG, "resume": True})
    with pytest.raises(ConfigError, match="resume='maybe' is not a boolean"):
        config_from_run_config({**APP_CONFIG, "resume": "maybe", "out": str(run.path)})
    local = RunDir.create(tmp_path / "local")
    local.write_config({**cfg.to_dict(), "_meta": {"engine": "local"}})
    with pytest.raises(UserError, match="was made with --engine local; resume it with --engine local"):
        config_from_run_config({**APP_CONFIG, "resume": True, "out": str(local.path)})


# ---------------------------------------------------------------------------------------------- node settings
def test_simulated_nodes_share_the_run_configs_state_folder():
    shared = {"node-state-dir": "/runs/a/node-states"}
    assert node_settings({"partition-id": 1}, shared) == {
        "state-dir": "/runs/a/node-states",
        "worker": False,  # a simulated node answers in its own long-lived process
        "partition-id": 1,
    }
    own = {"partition-id": 1, "state-dir": "/var/lib/pfedmoap"}
    assert node_settings(own, shared) == own  # a node's own folder wins, and keeps its worker
    assert node_settings({"partition-id": 1}, {"node-state-dir": ""}) == {"partition-id": 1}


# ---------------------------------------------------------------------------------------------- the supervisor
# a process tree like Flower's: a child that starts a grandchild in a session of its own, which starts another
# process and exits (its child is re-parented but keeps the group), then everyone sleeps
_TREE = """
import os, subprocess, sys, time
pids = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(300)
        os._exit(0)
    os._exit(0)  # leaves an orphan in the new session
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\\n{child.pid}\\n")
time.sleep(300)
"""


def _supervised_tree(tmp_path: Path) -> tuple[subprocess.Popen, subprocess.Popen, list[int], Path]:
    """A stand-in parent (sleeps), the supervisor it started, and the pids of the tree under it."""
    pids = tmp_path / "pids"
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    starter = (
        "import subprocess, sys, time\n"
        "from pfedmoap.flower.local_link import start_supervised\n"
        f"p = start_supervised([sys.executable, {str(script)!r}, {str(pids)!r}], "
        f"__import__('pathlib').Path({str(tmp_path / 'log')!r}), __import__('os').environ)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    supervisor_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not pids.exists() or len(pids.read_text().split()) < 3):
        time.sleep(0.05)
    time.sleep(1.5)  # the supervisor scans the tree's process groups once a second
    tree = [int(p) for p in pids.read_text().split()]
    assert len(tree) == 3 and all(pid_alive(p) for p in tree)
    return parent, supervisor_pid, tree, pids


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_the_supervisor_takes_the_whole_tree_down_when_its_parent_is_killed(tmp_path):
    parent, supervisor, tree, _ = _supervised_tree(tmp_path)
    try:
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
        assert _gone([supervisor, *tree], 10), [p for p in [supervisor, *tree] if pid_alive(p)]
    finally:
        for pid in [supervisor, *tree]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_the_supervisor_stops_the_tree_when_told_to(tmp_path):
    parent, supervisor, tree, _ = _supervised_tree(tmp_path)
    try:
        os.kill(supervisor, signal.SIGTERM)
        assert _gone(tree, 10), [p for p in tree if pid_alive(p)]
    finally:
        parent.kill()
        parent.wait()
        for pid in [supervisor, *tree]:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- bad input
def test_a_missing_dataset_is_one_line_before_flower_starts(tmp_path, capsys):
    """The simulated nodes share this machine: a dataset that is not there is one line and exit 2, before any
    Flower process starts (each node would otherwise log its own traceback), and nothing is written."""
    from pfedmoap.train import main

    out = tmp_path / "run"
    argv = ["--engine", "flower", "--preset", "cifar10", "--data-root", str(tmp_path / "nodata"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset=cifar10: not found" in err[0], err
    assert not out.exists()


def test_a_failed_run_is_one_line_and_exit_code_1(capsys):
    from pfedmoap.base.cli import run_command
    from pfedmoap.base.errors import RunFailed

    def job() -> int:
        raise RunFailed("the Flower run 7 ended finished:failed: boom")

    assert run_command("pfedmoap.train", job) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pfedmoap.train: error: the Flower run 7 ended finished:failed: boom"]


def test_the_loopback_bypasses_a_proxy_set_for_the_registries(tmp_path, monkeypatch):
    """Machines that reach package registries through HTTP_PROXY would otherwise send Flower's loopback hops (and
    the SuperLink's health check) to the proxy: measured, urllib and httpx both do by default."""
    import urllib.request

    from pfedmoap.flower.local_link import _DIRECT, flower_env

    monkeypatch.setenv("HTTP_PROXY", "http://10.255.255.1:3128")
    monkeypatch.setenv("http_proxy", "http://10.255.255.1:3128")
    monkeypatch.setenv("no_proxy", "registry.example")
    assert not urllib.request.proxy_bypass("127.0.0.1")  # the problem, as it is without the fix
    env = flower_env(tmp_path)
    assert env["no_proxy"] == "registry.example,127.0.0.1,localhost"
    for key in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(key, env[key])
    assert urllib.request.proxy_bypass("127.0.0.1")  # what Flower's processes see
    assert not any(isinstance(h, urllib.request.ProxyHandler) and h.proxies for h in _DIRECT.handlers)
