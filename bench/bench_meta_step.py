"""Benchmark: the cost of one client meta-step, and what Flower's Ray engine adds on top of it.

Measured in one run, on the CPU:

1. **One client meta-step** (``fedmeta.meta.per_fedavg_step`` and ``local_moml_step``) on the
   default model (MLP 784-40-40-10 ReLU) with K=5 real Fashion-MNIST samples per batch from one
   client of the Fallah split, for each Hessian mode, with ``torch.set_num_threads(1)`` (one
   Ray worker with ``num_cpus=1``). Timing follows ``shared/perf-anchors.md``: warm-up calls,
   then several repeats, each looping enough calls to last at least 50 ms; min and median per
   call are reported. The four variants are timed interleaved, repeat by repeat, so that the
   exact / first-order ratio is not skewed by the VM's slow drifts.
2. **One LocalMOML round end to end**: ``simulate(cfg)`` with n=50 clients cross-silo, H=4, K=5,
   exact Hessian and no evaluation, against the same per-round work as a bare in-process loop
   (50 x ``MetaClient.train`` plus the uniform average, single-threaded). Round 1
   includes Ray start-up and the memory initialisation, so both report the median of the steady
   rounds 2..R.

The table goes to stdout and the figures to ``bench/results/bench_meta_step.json``.

Usage::

    .venv/bin/python bench/bench_meta_step.py [--quick]
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import flwr
import torch

import timing  # bench/timing.py (the script's folder is on sys.path)
from timing import bench_interleaved  # bench/timing.py (the script's folder is on sys.path)
from fedmeta import config as C
from fedmeta import meta
from fedmeta.clients.client import MetaClient, round_generator
from fedmeta.config import LocalMOMLConfig
from fedmeta.data import ClientData, partitions
from fedmeta.meta import Params
from fedmeta.simulations.apps import build_strategy, initial_model
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.run import simulate

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_meta_step.json"
ALGORITHMS = (C.PER_FEDAVG, C.LOCAL_MOML)
MODES = ("exact", "first_order")


@dataclass(frozen=True)
class Budget:
    """How long the benchmark may run."""

    warmup: int
    """Untimed calls of each meta-step variant before timing."""
    repeats: int
    """Timed repeats of each meta-step variant."""
    min_repeat_seconds: float
    """Each repeat loops enough calls to last at least this long."""
    sim_rounds: int
    """Rounds of the ``simulate`` run (round 1 includes Ray start-up)."""
    bare_rounds: int
    """Rounds of the bare in-process loop (round 1 initialises the memories)."""


FULL = Budget(warmup=3, repeats=7, min_repeat_seconds=0.05, sim_rounds=4, bare_rounds=8)
QUICK = Budget(warmup=1, repeats=3, min_repeat_seconds=0.05, sim_rounds=2, bare_rounds=2)


# --------------------------------------------------------------------------- part 1: one meta-step


def meta_step_calls(cfg: ExperimentConfig, data: ClientData) -> dict[tuple[str, str], Callable[[], object]]:
    """One client meta-step per ``(algorithm, hessian mode)``, as argument-free calls.

    The meta-model is ``cfg``'s initial model; the batches ``(D, D', D'')`` = ``(S1, S2, S3)`` are
    three K-sample batches of ``data``, drawn once, so every call does identical work. The
    hyper-parameters are those the strategies send for ``cfg`` (their values do not change the cost).

    Parameters
    ----------
    cfg
        Model, batch size K, seed and hyper-parameters.
    data
        The client whose training data the batches come from.

    Returns
    -------
    dict[tuple[str, str], Callable[[], object]]
        ``(algorithm, mode) -> call`` for every algorithm in :data:`ALGORITHMS` and mode in :data:`MODES`.
    """
    model = initial_model(cfg)
    f = meta.make_loss(model, cfg.criterion)
    w = meta.params_of(model)
    gen = round_generator(cfg.seed, 0, 1, 0)
    s0 = data.sample(cfg.init_batch_size, gen)
    b0, b1, b2 = (data.sample(cfg.batch_size, gen) for _ in range(3))
    pf_batches = meta.MetaBatches(inner=(b0,), outer=b1, hessian=(b2,))  # Per-FedAvg's D, D', D''
    lm_batches = meta.MetaBatches(inner=(b0,), hessian=(b1,), outer=b2)  # LocalMOML's S1, S2, S3
    pf = build_strategy(cfg.replace(algorithm=C.PER_FEDAVG)).hparams
    lm = build_strategy(cfg.replace(algorithm=C.LOCAL_MOML)).hparams
    u = meta.local_moml_init_memory(f, w, [s0], lm.inner_lr)

    def per_fedavg(hessian: meta.HessianCorrection) -> Callable[[], object]:
        return lambda: meta.per_fedavg_step(f, w, pf_batches, pf.inner_lr, pf.meta_lr, hessian)

    def local_moml(hessian: meta.HessianCorrection) -> Callable[[], object]:
        return lambda: meta.local_moml_step(f, w, u, lm_batches, lm.inner_lr, lm.lr, lm.momentum, hessian)

    step = {C.PER_FEDAVG: per_fedavg, C.LOCAL_MOML: local_moml}
    return {(alg, mode): step[alg](meta.meta_gradient(mode)) for alg in ALGORITHMS for mode in MODES}


# --------------------------------------------------------------------------- part 2: one round


def bare_loop_round_seconds(cfg: ExperimentConfig, hp: LocalMOMLConfig, num_rounds: int) -> list[float]:
    """Wall time of each of ``num_rounds`` LocalMOML rounds run in-process, single-threaded.

    Each round does what a cross-silo round of ``simulate(cfg)`` computes, without Flower: every
    client runs :meth:`MetaClient.train` from the current meta-model with the memory it
    kept from its last round (``None`` in round 1) and the ClientApp's batch generator, then the
    returned meta-models are averaged uniformly.

    Parameters
    ----------
    cfg
        The experiment (clients, data split, seed, initial model).
    hp
        The client hyper-parameters the LocalMOML strategy sends for ``cfg``.
    num_rounds
        Rounds to run.

    Returns
    -------
    list[float]
        Seconds of rounds ``1..num_rounds``.
    """
    model = initial_model(cfg)
    client_parts = partitions(cfg.dataset, **cfg.data_kwargs())
    # One module serves every client: its parameter values are never read (functional_call).
    clients = [MetaClient(model, cfg.criterion, data, torch.device("cpu")) for data in client_parts]
    w = meta.params_of(model)
    memories: list[Params | None] = [None] * len(clients)
    seconds = []
    for server_round in range(1, num_rounds + 1):
        t0 = time.perf_counter()
        meta_models = []
        for pid, client in enumerate(clients):
            result = client.train(w, hp, memories[pid], round_generator(cfg.seed, pid, server_round, 0))
            memories[pid] = result.personalized_model
            meta_models.append(result.meta_model)
        w = {k: torch.stack([m[k] for m in meta_models]).mean(0) for k in w}
        seconds.append(time.perf_counter() - t0)
    return seconds


def simulate_round_seconds(cfg: ExperimentConfig) -> tuple[dict[int, float], float]:
    """Run ``simulate(cfg)``; return its per-round seconds and its total wall time.

    Raises
    ------
    RuntimeError
        If a round did not get a valid reply from every client (a faster round would then be
        a wrong one).
    """
    t0 = time.perf_counter()
    results = simulate(cfg, check=False, progress=False)
    total = time.perf_counter() - t0
    per_round = cfg.clients_per_round or cfg.num_clients
    for server_round, metrics in results["train"].items():
        if metrics["num-clients"] != per_round or metrics["num-failures"]:
            raise RuntimeError(f"round {server_round}: {metrics['num-clients']:.0f} of {per_round} clients replied, "
                               f"{metrics['num-failures']:.0f} failed")
    return {int(r): float(s) for r, s in results["round_seconds"].items()}, total


def steady(round_seconds: dict[int, float]) -> dict[str, Any]:
    """Median seconds of rounds 2..R (round 1 pays start-up) and the rounds it covers."""
    rounds = sorted(r for r in round_seconds if r >= 2)
    if not rounds:
        raise ValueError("need at least two rounds to measure a steady round")
    return {"rounds": rounds, "median_s": statistics.median(round_seconds[r] for r in rounds)}


# --------------------------------------------------------------------------- report


def table(report: dict[str, Any]) -> str:
    """The benchmark's figures as a compact plain-text table."""
    env, step, rnd = report["environment"], report["meta_step"], report["round"]
    lines = [
        f"fedmeta meta-step benchmark{' (--quick)' if report['quick'] else ''}: torch {env['torch']}, "
        f"flwr {env['flwr']}, {env['cpu_count']} CPUs",
        "",
        f"1. One client meta-step, ms per call (min / median of {step['repeats']} repeats), "
        f"{step['model']}, K={step['batch_size']}, {step['threads']} thread",
        f"{'algorithm':<12} {'exact':>15} {'first_order':>15} {'exact / first_order':>22}",
    ]
    for alg in ALGORITHMS:
        ms, ratio = step["ms"][alg], step["exact_over_first_order"][alg]
        cells = [f"{ms[m]['min_ms']:.3f} / {ms[m]['median_ms']:.3f}" for m in MODES]
        lines.append(f"{alg:<12} {cells[0]:>15} {cells[1]:>15} {ratio['min']:>11.2f}x / {ratio['median']:.2f}x")
    sim, bare, cfg = rnd["simulate"], rnd["bare_loop"], rnd["config"]
    lines += [
        "",
        f"2. LocalMOML round: n={cfg['num-clients']} cross-silo, H={cfg['local-steps']}, K={cfg['batch-size']}, "
        f"{cfg['meta-gradient']}, no evaluation; median of steady rounds",
        f"{'path':<34} {'rounds':>7} {'s / round':>10} {'client-steps/s':>15}",
    ]
    for name, part in (("bare loop (in-process, 1 thread)", bare), ("simulate() (Flower + Ray)", sim)):
        span = f"{part['steady_rounds'][0]}..{part['steady_rounds'][-1]}"
        lines.append(f"{name:<34} {span:>7} {part['steady_median_s']:>10.3f} {part['client_steps_per_s']:>15.1f}")
    lines += [
        f"end-to-end / bare loop: {rnd['end_to_end_over_bare_loop']:.3f}x",
        f"simulate(): round 1 (incl. Ray start-up) {sim['round_seconds'][1]:.1f} s, "
        f"whole call {sim['total_s']:.1f} s",
    ]
    return "\n".join(lines)


