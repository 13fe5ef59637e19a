"""A no-op Flower app (bench/bench_deploy.py): each round the ServerApp sends every node a train message
carrying as many float32 parameters as fedmeta's default model, and the ClientApp, which imports only flwr
and numpy, echoes them at once. Its steady round is what Flower itself costs per deployed round in a given
deployment and isolation mode. The ServerApp collects replies with fedmeta's short poll
(``fedmeta.strategies.exchange``), as fedmeta's strategies do, and writes the seconds of each round to
``out`` (JSON)."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmeta.strategies.exchange import exchange

    cfg = context.run_config
    rounds, nodes = int(cfg["num-rounds"]), int(cfg["num-nodes"])
    while len(node_ids := sorted(grid.get_node_ids())) < nodes:
        time.sleep(0.1)
    arrays = ArrayRecord({"w": Array(np.zeros(int(cfg["num-params"]), dtype=np.float32))})
    seconds = {}
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}), dst_node_id=n,
                            message_type=MessageType.TRAIN) for n in node_ids]
        replies = exchange(grid, messages)
        if len(replies) != len(messages) or any(r.has_error() for r in replies):
            raise RuntimeError(f"round {rnd}: {len(replies)} replies of {len(messages)}, errors: "
                               f"{[r.error.reason for r in replies if r.has_error()]}")
        seconds[rnd] = time.perf_counter() - t0
        print(f"noop round {rnd}: {seconds[rnd]:.2f} s", flush=True)
    if cfg["out"]:
        with open(str(cfg["out"]), "w") as fh:
            json.dump({"round_seconds": seconds}, fh)
