"""A deployment node's own disk and process: client state saved under ``state-dir`` (a restarted SuperNode rejoins
with its gate), the long-lived node worker (answers equal the in-process ones), and a ClientApp that imports no
torch (a SuperNode starts one process per message)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_flower_strategy import FakeGrid, _task_identity, cfg_for  # noqa: F401 (the autouse fixture)

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from pfedmoap.flower.messages import STATE_GATE  # noqa: E402
from pfedmoap.flower.node_state import KEEP, NodeStateStore, message_tag  # noqa: E402
from pfedmoap.flower.node_worker import socket_path, uses_worker  # noqa: E402
from pfedmoap.flower.strategy import PFedMoAPStrategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "ab" * 16


def _state(value: float) -> RecordDict:
    import numpy as np
    from flwr.app import Array

    return RecordDict(
        {
            "pfedmoap.meta": ConfigRecord({"json": json.dumps({"cid": 1, "value": value})}),
            "pfedmoap.client": ArrayRecord({"prompt": Array(np.full((2, 3), value, dtype=np.float32))}),
            "other.record": ConfigRecord({"kept": "out of the file"}),
        }
    )


def _value(state: RecordDict) -> float:
    return json.loads(str(state["pfedmoap.meta"]["json"]))["value"]


# ---------------------------------------------------------------------------------------------- the state files
def test_state_store_loads_the_newest_state_before_a_message(tmp_path):
    store = NodeStateStore(tmp_path, TOKEN, pid=1)
    tags = [message_tag(1, "train"), message_tag(1, "evaluate"), message_tag(2, "train"), message_tag(2, "evaluate")]
    assert tags == sorted(tags)  # train before evaluate, round by round
    for i, tag in enumerate(tags):
        store.save(_state(float(i)), tag)
    assert len(list((tmp_path / TOKEN).glob("*.state"))) == KEEP  # the oldest is pruned
    loaded = store.load_before(message_tag(3, "train"))
    assert loaded.tag == tags[-1] and _value(loaded.state) == 3.0 and not loaded.problems
    assert "other.record" not in loaded.state  # only the client's records are saved
    # a resumed server redoing round 2: the state the round started from, not what it left
    loaded = store.load_before(message_tag(2, "train"))
    assert loaded.tag == tags[1] and _value(loaded.state) == 1.0
    assert NodeStateStore(tmp_path, TOKEN, pid=0).load_before((9, 0)).state is None  # another partition's files
    assert NodeStateStore(tmp_path, "cd" * 16, pid=1).load_before((9, 0)).state is None  # another run's folder


def test_state_store_keeps_a_rounds_exchanges_and_the_state_before_it(tmp_path):
    """DP-FPL sends several train messages per round: each exchange's state sorts after the one before and before
    the round's evaluation; every state of the newest round is kept, and the one the round started from."""
    store = NodeStateStore(tmp_path, TOKEN, pid=1)
    tags = [message_tag(1, "train"), message_tag(1, "evaluate"), message_tag(2, "train")]
    tags += [message_tag(2, "train", e) for e in (1, 2, 3)] + [message_tag(2, "evaluate")]
    assert tags == sorted(tags) and tags[3] == (2, 0, 1) and message_tag(2, "train", 0) == (2, 0)
    for i, tag in enumerate(tags):
        store.save(_state(float(i)), tag)
    names = {p.name for p in (tmp_path / TOKEN).glob("*.state")}
    assert names == {f"partition-1.{n}.state" for n in ("1-1", "2-0", "2-0.1", "2-0.2", "2-0.3", "2-1")}
    assert store.load_before(message_tag(2, "train", 2)).tag == (2, 0, 1)
    assert _value(store.load_before(message_tag(2, "evaluate")).state) == 5.0  # the last exchange's
    assert store.load_before(message_tag(2, "train")).tag == (1, 1)  # a resumed server redoing round 2
    assert store.load_before(message_tag(3, "train")).tag == (2, 1)


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:-3] + bytes(3), "checksum"),
        (lambda b: b"garbage" + b, "not JSON"),
        (lambda b: b.replace(TOKEN.encode(), ("ef" * 16).encode(), 1), "another run"),
    ],
)
def test_state_store_skips_a_bad_file_and_says_why(tmp_path, damage, said):
    store = NodeStateStore(tmp_path, TOKEN, pid=1)
    store.save(_state(1.0), (1, 0))
    newest = store.save(_state(2.0), (1, 1))
    newest.write_bytes(damage(newest.read_bytes()))
    loaded = store.load_before((2, 0))
    assert loaded.tag == (1, 0) and _value(loaded.state) == 1.0  # the next older state
    assert len(loaded.problems) == 1 and said in loaded.problems[0] and newest.name in loaded.problems[0]


