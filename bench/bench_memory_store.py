"""Where multi-client nodes should keep their LocalMOML memories on a Ray cluster: the cost per round of
three stores, measured through Flower's own actor (``ClientAppActor.run``, the call Flower's Ray backend
makes for every message) in one invocation, for 1,000 and 10,000 clients.

- ``files``: fedmeta's memory-mapped :class:`~fedmeta.clients.memory.MemoryBank` on a directory every host
  sees (what fedmeta does; here a local disk, so the figure excludes a network file system's latency).
  Each message opens the node's bank, reads the sampled clients' rows and writes them back, as the
  ClientApp does.
- ``context``: one ArrayRecord per hosted client in ``context.state``. Flower ships the node's Context
  to the actor with every message and back with the reply, so every message carries the memories of
  all the node's clients, sampled or not.
- ``actor``: a Ray actor per node holding the memories (Ray's object store moves the sampled rows).
  They live only as long as the cluster.
- ``none``: the same messages with no memory at all: Flower's and Ray's floor.

A round samples ``--per-round`` clients (seeded), split over ``--nodes`` multi-client nodes (blocks of
clients, as fedmeta hosts them); the nodes' messages run in parallel on one actor each, as Flower's
pool runs them. Every client has a memory before the first timed round (the steady state of a long
``keep`` run). The memory is the default model's (``mlp-40-40``, 33,450 float32: 134 kB a client).
Printed per store and size: milliseconds per round (median of ``--rounds`` after one warm-up round),
the extra over ``none``, and the peak summed RSS of the measuring process and its Ray processes (each
store and size runs in a fresh process with its own Ray).

    .venv/bin/python bench/bench_memory_store.py [--clients 1000,10000] [--per-round 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedmeta.memory_bank import MemoryBank, bank_path
from fedmeta.stored_params import param_spec
from fedmeta.provenance import provenance
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.processes import descendants

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cluster import PeakMemory  # noqa: E402

STORES = ("none", "files", "context", "actor")


def hosted(node: int, nodes: int, clients: int) -> list[int]:
    """Block ``node`` of ``nodes`` over ``clients`` (as fedmeta's multi-client nodes host them)."""
    return list(range(node * clients // nodes, (node + 1) * clients // nodes))


def touch(u: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stands in for training: a new u of the same shapes."""
    return {k: v + 1e-3 for k, v in u.items()}


def client_app_fn(store: str, spec, root: str):
    """The ClientApp every message runs: load the sampled clients' u from ``store``, write a new u back."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        cfg = msg.content["config"]
        ids, node, nodes, clients, rnd = (list(cfg["ids"]), int(cfg["node"]), int(cfg["nodes"]), int(cfg["clients"]),
                                          int(cfg["round"]))
        if store == "files":
            bank = MemoryBank(bank_path(Path(root), "bench", node, nodes), hosted(node, nodes, clients), spec, sync=False)
            u, _ = bank.load(ids, torch.device("cpu"))
            bank.save(ids, touch(u), rnd)
        elif store == "context":
            for i in ids:
                u = context.state[f"u-{i}"].to_torch_state_dict()
                context.state[f"u-{i}"] = ArrayRecord(touch(u))
        elif store == "actor":
            import ray

            holder = ray.get_actor(f"bench-memory-{node}")
            rows = ray.get(holder.get.remote(ids))
            ray.get(holder.put.remote(ids, [{k: v.numpy() for k, v in touch({k: torch.from_numpy(a) for k, a in r.items()}).items()}
                                            for r in rows]))
        return Message(RecordDict({"metrics": ConfigRecord({"n": len(ids)})}), reply_to=msg)

    return lambda: app


def _holder_class():
    import ray

    @ray.remote(num_cpus=0)
    class MemoryHolder:
        """The memories of one node's clients in a Ray actor."""

        def __init__(self) -> None:
            self.rows: dict[int, dict[str, np.ndarray]] = {}

        def get(self, ids):
            return [self.rows[i] for i in ids]

        def put(self, ids, rows) -> None:
            self.rows.update(zip(ids, rows))

    return MemoryHolder


def measure(store: str, clients: int, per_round: int, nodes: int, rounds: int, root: Path) -> dict:
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # the ServerApp's identity, to create messages

    model = ExperimentConfig().build_model()
    u0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = param_spec(u0)
    contexts, holders = [], []
    with PeakMemory(lambda: descendants(os.getpid())) as peak:
        for node in range(nodes):
            ids = hosted(node, nodes, clients)
            state = RecordDict()
            if store == "context":
                for i in ids:
                    state[f"u-{i}"] = ArrayRecord(u0)
            elif store == "files":
                bank = MemoryBank(bank_path(root, "bench", node, nodes), ids, spec, sync=False)
                for a in range(0, len(ids), 500):
                    chunk = ids[a:a + 500]
                    bank.save(chunk, {k: v.expand(len(chunk), *v.shape).clone() for k, v in u0.items()}, 0)
            elif store == "actor":
                h = _holder_class().options(name=f"bench-memory-{node}").remote()
                ray.get(h.put.remote(ids, [{k: v.numpy() for k, v in u0.items()}] * len(ids)))
                holders.append(h)
            contexts.append(Context(run_id=1, node_id=node + 1, node_config={"partition-id": node, "num-partitions": nodes},
                                    state=state, run_config={}))
        actors = [ClientAppActor.options(num_cpus=1).remote() for _ in range(nodes)]
        app_fn = client_app_fn(store, spec, str(root))
        rng = np.random.default_rng(0)
        seconds = []
        for rnd in range(1, rounds + 2):
            sampled = np.sort(rng.choice(clients, size=per_round, replace=False))
            t0 = time.perf_counter()
            calls = {}
            for node in range(nodes):
                block = hosted(node, nodes, clients)
                ids = [int(i) for i in sampled if block[0] <= i <= block[-1]]
                if not ids:
                    continue
                cfg = ConfigRecord({"ids": ids, "node": node, "nodes": nodes, "clients": clients, "round": rnd})
                msg = Message(RecordDict({"config": cfg}), dst_node_id=node + 1, message_type="train")
                calls[node] = actors[node].run.remote(app_fn, msg, str(node), contexts[node])
            for node, ref in calls.items():
                _, _, contexts[node] = ray.get(ref)  # Flower keeps the context the actor returns
            if rnd > 1:
                seconds.append(time.perf_counter() - t0)
        for a in [*actors, *holders]:
            ray.kill(a)
    return {"store": store, "clients": clients, "ms_per_round": 1e3 * statistics.median(seconds), "peak_rss_gb": peak.peak / 2**30}


def one(store: str, clients: int, args) -> dict:
    """One store at one size, in a fresh process with its own Ray (so that peak memory is this store's)."""
    import ray

    ray.init(num_cpus=args.nodes, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="fedmeta-bench-memory-") as root:
            return measure(store, clients, args.per_round, args.nodes, args.rounds, Path(root))
    finally:
        ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1000,10000")
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stores", default=",".join(STORES))
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # store,clients: measure one, print its row as JSON
    args = p.parse_args()
    if args.one:
        store, clients = args.one.split(",")
        print(json.dumps(one(store, int(clients), args)))
        return

    rows, started = [], time.time()
    print(f"{args.per_round} clients per round over {args.nodes} multi-client nodes; median of {args.rounds} rounds; "
          "each store in a fresh process")
    print(f"{'clients':>8} {'store':>8} {'ms/round':>9} {'over none':>10} {'peak RSS GB':>12}")
    for clients in [int(c) for c in args.clients.split(",")]:
        floor = None
        for store in args.stores.split(","):
            argv = [sys.executable, __file__, "--one", f"{store},{clients}", "--per-round", str(args.per_round),
                    "--nodes", str(args.nodes), "--rounds", str(args.rounds)]
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            floor = r["ms_per_round"] if store == "none" else floor
            r["over_none_ms"] = r["ms_per_round"] - floor if floor is not None else float("nan")
            rows.append(r)
            print(f"{clients:>8} {store:>8} {r['ms_per_round']:>9.1f} {r['over_none_ms']:>+10.1f} {r['peak_rss_gb']:>12.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "provenance": provenance(vars(args), started=started)}, indent=1))


if __name__ == "__main__":
    main()
