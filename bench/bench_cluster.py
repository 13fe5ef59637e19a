"""One LocalMOML ``keep`` run with multi-client nodes, in-process and attached to a two-raylet Ray cluster
on 127.0.0.1 (:class:`fedmeta.simulations.cluster.LocalCluster`, 1 CPU per raylet), in one invocation:
seconds per round (median of rounds 2..R) and peak resident memory of every process of the run (the
driver plus Ray's processes: its descendants in-process, the cluster's processes when attached; the
in-process runs go first, before the cluster starts), for
1,000 and 10,000 sinewave clients (500 sampled per round by default). The memories live in the shared results directory in both cases.

    .venv/bin/python bench/bench_cluster.py [--rounds 6] [--clients 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fedmeta import config as C
from fedmeta.provenance import provenance
from fedmeta.simulations import cluster
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.processes import descendants


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the summed RSS of this process and ``others()`` every 0.2 s; ``peak`` in bytes."""

    def __init__(self, others) -> None:
        self.others, self.peak, self._stop = others, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pids = {os.getpid(), *self.others()}
            self.peak = max(self.peak, sum(_rss(p) for p in pids))

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def config(clients: int, rounds: int, results: Path, address: str = "", per_round: int = 500) -> ExperimentConfig:
    return ExperimentConfig(algorithm=C.LOCAL_MOML, dataset="sinewave", num_clients=clients, num_nodes=2, clients_per_round=per_round,
                            num_rounds=rounds, local_steps=2, inner_lr=0.001, lr=0.001, momentum=0.5, memory_policy="keep",
                            evaluate_every=0, seed=0, results_dir=str(results), ray_address=address)


def measure(cfg: ExperimentConfig, others) -> dict[str, float]:
    with PeakMemory(others) as mem:
        t0 = time.perf_counter()
        res = sim_run.simulate(cfg, progress=False)
        wall = time.perf_counter() - t0
    assert res["status"] == "ok", res["failure"]
    per_round = [v for r, v in sorted(res["round_seconds"].items(), key=lambda kv: int(kv[0])) if int(r) > 1]
    return {"s_per_round": statistics.median(per_round), "wall_s": wall, "peak_rss_mib": mem.peak / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--clients", default="1000,10000")
    p.add_argument("--per-round", type=int, default=500, help="clients sampled per round")
    args = p.parse_args()
    started = time.time()
    sizes = [int(x) for x in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-") as tmp:  # in-process first, with no cluster running
        here = {n: measure(config(n, args.rounds, Path(tmp) / str(n), per_round=args.per_round), lambda: descendants(os.getpid())) for n in sizes}
    with cluster.LocalCluster(raylets=2, cpus_per_raylet=1, hidden=False) as local:
        there = {n: measure(config(n, args.rounds, local.root / f"cluster-{n}", local.address, args.per_round), local.processes)
                 for n in sizes}
    rows = [{"clients": n, "in_process": here[n], "two_raylets": there[n]} for n in sizes]
    print(f"LocalMOML keep, sinewave, 2 multi-client nodes, {args.per_round} clients per round, H = 2, {args.rounds} rounds; "
          "median of rounds 2..R")
    print("| clients | in-process s/round | 2 raylets s/round | ratio | in-process peak RSS (MiB) | 2 raylets peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["in_process"], r["two_raylets"]
        print(f"| {r['clients']} | {a['s_per_round']:.3f} | {b['s_per_round']:.3f} | {b['s_per_round'] / a['s_per_round']:.2f}x | "
              f"{a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "bench_cluster.json").write_text(json.dumps({"rows": rows, "provenance": provenance(vars(args), started=started)}, indent=1))


if __name__ == "__main__":
    main()
