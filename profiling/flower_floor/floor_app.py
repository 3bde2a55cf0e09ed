"""The no-op Flower App of ``profiling/flower_floor`` (see its pyproject.toml): what a round costs on stock Flower
when the nodes do nothing."""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()


@client.train()
def _train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({"ok": 1})}), reply_to=msg)


@client.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({"ok": 1})}), reply_to=msg)


server = ServerApp()


@server.main()
def _main(grid: Grid, context: Context) -> None:
    from pfedmoap.flower.strategy import PromptGrid  # the 50 ms reply polling pfedmoap's ServerApp uses

    config = context.run_config
    phases, rounds, nodes = int(config["phases"]), int(config["rounds"]), int(config["nodes"])
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.1)
    ids = sorted(grid.get_node_ids())
    fast = PromptGrid(grid)
    seconds = []
    for index in range(1, rounds + 1):
        start = time.perf_counter()
        for kind in (MessageType.TRAIN, MessageType.EVALUATE)[:phases]:
            messages = [
                Message(RecordDict({"c": ConfigRecord({"round": index})}), dst_node_id=node, message_type=kind,
                        group_id=str(index))
                for node in ids
            ]  # fmt: skip
            replies = list(fast.send_and_receive(messages, timeout=120))
            if len(replies) != len(ids) or any(r.has_error() for r in replies):
                raise RuntimeError(f"round {index}: {len(replies)} of {len(ids)} nodes replied without error")
        seconds.append(time.perf_counter() - start)
    with open(str(config["out"]), "w") as f:
        json.dump({"phases": phases, "nodes": len(ids), "seconds": seconds}, f)
