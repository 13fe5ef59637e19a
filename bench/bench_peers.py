"""Side-by-side peer benchmark (``make bench-peers``): fedmeta against pfl-research, measured in one run.

The workload of issue 21: 20 clients of a pathological 2-class Fashion-MNIST split (2,625 train
samples each), MLP 784-100-10, batch 10, one local epoch per round, every client in every round
(cross-silo), training rounds only (no evaluation).

* **pfl-research** (Apple's simulator, ``pip install pfl[pytorch]``, its own venv under ``build/``,
  sharing the main venv's torch): ``FederatedAveraging`` on fedmeta's split exported to a file, so
  both train on the very same clients (``bench/peers/pfl_fedavg.py``). One local epoch =
  ceil(2625 / 10) = 263 SGD steps per client. pfl at its best process count: a probe runs 1 process x
  1 thread, 1 process x 2 threads and N processes x 1 thread (N = the CPU count; pfl's own distributed
  simulation, the cohort split among the workers by pfl) and the fastest runs the repeats.
* **fedmeta FedAvg**, ``simulate()`` on Flower's Ray engine: (a) multi-client nodes, ``num_nodes=2``
  (one per core), (b) one client per node (20 SuperNodes). ``local_steps = 262`` (2625 // 10) SGD
  steps of batch 10 per client.
* **fedmeta Per-FedAvg first-order**, ``num_nodes=2``, H = 131 meta-steps of K = 10 (one local epoch
  at 20 samples per meta-step, as PFLlib's ``PerAvg``). PFLlib is not on the package registry, so
  it is not run here: its figure (``PFLLIB_FIGURE``) is quoted with its date, and the one ratio to it
  is labelled as against a quoted figure.

Each repeat runs pfl, fedmeta (a), fedmeta (b) and fedmeta Per-FedAvg in turn (interleaved, so the
machine's drifts hit every side alike); each run is a child process (its process tree's CPU and
memory sampled from /proc, no Ray process left behind: ``bench_scale.measured_child``). A run's
rate is client-steps per round / the median of its steady rounds 2..R (round 1 pays start-up). The
ratios fedmeta / pfl are per repeat (the runs next to each other) and their median, both as measured
and per busy core: (rate / busy cores) / (pfl's rate / pfl's busy cores), where busy cores = the CPU
time of the run's whole process tree (pfl's worker processes are children of the measured one) over
its wall time. Also reported: the other processes' load (``/proc/stat``).

Usage::

    .venv/bin/python bench/bench_peers.py [--repeats 3] [--rounds 5] [--smoke] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import timing  # bench/timing.py (the script's folder is on sys.path)
from measure import (  # bench/ is on sys.path
    CLOCK_TICKS, GIB, ChildCpu, LoadMeter, Progress, describe, environment, measured_child, run_child,
)
from fedmeta import config as C
from fedmeta.data import client_data
from fedmeta.simulations.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "bench_peers.json"
PFL_RUNNER = ROOT / "bench" / "peers" / "pfl_fedavg.py"
PFL_REQUIREMENT = "pfl[pytorch]==0.6.0"
PFL_VENV = ROOT / "build" / "pfl060"
PFLLIB_FIGURE = {"client_meta_steps_per_s": 585.0, "date": "2026-12-06", "commit": "d832e76",
                 "source": "PFLlib's PerAvg on this workload, measured side by side with fedmeta on a machine of this "
                           "kind, best of 1 or 2 threads"}
"""PFLlib's Per-FedAvg on this workload: a quoted figure (not measured in this run); the one ratio to it says so."""
SAMPLING = {"interval": 1.0, "pss_every": 0}
"""The runs' process trees are sampled once a second, RSS only: the sampler's own CPU (about 10 % of a core at
bench_scale's 0.2 s with PSS) would otherwise come out of the 2 cores that fedmeta's runs use and pfl's leaves idle."""
TARGETS = {"fedavg_multi_over_pfl": 1.5, "fedavg_single_over_pfl": 1.0, "per_fedavg_steps_per_s": 1100.0,
           "per_fedavg_over_pfllib_quoted": 3.0}