def test_state_store_refuses_a_token_that_is_not_hex(tmp_path):
    with pytest.raises(ValueError, match="not a hex string"):
        NodeStateStore(tmp_path, "../../etc", pid=0)


# ---------------------------------------------------------------------------------------------- a restarted node
def _restart_after_round(grid: FakeGrid, pid: int, after: int) -> None:
    """At round ``after + 1``'s training, the node of ``pid`` goes down (that round's messages to it get no
    reply) and comes back as a new node (new id, empty ``context.state``), as a restarted SuperNode does."""
    send = grid.send_and_receive
    done = {"restarted": False}

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == "train"]
        if train and int(train[0].content["config"]["round"]) == after + 1 and not done["restarted"]:
            done["restarted"] = True
            old = grid.node_of(pid)
            config = dict(grid.contexts.pop(old).node_config)
            grid.contexts[old + 1] = Context(
                run_id=7, node_id=old + 1, node_config=config, state=RecordDict(), run_config={}
            )
        # the strategy addresses this round's messages before it sees the new node: the old id gets nothing
        return send([m for m in messages if m.metadata.dst_node_id in grid.contexts], timeout=timeout)

    grid.send_and_receive = send_and_receive


def _grid(cfg, state_root: Path | None, worker: bool = False) -> FakeGrid:
    grid = FakeGrid(cfg.clients, node_seed=3)
    for context in grid.contexts.values():
        if state_root is not None:
            pid = context.node_config["partition-id"]
            context.node_config["state-dir"] = str(state_root / f"node-{pid}")
            context.node_config["worker"] = worker
    return grid


def _accs(records):
    return [[None if a != a else a for a in r.client_acc] for r in records]  # NaN (evaluation failed) as None


def test_a_restarted_node_rejoins_with_its_gate_from_disk(tmp_path):
    cfg = cfg_for(rounds=3)
    reference = PFedMoAPStrategy(cfg, log=lambda m: None).run(_grid(cfg, None))

    said: list[str] = []
    grid = _grid(cfg, tmp_path / "nodes")
    _restart_after_round(grid, pid=2, after=1)
    strategy = PFedMoAPStrategy(cfg, log=said.append)
    history = strategy.run(grid)
    # round 2: partition 2's message went to a node id that no longer exists; from round 3 its new node serves it
    assert [r.failed.keys() for r in history.rounds][1] == {2}
    assert any("rejoins as partition 2" in line for line in said)
    assert any("partition 2 restored its client state from its node's disk (round 1)" in line for line in said)
    assert STATE_GATE in grid.contexts[grid.node_of(2)].state
    # the gate and prompt came back: round 3 of partition 2 equals a run where the node missed round 2 but kept
    # its memory (the same failure, injected without a restart)
    kept = _grid(cfg, None)
    send = kept.send_and_receive

    def missed(m):  # partition 2's round-2 messages never arrive; the node keeps its memory
        return m.metadata.dst_node_id == kept.node_of(2) and m.content["config"].get("round") == 2

    kept.send_and_receive = lambda messages, timeout=None: send([m for m in messages if not missed(m)], timeout=timeout)
    expected = PFedMoAPStrategy(cfg, log=lambda m: None).run(kept)
    assert _accs(history.rounds) == _accs(expected.rounds)
    assert all(history.server.pool[c].equal(expected.server.pool[c]) for c in range(cfg.clients))
    assert _accs(history.rounds)[0] == _accs(reference.rounds)[0]

    # without a state folder the restarted node starts fresh, and the server says so: the test can tell
    said.clear()
    bare = _grid(cfg, None)
    _restart_after_round(bare, pid=2, after=1)
    fresh = PFedMoAPStrategy(cfg, log=said.append).run(bare)
    assert any("partition 2 lost its client state" in line for line in said)
    assert not fresh.server.pool[2].equal(expected.server.pool[2])