def run(budget: Budget, quick: bool, results_dir: str) -> dict[str, Any]:
    """Measure everything and return the report (see the module docstring)."""
    cfg = ExperimentConfig(
        algorithm=C.LOCAL_MOML,
        num_clients=50,
        clients_per_round=0,
        num_rounds=budget.sim_rounds,
        local_steps=4,
        batch_size=5,
        meta_gradient="exact",
        evaluate_every=0,
        num_nodes=0,
        results_dir=results_dir,
    )
    data = partitions(cfg.dataset, **cfg.data_kwargs())[0]

    calls = meta_step_calls(cfg, data)
    timings = bench_interleaved(
        {f"{alg}/{mode}": fn for (alg, mode), fn in calls.items()},
        warmup=budget.warmup, repeats=budget.repeats, min_repeat_seconds=budget.min_repeat_seconds,
    )
    ms = {alg: {mode: asdict(timings[f"{alg}/{mode}"]) for mode in MODES} for alg in ALGORITHMS}
    ratios = {
        alg: {stat: ms[alg]["exact"][f"{stat}_ms"] / ms[alg]["first_order"][f"{stat}_ms"] for stat in ("min", "median")}
        for alg in ALGORITHMS
    }

    client_steps = cfg.num_clients * cfg.local_steps
    hp = build_strategy(cfg).hparams
    bare_seconds = dict(enumerate(bare_loop_round_seconds(cfg, hp, budget.bare_rounds), start=1))
    bare = steady(bare_seconds)
    sim_seconds, sim_total = simulate_round_seconds(cfg)
    sim = steady(sim_seconds)
    bare_rate, sim_rate = client_steps / bare["median_s"], client_steps / sim["median_s"]

    return {
        "quick": quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "budget": asdict(budget),
        "meta_step": {
            "model": cfg.model_name,
            "batch_size": cfg.batch_size,
            "threads": torch.get_num_threads(),
            "repeats": budget.repeats,
            "ms": ms,
            "exact_over_first_order": ratios,
        },
        "round": {
            "config": {k: v for k, v in cfg.to_dict().items() if k != "results-dir"},
            "memory_policy": hp.memory_policy,
            "client_steps_per_round": client_steps,
            "bare_loop": {
                "round_seconds": bare_seconds,
                "steady_rounds": bare["rounds"],
                "steady_median_s": bare["median_s"],
                "client_steps_per_s": bare_rate,
            },
            "simulate": {
                "round_seconds": sim_seconds,
                "total_s": sim_total,
                "steady_rounds": sim["rounds"],
                "steady_median_s": sim["median_s"],
                "client_steps_per_s": sim_rate,
            },
            "end_to_end_over_bare_loop": sim_rate / bare_rate,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = timing.parser(__doc__, RESULTS_PATH, "fewer repeats and rounds: a smoke test of about a minute").parse_args(argv)
    torch.set_num_threads(1)
    # As simulate() does: build_strategy() would log Flower's "evaluation skipped" warning.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_meta_step-") as results_dir:
        report = run(QUICK if args.quick else FULL, args.quick, results_dir)
    return timing.finish(report, args, started, table)


if __name__ == "__main__":
    raise SystemExit(main())