"""FedAvg ratios are against pfl at its best configuration, as measured; the last is against ``PFLLIB_FIGURE``."""
PLAIN_CELLS = ("plain PyTorch, epoch slices", "plain PyTorch, fedmeta draws")
"""``bench_local_round.py``'s plain-PyTorch cells; the first is the reference rate."""
FLOOR_TARGET = 0.5
"""The default node step's fraction of the hand-batched floor, per core, at 10 clients per node."""
END_TO_END_TARGET = 0.7
"""fedmeta FedAvg's end-to-end client-steps/s per busy core over the plain-PyTorch step rate (one core)."""
FEDAVG_RUNS = ("fedavg_multi", "fedavg_single")
"""fedmeta's runs of pfl's algorithm: the ones with a ratio to pfl."""


@dataclass(frozen=True)
class Workload:
    """The sizes of one benchmark run (``FULL`` for ``make bench-peers``, ``SMOKE`` for the test suite)."""

    clients: int
    train_per_client: int
    batch_size: int
    rounds: int
    repeats: int
    probe_rounds: int
    """Rounds of each pfl run of the probe."""
    pfl_workers: int = 0
    """Worker processes of the probe's multi-process pfl configuration (0: one per CPU, ``os.cpu_count()``)."""

    def pfl_configs(self) -> list[tuple[int, int]]:
        """The probe's pfl configurations, (processes, threads each): 1 x 1, 1 x 2 and N x 1 (at most one per client)."""
        n = min(self.pfl_workers or os.cpu_count() or 1, self.clients)
        return list(dict.fromkeys([(1, 1), (1, 2), (n, 1)]))

    @property
    def fedavg_steps(self) -> int:
        """One local epoch of fedmeta's FedAvg: floor(n / batch) batches drawn afresh (pfl: ceil)."""
        return self.train_per_client // self.batch_size

    @property
    def per_fedavg_steps(self) -> int:
        """One local epoch at 2 batches per first-order meta-step (PFLlib's PerAvg)."""
        return self.train_per_client // (2 * self.batch_size)


FULL = Workload(clients=20, train_per_client=2625, batch_size=10, rounds=5, repeats=3, probe_rounds=3)
SMOKE = Workload(clients=4, train_per_client=40, batch_size=10, rounds=2, repeats=1, probe_rounds=2, pfl_workers=2)


def base_config(w: Workload) -> ExperimentConfig:
    """The split and model both sides train: Fashion-MNIST pathological 2-class, MLP 784-100-10."""
    return ExperimentConfig(num_nodes=0, model="mlp-100", dataset="fashion-mnist", partition="pathological", classes_per_client=2,
                            train_per_client=w.train_per_client, test_per_client=10,  # no evaluation: the test split is unused
                            num_clients=w.clients, clients_per_round=0, batch_size=w.batch_size, num_rounds=w.rounds,
                            evaluate_every=0, num_cpus=1.0, lr=0.05)


def fedmeta_configs(w: Workload) -> dict[str, ExperimentConfig]:
    """fedmeta's three runs of one repeat."""
    base = base_config(w)
    fedavg = base.replace(algorithm=C.FEDAVG, local_steps=w.fedavg_steps)
    return {
        "fedavg_multi": fedavg.replace(num_nodes=2),
        "fedavg_single": fedavg.replace(num_nodes=0),
        "per_fedavg_fo": base.replace(algorithm=C.PER_FEDAVG, meta_gradient="first_order", local_steps=w.per_fedavg_steps,
                                      num_nodes=2),
    }