def test_a_node_state_file_that_does_not_load_is_said_and_the_node_goes_on(tmp_path):
    cfg = cfg_for(rounds=3)
    said: list[str] = []
    grid = _grid(cfg, tmp_path / "nodes")
    _restart_after_round(grid, pid=2, after=1)
    strategy = PFedMoAPStrategy(cfg, log=said.append)
    real_send = grid.send_and_receive

    def corrupt_then_send(messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            if int(messages[0].content["config"]["round"]) == 3:
                for path in (tmp_path / "nodes" / "node-2").rglob("*.state"):
                    path.write_bytes(path.read_bytes()[:40])  # every saved state of partition 2, truncated
        return real_send(messages, timeout=timeout)

    grid.send_and_receive = corrupt_then_send
    history = strategy.run(grid)
    assert len(history.rounds) == 3 and history.rounds[-1].failed == {}
    assert any("partition 2: a saved node state was not used" in line and "truncated" in line for line in said)
    assert any("partition 2 lost its client state" in line for line in said)


# ---------------------------------------------------------------------------------------------- the node worker
def test_worker_switch():
    assert not uses_worker({"partition-id": 0})
    assert uses_worker({"state-dir": "/x"})
    assert not uses_worker({"state-dir": "/x", "worker": "false"})
    assert not uses_worker({"state-dir": "/x", "worker": False})
    with pytest.raises(ValueError, match="worker='maybe' is not a boolean"):
        uses_worker({"state-dir": "/x", "worker": "maybe"})


def test_client_app_imports_without_torch():
    code = "import sys, pfedmoap.flower.client_app; print([m for m in ('torch', 'open_clip') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_name_of_the_lazy_packages_loads():
    import pfedmoap
    import pfedmoap.flower

    for package in (pfedmoap, pfedmoap.flower):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        assert set(package.__all__) <= set(dir(package))
        with pytest.raises(AttributeError, match="has no attribute 'nope'"):
            package.nope  # noqa: B018


def test_node_workers_answer_as_the_clientapp_does(tmp_path):
    """Two nodes whose ClientApp hands every message to its worker process: the run equals the in-process one,
    each node started one worker and reused it, and removing the socket ends the worker."""
    cfg = cfg_for(clients=2, experts=1, rounds=2)
    inline = PFedMoAPStrategy(cfg, log=lambda m: None).run(_grid(cfg, tmp_path / "inline", worker=False))
    grid = _grid(cfg, tmp_path / "worker", worker=True)
    try:
        forwarded = PFedMoAPStrategy(cfg, log=lambda m: None).run(grid)
        assert _accs(forwarded.rounds) == _accs(inline.rounds)
        assert [r.client_attention for r in forwarded.rounds] == [r.client_attention for r in inline.rounds]
        assert forwarded.server.global_prompt.equal(inline.server.global_prompt)
        for pid in range(2):
            log = (tmp_path / "worker" / f"node-{pid}" / "worker.log").read_text()
            assert log.count("listening on") == 1  # one worker per node, kept for every message
            # the handshake, then one train message per round (the evaluation rides on its reply)
            assert log.count("answered a") == 1 + 2, log
    finally:
        for pid in range(2):
            socket_path(tmp_path / "worker" / f"node-{pid}").unlink(missing_ok=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logs = [(tmp_path / "worker" / f"node-{p}" / "worker.log").read_text() for p in range(2)]
        if all("exits" in log for log in logs):
            break
        time.sleep(0.1)
    assert all("exits" in log for log in logs), logs


def test_a_worker_error_reaches_the_server_as_a_node_error(tmp_path):
    cfg = cfg_for(clients=2, experts=1, rounds=1)
    grid = _grid(cfg, tmp_path / "nodes", worker=True)
    node = grid.node_of(1)
    grid.contexts[node].node_config["partition-id"] = 5  # out of range for 2 clients: the worker refuses it
    said: list[str] = []
    try:
        strategy = PFedMoAPStrategy(cfg, log=said.append)
        strategy.connect(grid)
    finally:
        for pid in (0, 1):
            socket_path(tmp_path / "nodes" / f"node-{pid}").unlink(missing_ok=True)
    assert strategy.node_of.keys() == {0}
    assert any("failed the handshake" in line and "partition-id=5 is outside 0..1" in line for line in said)
    assert os.path.isfile(tmp_path / "nodes" / "node-1" / "worker.log")


# ---------------------------------------------------------------------------------------------- server resume
class _ServerDied(Exception):
    pass


def test_a_resumed_flower_server_equals_an_uninterrupted_run(tmp_path):
    """The server dies after the nodes trained round 3 (its checkpoint is round 2's); a new server process resumes
    from the run directory with nodes that have new ids and empty memories: every round equals the uninterrupted
    run's, since each node starts round 3 from its state of the end of round 2 on its disk, not from the round-3
    state it saved before the server died."""
    from pfedmoap.engine import checkpoint
    from pfedmoap.engine.rundir import RunDir, read_metrics

    cfg = cfg_for(rounds=4)
    whole_dir = RunDir.create(tmp_path / "whole")
    whole = PFedMoAPStrategy(cfg, run_dir=whole_dir, log=lambda m: None).run(_grid(cfg, tmp_path / "n1"))

    first = _grid(cfg, tmp_path / "n2")
    send = first.send_and_receive

    def dies_in_round_3(messages, *, timeout=None):
        messages = list(messages)
        replies = send(messages, timeout=timeout)
        if any(m.metadata.message_type == "train" and m.content["config"]["round"] == 3 for m in messages):
            raise _ServerDied  # the nodes trained round 3 and saved it; the server never aggregated it
        return replies

    first.send_and_receive = dies_in_round_3
    run_dir = RunDir.create(tmp_path / "resumed")
    with pytest.raises(_ServerDied):
        PFedMoAPStrategy(cfg, run_dir=run_dir, log=lambda m: None).run(first)
    assert len(read_metrics(run_dir.path)) == 2

    second = FakeGrid(cfg.clients, node_seed=11)  # a new Flower run: new node ids, empty context.state
    for context in second.contexts.values():
        context.node_config["state-dir"] = str(tmp_path / "n2" / f"node-{context.node_config['partition-id']}")
        context.node_config["worker"] = False
    said: list[str] = []
    resumed = PFedMoAPStrategy(cfg, run_dir=RunDir(run_dir.path), log=said.append)
    resumed.load_state_dict(checkpoint.load(checkpoint.checkpoint_path(run_dir.path)))
    history = resumed.run(second, resumed=True)
    assert [r.round for r in history.rounds] == [1, 2, 3, 4]
    assert any("restored its client state from its node's disk (round 2)" in line for line in said)
    assert _accs(history.rounds) == _accs(whole.rounds)
    assert [r.experts for r in history.rounds] == [r.experts for r in whole.rounds]
    assert all(history.server.pool[c].equal(whole.server.pool[c]) for c in range(cfg.clients))
    assert history.server.global_prompt.equal(whole.server.global_prompt)
    assert [r["client_acc"] for r in read_metrics(run_dir.path)] == [
        r["client_acc"] for r in read_metrics(whole_dir.path)
    ]


def test_resume_refuses_a_run_of_the_other_engine(tmp_path):
    from pfedmoap.engine.rundir import RunDir

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flower_run = RunDir.create(tmp_path / "flower")
    flower_run.write_config({**cfg_for().to_dict(), "_meta": {"engine": "flower"}})
    local_run = RunDir.create(tmp_path / "local")
    local_run.write_config({**cfg_for().to_dict(), "_meta": {}})
    for path, flags, made in ((flower_run.path, [], "flower"), (local_run.path, ["--engine", "flower"], "local")):
        done = subprocess.run(
            [sys.executable, "-m", "pfedmoap.train", "--resume", str(path), *flags],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and f"was made with --engine {made}; resume it with --engine {made}" in lines[0]
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in flower_run.path.iterdir()) == ["checkpoints", "config.json"]  # nothing written
