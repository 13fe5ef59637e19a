"""Where a deployed round's time goes: fedmeta deployed on real SuperLink / SuperNode processes (127.0.0.1),
under both SuperNode isolation modes, against a no-op ClientApp in the same deployment and mode (Flower's
own floor) and against the same experiment in simulation, in one invocation.

The experiment is the deployment tests' config: 3 SuperNodes, cross-silo LocalMOML (exact meta-gradient,
personalized memories on disk under each node's ``memory-dir``), Fashion-MNIST Dirichlet split, 60 training
samples per client, no evaluation. Per mode, one deployment runs, interleaved, ``--repeats`` times the no-op
app (``bench/noop_app``: the ServerApp sends every node fedmeta's model size, the ClientApp, which imports only
flwr, echoes it) and fedmeta, ``--rounds`` rounds each. A run's steady round is the median of its rounds
2..R (round 1 includes each node's first data load); printed per mode: the median over repeats of the steady
round of fedmeta and of the no-op app and their ratio, then the simulated steady round (Flower's Ray engine,
same config) and deployed / simulated. Rows go to ``bench/results/bench_deploy.json``.

    .venv/bin/python bench/bench_deploy.py [--rounds 6] [--repeats 2] [--modes subprocess,process] [--flwr-bin DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fedmeta.provenance import provenance
from fedmeta.simulations import deploy
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.deploy import LocalDeployment

BENCH = Path(__file__).resolve().parent
NOOP_APP = BENCH / "noop_app"
CONFIG = {"algorithm": "local-moml", "dataset": "fashion-mnist", "partition": "dirichlet", "train-per-client": 60,
          "test-per-client": 20, "meta-gradient": "exact", "evaluate-every": 0, "clients-per-round": 0}


def steady(round_seconds: dict) -> float:
    """Median seconds of rounds 2..R."""
    values = [v for r, v in round_seconds.items() if int(r) >= 2]
    return statistics.median(values)


def run_noop(dep: LocalDeployment, rounds: int, out: Path) -> dict:
    argv = deploy.flwr_run_command(NOOP_APP, {"num-rounds": rounds, "num-nodes": dep.nodes, "out": str(out)}, bin_dir=dep.bin_dir)
    proc = subprocess.run(argv, env={**deploy.clean_environ(), **dep.cli_env()}, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"the no-op run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default=",".join(deploy.ISOLATIONS))
    p.add_argument("--flwr-bin", default=None, help="a venv's bin/ with another flwr (e.g. build/flwr139/bin for gRPC)")
    p.add_argument("--json", type=Path, default=BENCH / "results" / "bench_deploy.json")
    args = p.parse_args()
    started = time.time()
    cfg = {**CONFIG, "num-rounds": args.rounds}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="fedmeta-bench-deploy-"))
    for mode in args.modes.split(","):
        fed, noop = [], []
        with LocalDeployment(3, workdir=work / mode, memory=True, isolation=mode, flwr_bin=args.flwr_bin) as dep:
            for k in range(args.repeats):
                noop.append(steady(run_noop(dep, args.rounds, work / mode / f"noop-{k}.json")["round_seconds"]))
                fed.append(steady(dep.run({**cfg, "results-dir": str(work / mode / f"fedmeta-{k}")}, timeout=1800)["round_seconds"]))
                print(f"{mode} repeat {k + 1}: fedmeta {fed[-1]:.2f} s/round, no-op {noop[-1]:.2f} s/round", flush=True)
            version, transport = dep.version, dep.transport.name
        rows.append({"mode": mode, "flwr": version, "transport": transport, "fedmeta_s": statistics.median(fed),
                     "noop_s": statistics.median(noop), "fedmeta_repeats": fed, "noop_repeats": noop})
    from fedmeta.simulations.run import simulate

    sim_cfg = ExperimentConfig.from_mapping({**deploy.app_config(), **cfg, "num-clients": 3, "results-dir": str(work / "sim"),
                                             "checkpoint": False})
    t0 = time.perf_counter()
    sim = steady(simulate(sim_cfg, progress=False)["round_seconds"])
    print(f"simulated (Ray, 3 nodes): {sim:.3f} s/round ({time.perf_counter() - t0:.0f} s with start-up)")
    print(f"\n{'mode':<11} {'flwr':>7} {'fedmeta s/round':>16} {'no-op s/round':>14} {'fedmeta / no-op':>16} {'deployed / simulated':>21}")
    for r in rows:
        r["simulated_s"] = sim
        print(f"{r['mode']:<11} {r['flwr']:>7} {r['fedmeta_s']:>16.2f} {r['noop_s']:>14.2f} {r['fedmeta_s'] / r['noop_s']:>15.2f}x "
              f"{r['fedmeta_s'] / sim:>20.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "repeats": args.repeats,
                                     "load_before": os.getloadavg()[0], "rows": rows,
                                     "provenance": provenance(vars(args), started=started)}, indent=1))


if __name__ == "__main__":
    main()