def export_split(cfg: ExperimentConfig, path: Path) -> dict[str, Any]:
    """Write the clients' train splits (flattened float32 images in [0, 1], int64 labels) for the peer."""
    arrays: dict[str, np.ndarray] = {"num_clients": np.array(cfg.num_clients)}
    sizes = []
    for c in range(cfg.num_clients):
        d = client_data(cfg.dataset, c, **cfg.data_kwargs())
        arrays[f"x_{c}"] = d.x_train.reshape(d.num_train, -1).numpy().astype(np.float32)
        arrays[f"y_{c}"] = d.y_train.numpy().astype(np.int64)
        sizes.append(d.num_train)
    np.savez(path, **arrays)
    return {"clients": cfg.num_clients, "train_samples": sizes, "file": str(path)}


def _builder():
    """scripts/build_flwr_venv.py, which builds side venvs that share the main venv's torch."""
    spec = importlib.util.spec_from_file_location("build_flwr_venv", ROOT / "scripts" / "build_flwr_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pfl_venv() -> Path:
    """The pfl-research venv (built on first use, cached by a stamp)."""
    return _builder().build_peer(PFL_REQUIREMENT, PFL_VENV, verify="import pfl, torch; print(pfl.__version__, torch.__version__)")


def config_key(workers: int, threads: int) -> str:
    """``"2x1"``: 2 processes of 1 thread each."""
    return f"{workers}x{threads}"


def pfl_label(run: dict[str, Any]) -> str:
    n, t = run["workers"], run["threads"]
    return f"{n} process{'es' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}"


@dataclass
class PeerRun:
    """One pfl-research run in a child process (and its worker processes)."""

    workers: int
    threads: int
    round_seconds: dict[int, float]
    client_steps_per_round: int
    steady_median_s: float
    client_steps_per_s: float
    wall_s: float
    busy_cores: float
    """CPU of the process tree (all workers) over the run's wall time, start-up included: as fedmeta's runs."""
    steady_busy_cores: float
    """All workers' CPU over rounds 2..R / those rounds' wall time, as pfl_fedavg.py counted it."""
    peak_rss_bytes: int
    others_cores: float
    final_train_loss: float
    worker_pids: list[int]
    users_per_worker: list[int]
    versions: dict[str, str]


def run_pfl(python: Path, split: Path, w: Workload, workers: int, threads: int, rounds: int) -> PeerRun:
    """pfl-research's FederatedAveraging on the exported split (``bench/peers/pfl_fedavg.py``), ``workers`` processes."""
    with tempfile.TemporaryDirectory(prefix="fmb-pfl-") as work:
        out = Path(work) / "out.json"
        cmd = [str(python), str(PFL_RUNNER), "--split", str(split), "--rounds", str(rounds), "--threads", str(threads),
               "--workers", str(workers), "--lr", "0.05", "--batch-size", str(w.batch_size), "--local-epochs", "1",
               "--seed", "0", "--out", str(out)]
        child = measured_child(cmd, work, **SAMPLING)
        if child.returncode != 0 or not out.exists():
            raise RuntimeError(f"pfl-research run failed (exit {child.returncode}):\n{child.log[-4000:]}")
        res = json.loads(out.read_text())
    rounds_s = {int(r): float(s) for r, s in res["round_seconds"].items()}
    if sorted(rounds_s) != list(range(1, rounds + 1)):
        raise RuntimeError(f"pfl-research: expected {rounds} rounds, got {sorted(rounds_s)}")
    if res["workers"] != workers or len(res["worker_pids"]) != workers:
        raise RuntimeError(f"pfl-research: asked for {workers} worker(s), the run reports {res['worker_pids']}")
    return PeerRun(workers=workers, threads=threads, round_seconds=rounds_s,
                   client_steps_per_round=int(res["client_steps_per_round"]), steady_median_s=float(res["steady_median_s"]),
                   client_steps_per_s=float(res["client_steps_per_s"]), wall_s=child.wall_s, busy_cores=child.busy_cores,
                   steady_busy_cores=float(res["steady_busy_cores"]), peak_rss_bytes=child.memory.peak_rss_bytes,
                   others_cores=child.load.others_cores, final_train_loss=float(res["final_train_loss"]),
                   worker_pids=list(res["worker_pids"]), users_per_worker=list(res["users_per_worker"]),
                   versions={"pfl": res["pfl_version"], "torch": res["torch_version"]})


LOSS_RTOL = 1e-3
"""The probe's configurations train the same clients from the same start: their final losses agree to round-off."""


def busy(run: dict[str, Any]) -> float:
    """The run's busy cores in its steady rounds 2..R (its process tree's CPU over their wall time), or over the whole
    run where that was not measured."""
    return run.get("steady_busy_cores") or run["busy_cores"]


def per_core(run: dict[str, Any]) -> float:
    """Client-steps/s per busy core (of the steady rounds)."""
    return run["client_steps_per_s"] / busy(run)


def round_split(sim: dict[str, Any]) -> dict[str, float]:
    """Where a steady round of a fedmeta run goes (medians over rounds 2..R, seconds): the longest node's handler
    (its clients' local rounds, the node's work between receiving and replying) and the rest (Flower, Ray, the
    strategy's aggregation)."""
    rounds = [str(r) for r in sim["steady_rounds"]]
    handler = statistics.median(max(sim["handler_seconds"][r]) for r in rounds)
    round_s = sim["steady_median_s"]
    return {"round_s": round_s, "node_handler_s": handler, "rest_s": round_s - handler,
            "node_share": handler / round_s}


def reference(w: Workload, progress: Callable[[str], None]) -> dict[str, Any]:
    """In this process, one thread: the plain-PyTorch step rate of the workload (``bench_local_round.py``'s plain
    cells) and the floor bench at 10 clients per node (``bench_floor.py --workload peers``)."""
    import torch

    import bench_floor
    import bench_local_round

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        smoke = w == SMOKE
        progress("[reference] plain PyTorch local round, one thread")
        steps = 40 if smoke else w.fedavg_steps
        cells, _ = bench_local_round.calls(clients=1, steps=steps)
        plain = {k: cells[k] for k in PLAIN_CELLS}
        t = timing.bench_interleaved({k: fn for k, (fn, _) in plain.items()}, warmup=1 if smoke else 2,
                                     repeats=2 if smoke else 7, min_repeat_seconds=0.0 if smoke else 0.2)
        rates = {k: n / (t[k].median_ms / 1e3) for k, (_, n) in plain.items()}
        progress("[reference] the hand-batched floor and fedmeta's node step, 10 clients per node, one thread")
        floor = (bench_floor.run(True, [2], only=["FedAvg"]) if smoke  # the plumbing; test_bench runs every floor cell
                 else bench_floor.run(False, [10], workload="peers", fault_calls=3))
    finally:
        torch.set_num_threads(threads)
    return {"plain_client_steps_per_s": rates, "plain_local_steps": steps, "floor": floor}


def run(w: Workload, progress: Callable[[str], None], pfl_python: Path | None = None) -> dict[str, Any]:
    meter, child_ticks = LoadMeter(), ChildCpu.ticks
    configs = fedmeta_configs(w)
    report: dict[str, Any] = {"environment": environment(), "workload": asdict(w), "pfllib_reference": PFLLIB_FIGURE,
                              "targets": TARGETS, "describe": {k: describe(c) for k, c in configs.items()}}
    report["reference"] = reference(w, progress)
    if pfl_python is None:
        progress(f"building / checking the pfl-research venv ({PFL_REQUIREMENT}) in {PFL_VENV}")
        python = pfl_venv() / "bin" / "python"
    else:
        python = pfl_python
    with tempfile.TemporaryDirectory(prefix="bench_peers-") as tmp:
        split = Path(tmp) / "split.npz"
        progress(f"exporting fedmeta's split: {w.clients} clients x {w.train_per_client} train samples")
        report["split"] = export_split(configs["fedavg_multi"], split)
        probe = {}
        for workers, threads in w.pfl_configs():
            progress(f"[pfl] probe: {workers} process(es) x {threads} thread(s), {w.probe_rounds} rounds")
            probe[config_key(workers, threads)] = run_pfl(python, split, w, workers, threads, w.probe_rounds)
        losses = [r.final_train_loss for r in probe.values()]
        if max(losses) - min(losses) > LOSS_RTOL * abs(min(losses)):
            raise RuntimeError(f"pfl-research: the probe's final train losses differ: "
                               f"{ {k: r.final_train_loss for k, r in probe.items()} }")
        best = probe[max(probe, key=lambda k: probe[k].client_steps_per_s)]
        report["pfl_probe"] = {k: asdict(r) for k, r in probe.items()}
        report["pfl_best"] = {"workers": best.workers, "threads": best.threads}
        repeats = []
        for i in range(1, w.repeats + 1):
            rep: dict[str, Any] = {}
            progress(f"[repeat {i}/{w.repeats}] pfl-research FedAvg, {best.workers} process(es) x {best.threads} thread(s)")
            rep["pfl"] = asdict(run_pfl(python, split, w, best.workers, best.threads, w.rounds))
            for key, cfg in configs.items():
                progress(f"[repeat {i}/{w.repeats}] fedmeta {key}: {cfg.num_supernodes} nodes, H={cfg.local_steps}")
                sim = run_child(key, cfg, tmp, **SAMPLING)
                rep[key] = {**asdict(sim), "busy_cores": sim.memory.cpu_ticks / CLOCK_TICKS / sim.child_s}
                rep[key]["split"] = round_split(rep[key])
            rep["ratios"] = {f"{k}_over_pfl": rep[k]["client_steps_per_s"] / rep["pfl"]["client_steps_per_s"]
                             for k in FEDAVG_RUNS}
            rep["ratios_per_core"] = {f"{k}_over_pfl": per_core(rep[k]) / per_core(rep["pfl"]) for k in FEDAVG_RUNS}
            repeats.append(rep)
    report["repeats"] = repeats
    report["medians"] = {
        **{k: statistics.median(r["ratios"][k] for r in repeats) for k in repeats[0]["ratios"]},
        **{f"{k}_steps_per_s": statistics.median(r[k]["client_steps_per_s"] for r in repeats)
           for k in ("pfl", *configs)},
        **{f"{k}_busy_cores": statistics.median(busy(r[k]) for r in repeats) for k in ("pfl", *configs)},
    }
    plain = report["reference"]["plain_client_steps_per_s"][PLAIN_CELLS[0]]
    report["medians"]["fedavg_multi_per_core_over_plain"] = statistics.median(per_core(r["fedavg_multi"]) for r in repeats) / plain
    report["split"] = {k: {part: statistics.median(r[k]["split"][part] for r in repeats) for part in repeats[0][k]["split"]}
                       for k in configs}
    report["medians_per_core"] = {k: statistics.median(r["ratios_per_core"][k] for r in repeats)
                                  for k in repeats[0]["ratios_per_core"]}
    report["medians"]["per_fedavg_over_pfllib_quoted"] = (report["medians"]["per_fedavg_fo_steps_per_s"]
                                                          / PFLLIB_FIGURE["client_meta_steps_per_s"])
    report["load"] = asdict(meter.stop(ChildCpu.ticks - child_ticks))
    return report


def verdicts(report: dict[str, Any]) -> list[str]:
    m, t, ref = report["medians"], report["targets"], report["pfllib_reference"]
    best = pfl_label({"workers": report["pfl_best"]["workers"], "threads": report["pfl_best"]["threads"]})
    rows = [(f"FedAvg, fedmeta num_nodes=2 / pfl-research ({best}), as measured", m["fedavg_multi_over_pfl"],
             t["fedavg_multi_over_pfl"], "x"),
            ("FedAvg, fedmeta one client per node / pfl-research, as measured", m["fedavg_single_over_pfl"],
             t["fedavg_single_over_pfl"], "x"),
            ("Per-FedAvg first-order, fedmeta num_nodes=2, client meta-steps/s", m["per_fedavg_fo_steps_per_s"],
             t["per_fedavg_steps_per_s"], "/s"),
            (f"Per-FedAvg FO / PFLlib (quoted figure, {ref['client_meta_steps_per_s']:.0f}/s on {ref['date']}, not run)",
             m["per_fedavg_over_pfllib_quoted"], t["per_fedavg_over_pfllib_quoted"], "x"),
            ("FedAvg num_nodes=2, client-steps/s per busy core / plain PyTorch step rate (1 core)",
             m["fedavg_multi_per_core_over_plain"], END_TO_END_TARGET, "x")]
    for row in report["reference"]["floor"]["rows"]:
        if row["algorithm"] in ("FedAvg", "Per-FedAvg FO") and row["default_of_floor"] is not None:
            rows.append((f"{row['algorithm']}, {row['clients']} clients per node: default node step ({row['auto']}) / "
                         "hand-batched floor, per core", row["default_of_floor"], FLOOR_TARGET, "x"))
    return [f"  {'PASS' if v >= goal else 'MISS'}  {name:<82} {v:>8.2f}{unit}  (target >= {goal:g}{unit})"
            for name, v, goal, unit in rows]


LABELS = {"fedavg_multi": "fedmeta FedAvg, num_nodes=2", "fedavg_single": "fedmeta FedAvg, one client per node",
          "per_fedavg_fo": "fedmeta Per-FedAvg FO, num_nodes=2"}


def table(report: dict[str, Any]) -> str:
    env, load, w = report["environment"], report["load"], report["workload"]
    best = pfl_label(report["repeats"][0]["pfl"])
    lines = [
        f"fedmeta peer benchmark, {env['date']}",
        f"environment: python {env['python']}, torch {env['torch']}, flwr {env['flwr']}, ray {env['ray']}, "
        f"{env['cpu_count']} CPUs, {env['mem_total_gib']:.1f} GiB; pfl-research {report['repeats'][0]['pfl']['versions']['pfl']}",
        f"machine load: load average {' '.join(env['loadavg_at_start'])} at start; over the run (wall {load['wall_s']:.0f} s) "
        f"the machine was busy {load['machine_busy_cores']:.2f} cores on average, other processes {load['others_cores']:.2f}"
        + ("  << shared machine: timings disturbed" if load["others_cores"] > 0.25 else ""),
        f"workload: {w['clients']} clients x {w['train_per_client']} train samples (Fashion-MNIST pathological 2-class, "
        f"fedmeta's split exported to pfl), MLP 784-100-10, batch {w['batch_size']}, one local epoch per round, "
        f"{w['rounds']} rounds, rate = steps per round / median of rounds 2..R; busy cores = CPU of the run's process tree "
        "over rounds 2..R / their wall time",
        f"pfl-research probe ({w['probe_rounds']} rounds each; client-steps/s, busy cores, final train loss):",
        *(f"  {pfl_label(r):<26} {r['client_steps_per_s']:>6.0f}/s  {r['busy_cores']:.2f} busy ({r['steady_busy_cores']:.2f} "
          f"in rounds 2..R)  loss {r['final_train_loss']:.6f}" for r in report["pfl_probe"].values()),
        f"  -> pfl at its best: {best}",
        "",
        f"  {'repeat':<6} {'run':<44} {'steps/rnd':>9} {'steady s':>8} {'client-steps/s':>14} {'busy cores':>10} "
        f"{'per core':>8} {'RSS GiB':>7} {'others':>6} {'/ pfl':>6} {'per core':>8}",
    ]
    for i, rep in enumerate(report["repeats"], 1):
        for key, label in {"pfl": f"pfl-research FedAvg, {best}", **LABELS}.items():
            r = rep[key]
            rss = r["peak_rss_bytes"] if key == "pfl" else r["memory"]["peak_rss_bytes"]
            others = r["others_cores"] if key == "pfl" else r["load"]["others_cores"]
            ratio, core_ratio = rep["ratios"].get(f"{key}_over_pfl"), rep["ratios_per_core"].get(f"{key}_over_pfl")
            lines.append(f"  {i:<6} {label:<44} {r['client_steps_per_round']:>9} {r['steady_median_s']:>8.3f} "
                         f"{r['client_steps_per_s']:>14.0f} {busy(r):>10.2f} {per_core(r):>8.0f} {rss / GIB:>7.2f} "
                         f"{others:>6.2f} {'' if ratio is None else f'{ratio:.2f}x':>6} "
                         f"{'' if core_ratio is None else f'{core_ratio:.2f}x':>8}")
    ref, mc = report["pfllib_reference"], report["medians_per_core"]
    lines += ["", f"PFLlib (not installable from the package registry, not run here): a quoted figure of "
                  f"{ref['client_meta_steps_per_s']:.0f} client meta-steps/s on {ref['date']} ({ref['source']}; PFLlib "
                  f"commit {ref['commit']}).",
              "", "Targets (medians over the repeats):", *verdicts(report),
              "", "Per busy core, (rate / busy cores) / (pfl's rate / pfl's busy cores), medians (no target):",
              *(f"        {LABELS[k.removesuffix('_over_pfl')] + ' / pfl-research':<82} {v:>8.2f}x" for k, v in mc.items())]
    return "\n".join(lines + reference_lines(report))


def reference_lines(report: dict[str, Any]) -> list[str]:
    """The plain-PyTorch reference, where fedmeta's steady rounds go, and the floor bench's table."""
    import bench_floor

    ref = report["reference"]
    plain = ref["plain_client_steps_per_s"]
    lines = ["", f"Plain PyTorch, one client's local round ({ref['plain_local_steps']} SGD steps), one thread: "
                 + ", ".join(f"{k.removeprefix('plain PyTorch, ')} {v:.0f} client-steps/s" for k, v in plain.items()),
             "", "Where fedmeta's steady rounds go (medians over the repeats; node handler = the longest node's reply "
                 "handler: its clients' local rounds and the node's own work; rest = Flower, Ray and the strategy):",
             f"  {'run':<44} {'round s':>8} {'node handler s':>14} {'rest s':>7} {'handler share':>13}"]
    for key, label in LABELS.items():
        sp = report["split"][key]
        lines.append(f"  {label:<44} {sp['round_s']:>8.3f} {sp['node_handler_s']:>14.3f} {sp['rest_s']:>7.3f} "
                     f"{sp['node_share']:>13.0%}")
    return lines + ["", "The hand-batched floor (bench_floor.py, one thread):", bench_floor.table(ref["floor"])]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help=f"interleaved repeats (default {FULL.repeats})")
    parser.add_argument("--rounds", type=int, help=f"rounds per run, >= 2 (default {FULL.rounds})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that run every part (the test suite's run)")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help=f"where to write the JSON (default: {RESULTS_PATH})")
    parser.add_argument("--pfl-python", type=Path, help="the python of an existing pfl-research venv (default: build and use "
                                                        f"{PFL_VENV.relative_to(ROOT)}), e.g. to run an older fedmeta against it")
    args = parser.parse_args(argv)
    if args.pfl_python is not None and not args.pfl_python.is_file():
        parser.error(f"--pfl-python must be a Python interpreter, got {args.pfl_python} (no such file)")
    w = SMOKE if args.smoke else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be >= 1, got {args.repeats}")
        w = replace(w, repeats=args.repeats)
    if args.rounds is not None:
        if args.rounds < 2:
            parser.error(f"--rounds must be >= 2 (round 1 is warm-up), got {args.rounds}")
        w = replace(w, rounds=args.rounds)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    progress = Progress()
    started = time.time()
    report = run(w, progress, args.pfl_python)
    report["wall_s"] = progress.seconds()
    report["smoke"], report["quick"] = args.smoke, not args.smoke and w != FULL  # only a full run enters the docs
    return timing.finish(report, args, started, lambda r: table(r) + f"\n\ntotal wall time {r['wall_s']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
