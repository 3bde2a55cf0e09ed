"""The Flower Strategy and ClientApp against a fake grid (no Ray): the real ClientApp handles every message
in this process, with one Context per node, as Flower's runtime would. Fault injection happens in the grid."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_config

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from pfedmoap.base.errors import ConfigError, UserError  # noqa: E402
from pfedmoap.engine.federation import Federation  # noqa: E402
from pfedmoap.engine.rundir import RunDir, read_metrics  # noqa: E402
from pfedmoap.flower.client_app import make_client_app  # noqa: E402
from pfedmoap.flower.messages import STATE_GATE, UPLOAD  # noqa: E402
from pfedmoap.flower.run_config import FlowerOptions, config_from_run_config  # noqa: E402
from pfedmoap.flower.server_app import make_server_app  # noqa: E402
from pfedmoap.flower.strategy import PFedMoAPStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

Tamper = Callable[[Message, Message], Message | None]  # (request, reply) -> reply to deliver, or None (silence)


class FakeGrid(Grid):
    """Nodes with random ids, each holding one partition; messages go to the real ClientApp in-process."""

    def __init__(self, num_nodes: int, node_seed: int, partitions: list[int] | None = None):
        rng = random.Random(node_seed)
        self.app = make_client_app()
        self.contexts: dict[int, Context] = {}
        for pid in partitions if partitions is not None else range(num_nodes):
            node = rng.getrandbits(63) + 1
            self.contexts[node] = Context(
                run_id=7, node_id=node, node_config={"partition-id": pid}, state=RecordDict(), run_config={}
            )
        # (message type, partition id) -> a change to the message before its node sees it (a forged download)
        self.request_tamper: dict[tuple[str, int], Callable[[Message], None]] = {}
        self.train_tamper: dict[int, Tamper] = {}  # partition id -> what happens to its train reply
        self.eval_tamper: dict[int, Tamper] = {}  # ... and to its evaluate reply
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    def node_of(self, pid: int) -> int:
        return next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == pid)

    # the Grid interface
    def set_run(self, run) -> None:  # pragma: no cover - not used by the strategy
        pass

    @property
    def run(self):  # pragma: no cover
        return None

    def create_message(self, *args, **kwargs):  # pragma: no cover - deprecated in Flower
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self.contexts)
        random.shuffle(ids)  # no order is promised
        return ids

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            self.sent.append(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            change = self.request_tamper.get((msg.metadata.message_type, context.node_config["partition-id"]))
            if change is not None:
                change(msg)
            try:
                reply = self.app(msg, context)
            except Exception as exc:  # what Flower's runtime turns a raising ClientApp into
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            tampers = {"train": self.train_tamper, "evaluate": self.eval_tamper}.get(msg.metadata.message_type, {})
            tamper = tampers.get(context.node_config["partition-id"])
            if tamper is not None:
                reply = tamper(msg, reply)
            if reply is not None:
                self.replies.append(reply)
                out.append(reply)
        return out


@pytest.fixture(autouse=True)
def _task_identity():
    # Message() reads the run's identity, which Flower's runtime sets in its processes
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def cfg_for(**overrides):
    base = dict(clients=4, rounds=3, experts=2, threads=1, lr_prompt=0.5, lr_gate=0.1)
    base.update(overrides)
    return small_config(**base)


def run_flower(cfg, grid: FakeGrid, run_dir: RunDir | None = None):
    return PFedMoAPStrategy(cfg, run_dir=run_dir, log=lambda m: None).run(grid)


def fails(_: Message, reply: Message) -> Message:
    return Message(Error(code=1, reason="RuntimeError: injected failure"), reply_to=_)


def uploads(array: Array) -> Tamper:
    def tamper(_: Message, reply: Message) -> Message:
        content = copy.deepcopy(reply.content)
        content[UPLOAD] = ArrayRecord({"prompt": array})
        return Message(content, reply_to=_)

    return tamper


def silent(_: Message, reply: Message) -> None:
    return None


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"comm_dtype": "bfloat16", "frac": 0.5, "expert_selection": "random", "client_dropout": 0.3, "rounds": 4},
        {"comm_dtype": "float16", "method": "promptfl"},
        {"method": "local"},
        {"method": "zeroshot"},
        {"dp_epsilon": 50.0, "dp_delta": 0.05, "dp_clip": 0.3, "rounds": 2},
        {"method": "pfedmoap-shared-gate", "comm_dtype": "float16"},
        {"gate": "linear"},
        {"method": "fedotp", "frac": 0.5},
        {"method": "fedpgp", "client_dropout": 0.3},
        {"subsample": "base", "eval_split": "base2novel", "frac": 0.5},
        {"method": "fedotp", "subsample": "base", "eval_split": "base2novel"},
        {"ctx_init": "a photo of a", "n_ctx": 4, "method": "promptfl"},
        {"method": "promptfolio", "frac": 0.5},
        {"method": "fedpha", "fedpha_local_ctx": "4,8", "subsample": "base", "eval_split": "base2novel"},
        {"method": "fedtpg", "n_ctx": 4, "subsample": "base", "eval_split": "base2novel", "frac": 0.5},
        {"method": "dpfpl", "dpfpl_epsilon": 0.4, "dpfpl_rank": 2, "frac": 0.75, "client_dropout": 0.3},
        {"method": "dpfpl", "dpfpl_rank": 4, "subsample": "base", "eval_split": "base2novel", "comm_dtype": "bfloat16"},
        {"eval_split": "cross-dataset", "frac": 0.5},
        {"method": "fedotp", "eval_split": "cross-domain", "eval_targets": ["synthetic:noisy"], "frac": 0.5},
        {
            "method": "promptfl",
            "eval_split": "leave-one-domain-out",
            "domains": ["faded", "noisy"],
            "held_out_domain": "noisy",
            "partition": "domain-shots",
            "shots": 4,
        },
    ],
    ids=[
        "pfedmoap",
        "bf16-frac-random-dropout",
        "promptfl-fp16",
        "local",
        "zeroshot",
        "dp",
        "shared-gate",
        "linear",
        "fedotp",
        "fedpgp",
        "base2novel",
        "fedotp-base2novel",
        "ctx-init",
        "promptfolio",
        "fedpha-lengths-base2novel",
        "fedtpg-base2novel",
        "dpfpl-dp-frac-dropout",
        "dpfpl-base2novel-bf16",
        "cross-dataset-frac",
        "fedotp-cross-domain",
        "promptfl-leave-one-domain-out",
    ],
)
def test_same_numbers_as_in_process(tiny_clip, small_world, overrides):
    """Same seed, same config: the Flower path gives bit-identical accuracies, experts, bytes and prompts."""
    if "dp_epsilon" in overrides:
        pytest.importorskip("dp_accounting")
    cfg = cfg_for(**overrides)
    flower = run_flower(cfg, FakeGrid(cfg.clients, node_seed=3))
    # in-process in the order a Flower node trains (one client each); lock step agrees to float rounding only
    world = None if "domains" in overrides else small_world  # the run's own domains: built from its config
    local = Federation(cfg.replace(parallel_clients=1), clip=tiny_clip, dataset=world, log=lambda m: None).run()
    assert len(flower.rounds) == len(local.rounds)
    for f, r in zip(flower.rounds, local.rounds, strict=True):
        for key in (
            "round",
            "client_acc",
            "mean_acc",
            "sampled",
            "experts",
            "dropped",
            "client_attention",
            "client_split_acc",
        ):
            assert getattr(f, key) == getattr(r, key), key
        for key in ("bytes_down", "bytes_up", "client_bytes_down", "client_bytes_up"):
            assert getattr(f, key) == getattr(r, key), key
        assert f.num_failed == f.num_rejected == f.num_eval_failed == 0
    assert torch.equal(flower.server.global_prompt, local.federation.server.global_prompt)
    assert sorted(flower.server.pool) == sorted(local.federation.server.pool)
    for cid, prompt in flower.server.pool.items():
        assert torch.equal(prompt, local.federation.server.pool[cid])
    if cfg.client_dropout:
        assert any(r.dropped for r in flower.rounds)  # the dropout stream was exercised
    if cfg.dp_epsilon is not None:
        assert [r.dp_epsilon_spent for r in flower.rounds] == [r.dp_epsilon_spent for r in local.rounds]
    assert flower.server.extras.keys() == local.federation.server.extras.keys()
    for name, value in flower.server.extras.items():  # a shared gate, aggregated alike
        assert torch.equal(value, local.federation.server.extras[name]), name


def test_node_ids_and_their_order_do_not_change_the_run():
    """Sampling and expert selection work on partition ids: other random node ids give the same run."""
    cfg = cfg_for(frac=0.5, rounds=3)
    a = run_flower(cfg, FakeGrid(cfg.clients, node_seed=1))
    b = run_flower(cfg, FakeGrid(cfg.clients, node_seed=99))
    assert [r.sampled for r in a.rounds] == [r.sampled for r in b.rounds]
    assert [r.client_acc for r in a.rounds] == [r.client_acc for r in b.rounds]
    assert [r.experts for r in a.rounds] == [r.experts for r in b.rounds]


# ---------------------------------------------------------------------------------------------- messages
def test_each_node_gets_its_own_record_and_the_gate_stays_home(tiny_clip):
    cfg = cfg_for(rounds=2, experts=2)
    grid = FakeGrid(cfg.clients, node_seed=5)
    strategy = PFedMoAPStrategy(cfg, log=lambda m: None)
    history = strategy.run(grid)
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    round2 = [m for m in train if m.metadata.group_id == "2"]
    assert len(round2) == cfg.clients
    # a fresh record per node: no two messages share a RecordDict, an ArrayRecord or an Array
    for attr in (lambda m: m.content, lambda m: m.content["payload"], lambda m: m.content["payload"]["expert-prompts"]):
        assert len({id(attr(m)) for m in round2}) == len(round2)
    # each node received exactly its own K experts, as the round's record says
    experts = history.rounds[1].experts
    for msg in round2:
        pid = grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
        assert msg.content["config"]["partition-id"] == pid
        assert list(msg.content["config"]["expert-ids"]) == experts[pid]
        assert pid not in experts[pid]
        assert msg.content["payload"]["expert-prompts"].shape == (2, 16, tiny_clip.width)
    # replies carry the prompt and counts only; the gate lives in the node's context.state
    for reply in grid.replies:
        if reply.metadata.message_type != "train":
            continue
        assert set(reply.content.keys()) <= {"metrics", "upload", "notes"}
        assert set(reply.content["notes"].keys()) == {"state", "problems"}  # where the node's state came from
        assert list(reply.content["upload"].keys()) == ["prompt"]
        assert reply.content["upload"]["prompt"].shape == (16, tiny_clip.width)
    # no array that crossed the grid, either way, is (a piece of) any node's gate
    records = [r for m in grid.sent + grid.replies for r in m.content.array_records.values()]
    crossed = [a.numpy() for r in records for a in r.values()]
    for context in grid.contexts.values():
        gate = context.state[STATE_GATE].to_torch_state_dict()
        assert len(gate) == 8  # W_Q, W_K, W_V, W_O: weights and biases
        for tensor in gate.values():
            assert not any(a.shape == tuple(tensor.shape) and np.array_equal(a, tensor.numpy()) for a in crossed)


def test_client_state_lives_in_context_state():
    """Each message rebuilds the partition's Client from its node's context.state (the process-wide world
    is shared by all nodes of an actor). Wiping one node's state after round 1 makes only that node start
    over: its round-2 upload changes, every other upload is bit-identical to an untouched run."""
    cfg = cfg_for(rounds=2, experts=2)
    reference = run_flower(cfg, FakeGrid(cfg.clients, node_seed=2))
    grid = FakeGrid(cfg.clients, node_seed=2)
    strategy = PFedMoAPStrategy(cfg, log=lambda m: None)
    strategy.connect(grid)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=1, timeout=60)
    node = grid.node_of(1)
    assert STATE_GATE not in grid.contexts[node].state  # round 1: no experts yet, so no gate
    grid.contexts[node].state = RecordDict()
    strategy.start(grid, strategy.initial_arrays(), num_rounds=1, timeout=60)
    assert all(STATE_GATE in c.state for c in grid.contexts.values())
    assert strategy.rounds[-1].experts == reference.rounds[-1].experts
    for pid in (0, 2, 3):
        assert torch.equal(strategy.server.pool[pid], reference.server.pool[pid])
    assert not torch.equal(strategy.server.pool[1], reference.server.pool[1])


# ---------------------------------------------------------------------------------------------- faults
def test_failing_nan_and_silent_nodes_leave_the_pool_alone(tmp_path):
    """Round 2: partition 1's node raises (in training and evaluation), partition 2's uploads NaNs, partition
    3's never answers its training message. The round completes; the pool keeps their round-1 prompts; P_g is
    the average of the one good upload; the round's metrics count and name them; the mean accuracy is over the
    nodes that were evaluated."""
    cfg = cfg_for(rounds=3, experts=2)
    grid = FakeGrid(cfg.clients, node_seed=4)
    run_dir = RunDir.create(tmp_path / "run")
    strategy = PFedMoAPStrategy(cfg, run_dir=run_dir, log=lambda m: None)
    strategy.connect(grid)
    strategy.start(grid, strategy.initial_arrays(), num_rounds=1, timeout=60)
    before = {k: v.clone() for k, v in strategy.server.pool.items()}
    nan = Array(np.full((16, 64), np.nan, dtype=np.float32))
    grid.train_tamper = {1: fails, 2: uploads(nan), 3: silent}
    grid.eval_tamper = {1: fails}
    strategy.start(grid, strategy.initial_arrays(), num_rounds=1, timeout=60)
    rec = strategy.rounds[-1]
    pool = strategy.server.pool
    assert sorted(pool) == [0, 1, 2, 3]
    for pid in (1, 2, 3):
        assert torch.equal(pool[pid], before[pid])
    assert not torch.equal(pool[0], before[0])
    assert torch.equal(strategy.server.global_prompt, pool[0])  # FedAvg over the single accepted upload
    assert rec.num_failed == 2 and rec.num_rejected == 1
    failed = rec.failed
    assert "injected failure" in failed[1] and "timeout" in failed[3]
    assert rec.rejected_uploads == [(2, "non-finite values")]
    assert rec.eval_failed == {1: "node error: RuntimeError: injected failure"}
    accs = rec.client_acc
    assert np.isnan(accs[1]) and rec.mean_acc == pytest.approx(np.mean([accs[0], accs[2], accs[3]]))
    # the next round goes on normally and uses the pool as it stands
    grid.train_tamper, grid.eval_tamper = {}, {}
    strategy.start(grid, strategy.initial_arrays(), num_rounds=1, timeout=60)
    assert strategy.rounds[-1].num_failed == strategy.rounds[-1].num_rejected == 0
    lines = read_metrics(run_dir.path)
    assert [line["num_failed"] for line in lines] == [0, 2, 0]
    assert [line["num_rejected"] for line in lines] == [0, 1, 0]


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (Array(np.zeros((3, 3), np.float32)), "shape (3, 3) != (16, 64)"),
        (Array(np.zeros((16, 64), np.int32)), "dtype torch.int32 != wire dtype torch.float32"),
        (Array(np.zeros((16, 64), np.float64)), "dtype torch.float64 != wire dtype torch.float32"),
        (Array(np.full((16, 64), np.inf, np.float32)), "non-finite values"),
        (Array("float32", (16, 64), "numpy.ndarray", b"not numpy"), "unreadable array (ValueError)"),
    ],
    ids=["shape", "int", "float64", "inf", "garbage"],
)
def test_upload_checks(array, reason):
    cfg = cfg_for(rounds=1)
    grid = FakeGrid(cfg.clients, node_seed=6)
    grid.train_tamper = {0: uploads(array)}
    history = run_flower(cfg, grid)
    rec = history.rounds[0]
    assert rec.rejected_uploads == [(0, reason)]
    assert 0 not in history.server.pool and sorted(history.server.pool) == [1, 2, 3]


def test_partition_without_a_node_counts_as_failed():
    """Nodes hold partitions 0, 1, 2 and an out-of-range 9: partition 3 has no node. The run still goes on."""
    cfg = cfg_for(rounds=2)
    logs = []
    grid = FakeGrid(cfg.clients, node_seed=8, partitions=[0, 1, 2, 9])
    history = PFedMoAPStrategy(cfg, log=logs.append).run(grid)
    assert any("partition-id=9 is outside 0..3" in line for line in logs)
    for rec in history.rounds:
        assert rec.failed == {3: "no node holds this partition"}
        assert list(rec.eval_failed) == [3]
        assert np.isnan(rec.client_acc[3]) and all(np.isfinite(rec.client_acc[:3]))
    assert sorted(history.server.pool) == [0, 1, 2]


def _server_context() -> Context:
    return Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_run_directory_has_the_in_process_files_and_keys(tmp_path, tiny_clip, small_world):
    """Through the ServerApp itself: the run directory has the in-process files, keys and numbers."""
    cfg = cfg_for(rounds=2)
    results = []
    app = make_server_app(cfg, FlowerOptions(out=str(tmp_path / "flower")), results, log=lambda m: None)
    app(FakeGrid(cfg.clients, node_seed=1), _server_context())
    (flower,) = results
    local = Federation(cfg.replace(parallel_clients=1), clip=tiny_clip, dataset=small_world, log=lambda m: None)
    local.run(RunDir.create(tmp_path / "local"))
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "flower" / name).is_file()
    f_lines, l_lines = read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "local")
    assert set(l_lines[0]) <= set(f_lines[0])
    assert {"failed", "num_failed", "num_rejected", "eval_failed"} <= set(f_lines[0])
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["final_mean_acc"] == local.rounds[-1].mean_acc and summary["engine"] == "flower"
    meta = json.loads((tmp_path / "flower" / "config.json").read_text())["_meta"]
    assert meta["engine"] == "flower" and meta["client_train_sizes"] == [c.data.num_train for c in local.clients]
    assert flower.run_dir == tmp_path / "flower"


def test_a_run_whose_nodes_cannot_start_says_why_and_writes_nothing(tmp_path):
    cfg = cfg_for(dataset="cifar10", data_root=str(tmp_path / "nodata"), domains=None)
    app = make_server_app(cfg, FlowerOptions(out=str(tmp_path / "run")), [], log=lambda m: None)
    with pytest.raises(UserError, match=r"^no node is ready for the run: (ConfigError: )?dataset=cifar10: not found"):
        app(FakeGrid(cfg.clients, node_seed=1), _server_context())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- config
def test_run_config_maps_to_config():
    cfg, opts = config_from_run_config(
        {
            "preset": "synthetic",
            "config-json": '{"domains": ["faded"], "max_prompt_norm": 5.0}',
            "rounds": 3,
            "local-epochs": 2,
            "lambda": 0.0,
            "seed": "",  # "" keeps the preset's value
            "out": "runs/x",
            "round-timeout": 30.0,
            "connect-timeout": 5.0,
        }
    )
    assert (cfg.rounds, cfg.local_epochs, cfg.lam, cfg.seed, cfg.max_prompt_norm) == (3, 2, 0.0, 1, 5.0)
    assert (opts.out, opts.round_timeout, opts.connect_timeout) == ("runs/x", 30.0, 5.0)
    with pytest.raises(ConfigError, match="'nonsense' is not a pfedmoap config field"):
        config_from_run_config({"nonsense": 1})
    with pytest.raises(ConfigError, match="rounds=0"):
        config_from_run_config({"rounds": 0})


def test_pyproject_run_config_defaults_build_the_default_config():
    import tomllib

    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "pfedmoap.flower.server_app:app",
        "clientapp": "pfedmoap.flower.client_app:app",
    }
    cfg, opts = config_from_run_config(app["config"])
    assert cfg.preset == "synthetic" and cfg.rounds == 10 and opts.out is None


def test_pyproject_is_a_valid_flower_app():
    """Flower's own validator accepts pyproject.toml as it is (a literal [project].version included) and imports
    both components, so `flwr run .` works from the repo root."""
    import tomllib
    from flwr.common.config import validate_config

    import pfedmoap

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["version"] == pfedmoap.__version__
    valid, errors, _ = validate_config(config, check_module=True, project_dir=ROOT)
    assert valid, errors


def test_live_pool_view_is_refused():
    with pytest.raises(ConfigError, match="pool_view='live'"):
        PFedMoAPStrategy(cfg_for(pool_view="live"))


# ---------------------------------------------------------------------------------------------- optional extra
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_core_library_never_imports_flwr():
    code = (
        "import sys\n"
        "import pfedmoap, pfedmoap.train, pfedmoap.engine.federation, pfedmoap.experiments\n"
        "from pfedmoap import make_config, run\n"
        "assert 'flwr' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flwr'))\n"
        "sys.modules['flwr'] = None\n"  # and with flwr blocked outright, the core still works
        "run(make_config('synthetic', pretrained='none', rounds=1, local_epochs=1, clients=2, experts=1,\n"
        "    train_per_class=4, test_per_class=2, shots=2, d_gate=32, progress=False), log=lambda m: None)\n"
        "try:\n"
        "    import pfedmoap.flower\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert "pip install 'pfedmoap[flower]'" in done.stdout


def test_engine_flower_without_flwr_says_how_to_install():
    code = (
        "import sys\n"
        "sys.modules['flwr'] = None\n"
        "from pfedmoap.train import main\n"
        "sys.exit(main(['--engine', 'flower', '--rounds', '1']))\n"
    )
    done = _python(code)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pfedmoap.train: error: --engine flower needs Flower: pip install 'pfedmoap[flower]'"
    ]


# ---------------------------------------------------------------------------------------------- node worlds
def test_a_node_builds_only_its_own_partition(tiny_clip, monkeypatch):
    """A node encodes its own partition's images and nobody else's; a second partition served by the same process
    shares the model and dataset and encodes only its own."""
    from pfedmoap.flower.node import node_for
    from pfedmoap.flower.run_config import config_json

    monkeypatch.setattr(
        "pfedmoap.engine.world.load_clip", lambda *a, **k: tiny_clip
    )  # one instance, to count its calls
    cfg = cfg_for(clients=4, rounds=1)
    encoded = []
    encode = tiny_clip.encode_images
    monkeypatch.setattr(tiny_clip, "encode_images", lambda x: encoded.append(len(x)) or encode(x))
    node = node_for(config_json(cfg), {"partition-id": 2})
    assert node.world.built == [] and encoded == []  # nothing encoded until the node is asked about its client
    data = node.world.client_data(2)
    assert node.world.built == [2]
    split = node.world.splits[2]
    assert sum(encoded) == len(split.train) + len(split.test) == data.num_train + data.num_test
    again = node_for(config_json(cfg), {"partition-id": 1})
    assert again is node  # same run, same process: one world
    node.world.client_data(1)
    assert node.world.built == [1, 2]
    assert sum(encoded) == sum(len(node.world.splits[c].train) + len(node.world.splits[c].test) for c in (1, 2))


@pytest.mark.parametrize(
    ("overrides", "train", "evaluate"),
    [
        # full participation, evaluated with its own prompt and experts: one message per node per round
        ({}, [4, 4, 4], [0, 0, 0]),
        # half the clients per round: the never-trained ones are evaluated with the new P_g (a message each); a
        # trained client that sits out keeps its accuracy
        ({"frac": 0.5, "rounds": 4}, [2, 2, 2, 2], None),
        ({"method": "local"}, [4, 4, 4], [0, 0, 0]),
        # evaluated with the aggregate: every node, every round
        ({"method": "promptfl"}, [4, 4, 4], [4, 4, 4]),
        ({"method": "fedotp", "frac": 0.5}, [2, 2, 2], [4, 4, 4]),
        # one exchange per batch: a client's 80 train images (10 classes x 8 shots) are 5 batches of 16
        ({"method": "dpfpl", "dpfpl_rank": 2, "batch_size": 16, "frac": 0.5}, [10, 10, 10], [4, 4, 4]),
    ],
    ids=["pfedmoap", "pfedmoap-half", "local", "promptfl", "fedotp-half", "dpfpl-half"],
)
def test_evaluations_ride_on_train_replies_where_that_is_exact(overrides, train, evaluate):
    """The messages a round sends: a client whose evaluation does not read the round's aggregate is evaluated by its
    node right after training (on the train reply); evaluate messages go only to the rest. The numbers are the
    in-process ones either way (test_same_numbers_as_in_process)."""
    cfg = cfg_for(**overrides)
    grid = FakeGrid(cfg.clients, node_seed=5)
    history = run_flower(cfg, grid)
    count = {kind: [0] * cfg.rounds for kind in ("train", "evaluate")}
    for msg in grid.sent:
        if msg.metadata.message_type in count:
            count[msg.metadata.message_type][int(msg.metadata.group_id) - 1] += 1
    assert count["train"] == train
    if evaluate is None:  # pFedMoAP at half participation: exactly the clients that never trained yet
        trained: set[int] = set()
        expected = []
        for record in history.rounds:
            trained |= set(record.sampled)
            expected.append(cfg.clients - len(trained))
        assert count["evaluate"] == expected and expected[0] == 2
    else:
        assert count["evaluate"] == evaluate
    assert all(r.num_eval_failed == 0 and len(r.client_acc) == cfg.clients for r in history.rounds)


def test_a_restarted_node_is_asked_for_its_evaluation_again():
    """A kept evaluation belongs to the node state it was made of: when another node takes a partition over (a
    restarted SuperNode), that partition gets an evaluate message again."""
    cfg = cfg_for(rounds=2, frac=0.5)
    grid = FakeGrid(cfg.clients, node_seed=5)
    strategy = PFedMoAPStrategy(cfg, log=lambda m: None)
    strategy.connect(grid)
    strategy._kept = {pid: None for pid in range(cfg.clients)}  # as if every partition's evaluation were kept
    old = grid.node_of(1)
    grid.contexts[old + 1] = grid.contexts.pop(old)  # partition 1's node comes back under a new id
    strategy.admit_new_nodes(grid)
    assert set(strategy._kept) == {0, 2, 3}


def _set_array(name: str, value) -> Callable[[Message], None]:
    def change(msg: Message) -> None:
        msg.content["payload"][name] = Array(np.asarray(value))

    return change


def _set_config(key: str, value) -> Callable[[Message], None]:
    def change(msg: Message) -> None:
        msg.content["config"][key] = value

    return change


@pytest.mark.parametrize(
    ("kind", "change", "reason"),
    [
        ("train", _set_array("global-prompt", np.full((16, 64), np.nan, np.float32)), "non-finite values"),
        ("train", _set_array("expert-prompts", np.zeros((3, 3), np.float32)), "expert-prompts has shape (3, 3)"),
        ("train", _set_array("global-prompt", np.zeros((16, 64), np.float64)), "global-prompt is torch.float64"),
        ("train", _set_array("gate.q_proj.weight", np.zeros((2, 2), np.float32)), "unexpected tensors"),
        ("train", _set_config("run-token", "f" * 32), "another run token"),
        ("train", _set_config("expert-ids", [0, 0]), "expert ids [0, 0]"),
        ("train", _set_config("wire-dtype", "float16"), "wire dtype 'float16'"),
        ("evaluate", _set_array("global-prompt", np.full((16, 64), np.inf, np.float32)), "non-finite values"),
        ("evaluate", _set_array("global-prompt", np.zeros((4, 64), np.float32)), "not this run's float32 global"),
    ],
    ids=["nan", "shape", "dtype", "extra", "token", "ids", "wire", "eval-inf", "eval-shape"],
)
def test_a_node_refuses_a_download_that_is_not_what_the_method_sends(kind, change, reason, caplog):
    """Forged or damaged downloads (a different run token, shapes, dtypes, non-finite values, extra tensors) are
    refused by the node in one log line before it touches the client's state; the server counts it failed."""
    # pFedMoAP's evaluations ride on its train replies: PromptFL's nodes get evaluate messages
    cfg = cfg_for(rounds=1) if kind == "train" else cfg_for(rounds=1, method="promptfl")
    grid = FakeGrid(cfg.clients, node_seed=3)
    grid.request_tamper[(kind, 1)] = change
    with caplog.at_level("WARNING", logger="pfedmoap"):
        history = run_flower(cfg, grid)
    said = [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("partition 1 refused a message: ") and reason in said[0], said
    record = history.rounds[0]
    failed = record.failed if kind == "train" else record.eval_failed
    assert 1 in failed and reason in failed[1], failed
    if kind == "train":
        assert 1 not in history.server.pool  # its upload never came
        state = grid.contexts[grid.node_of(1)].state  # it was evaluated untrained (an evaluate message) ...
        meta = json.loads(str(state["pfedmoap.meta"]["json"]))
        assert meta["rounds_trained"] == 0 and "prompt" not in state["pfedmoap.client"]  # ... and never trained
    assert all(pid not in record.failed and pid not in record.eval_failed for pid in (0, 2, 3))
