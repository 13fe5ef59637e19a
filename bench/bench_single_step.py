"""Benchmark: one client's local step on the torch.func path against the plain-autograd fast path (issue 19).

Measured in one run, single-threaded (``torch.set_num_threads(1)``, one Ray worker's share), on the
default model (MLP 784-40-40-10 ReLU) with K=5 real Fashion-MNIST samples per batch from client 0 of
the Fallah split (the data ``bench_meta_step.py`` uses):

1. **One local step**, for Per-FedAvg and LocalMOML, ``exact`` and ``first_order``, N = 1 and N = 3:
   the algorithm unit's ``step`` (``fedmeta.meta``, ``torch.func``, the loss through
   ``functional_call``: what ``MetaClient.train`` ran before) against its ``fast_step``
   (``fedmeta.fast``, plain autograd, the loss run directly on the parameter dict: what it runs now).
   The batches are drawn once (``Algorithm.draw``), so every call does identical work.
2. **One local round** of ``MetaClient.train`` (H=4 steps, K=5, N=1, LocalMOML with a kept memory),
   ``step_impl="func"`` against the default (``auto``, the fast path): what a SuperNode hosting one
   client computes per round, batch draws and checks included; reported per step (round / H).

All cells are timed interleaved, repeat by repeat, with ``bench/timing.py`` (warm-up, repeats of at
least 50 ms, min and median per call), so the ratios fast / func and exact / first-order are
measured in the same run. Targets (issue 19): exact within 1.8x of first-order on the fast path, and
the fast first-order step at least 1.5x faster than the torch.func one (fast / func <= 0.667).

The table goes to stdout and the figures to ``bench/results/bench_single_step.json``.

Usage::

    .venv/bin/python bench/bench_single_step.py [--quick]
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import timing  # bench/timing.py (the script's folder is on sys.path)
from timing import bench_interleaved  # bench/timing.py (the script's folder is on sys.path)
from fedmeta import algorithms, fast, meta
from fedmeta import config as C
from fedmeta.clients.client import MetaClient, round_generator
from fedmeta.config import LocalMOMLConfig, PerFedAvgConfig
from fedmeta.data import ClientData, client_data
from fedmeta.simulations.apps import initial_model
from fedmeta.simulations.config import ExperimentConfig

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_single_step.json"
ALGORITHMS = (C.PER_FEDAVG, C.LOCAL_MOML)
MODES = ("exact", "first_order")
PATHS = ("func", "fast")
TARGET_EXACT_OVER_FO = 1.8
TARGET_FO_SPEEDUP = 1.5


@dataclass(frozen=True)
class Budget:
    warmup: int
    repeats: int
    min_repeat_seconds: float
    inner_steps: tuple[int, ...]


FULL = Budget(warmup=3, repeats=9, min_repeat_seconds=0.05, inner_steps=(1, 3))
QUICK = Budget(warmup=1, repeats=3, min_repeat_seconds=0.02, inner_steps=(1,))


def hparams(alg: str, mode: str, n: int) -> Any:
    """The clients' default hyper-parameters (the values do not change the cost), N inner steps."""
    if alg == C.PER_FEDAVG:
        return PerFedAvgConfig(meta_gradient=mode, inner_steps=n)
    return LocalMOMLConfig(meta_gradient=mode, inner_steps=n, memory_policy="keep")


def step_calls(cfg: ExperimentConfig, data: ClientData, inner_steps: Sequence[int]) -> dict[str, Callable[[], object]]:
    """``"step/<alg>/<mode>/N<n>/<path>" -> call``: one local step of the algorithm unit on fixed batches."""
    model = initial_model(cfg)
    losses = {"func": meta.make_loss(model, cfg.criterion), "fast": fast.make_loss(model, cfg.criterion)}
    w = meta.params_of(model)
    calls: dict[str, Callable[[], object]] = {}
    for n in inner_steps:
        for alg in ALGORITHMS:
            for mode in MODES:
                hp = hparams(alg, mode, n)
                unit = algorithms.for_config(hp)
                gen = round_generator(cfg.seed, 0, 1, 0)
                sample = lambda k, g=gen: data.sample(k, g)  # noqa: E731
                u = unit.init_state(losses["func"], w, unit.draw_init(sample, hp), hp) if unit.stateful else None
                batches = unit.draw(sample, hp)
                for path in PATHS:
                    take = unit.fast_step if path == "fast" else unit.step
                    f = losses[path]
                    calls[f"step/{alg}/{mode}/N{n}/{path}"] = (
                        lambda take=take, f=f, hp=hp, u=u, batches=batches: take(f, w, u, batches, hp))
    return calls


def round_calls(cfg: ExperimentConfig, data: ClientData) -> dict[str, Callable[[], object]]:
    """``"round/<alg>/<mode>/N1/<path>" -> call``: one ``MetaClient.train`` round (H=4), same generator seed every call."""
    model = initial_model(cfg)
    w = meta.params_of(model)
    clients = {"func": MetaClient(model, cfg.criterion, data, torch.device("cpu"), step_impl="func"),
               "fast": MetaClient(model, cfg.criterion, data, torch.device("cpu"))}
    calls: dict[str, Callable[[], object]] = {}
    for alg in ALGORITHMS:
        for mode in MODES:
            hp = hparams(alg, mode, 1)
            assert clients["fast"].step_impl_for(hp) == "fast" and clients["func"].step_impl_for(hp) == "func"
            u = clients["func"].train(w, hp, None, round_generator(cfg.seed, 0, 1, 0)).personalized_model
            for path in PATHS:
                calls[f"round/{alg}/{mode}/N1/{path}"] = (
                    lambda c=clients[path], hp=hp, u=u: c.train(w, hp, u, round_generator(cfg.seed, 0, 2, 0)))
    return calls


def check_equal(calls: dict[str, Callable[[], object]]) -> float:
    """Largest |fast - func| over every step cell's outputs (the paths must agree before they are timed)."""
    worst = 0.0
    for name, fn in calls.items():
        if not name.endswith("/fast"):
            continue
        a, b = fn(), calls[name[: -len("fast")] + "func"]()
        a = a if isinstance(a, tuple) else (a, None)
        b = b if isinstance(b, tuple) else (b, None)
        for pa, pb in zip(a, b):
            for k in pa or {}:
                worst = max(worst, float((pa[k] - pb[k]).abs().max()))
    return worst


def run(budget: Budget, quick: bool) -> dict[str, Any]:
    cfg = ExperimentConfig(batch_size=5, local_steps=4, num_nodes=0)
    data = client_data(cfg.dataset, 0, **cfg.data_kwargs())
    steps = step_calls(cfg, data, budget.inner_steps)
    rounds = round_calls(cfg, data)
    max_abs_diff = check_equal(steps)
    timings = bench_interleaved({**steps, **rounds}, warmup=budget.warmup, repeats=budget.repeats,
                                min_repeat_seconds=budget.min_repeat_seconds)
    local_steps = hparams(C.PER_FEDAVG, "exact", 1).local_steps
    cells: dict[str, dict[str, float]] = {}
    for name, t in timings.items():
        per = local_steps if name.startswith("round/") else 1
        cells[name] = {"min_ms": t.min_ms / per, "median_ms": t.median_ms / per,
                       "calls_per_repeat": t.calls_per_repeat, "repeats": t.repeats}

    def ratio(a: str, b: str) -> dict[str, float]:
        return {s: cells[a][f"{s}_ms"] / cells[b][f"{s}_ms"] for s in ("min", "median")}

    ratios: dict[str, dict[str, Any]] = {}
    for kind, ns in (("step", budget.inner_steps), ("round", (1,))):
        for n in ns:
            for alg in ALGORITHMS:
                key = f"{kind}/{alg}/N{n}"
                r = {f"fast_over_func/{mode}": ratio(f"{kind}/{alg}/{mode}/N{n}/fast", f"{kind}/{alg}/{mode}/N{n}/func")
                     for mode in MODES}
                r.update({f"exact_over_first_order/{path}":
                          ratio(f"{kind}/{alg}/exact/N{n}/{path}", f"{kind}/{alg}/first_order/N{n}/{path}") for path in PATHS})
                ratios[key] = r
    return {
        "quick": quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
        "setup": {"model": cfg.model_name, "dataset": cfg.dataset, "batch_size": cfg.batch_size, "local_steps": local_steps,
                  "inner_steps": list(budget.inner_steps)},
        "budget": asdict(budget),
        "max_abs_diff_fast_vs_func": max_abs_diff,
        "ms": cells,
        "ratios": ratios,
        "targets": {"exact_over_first_order_fast_max": TARGET_EXACT_OVER_FO,
                    "first_order_fast_over_func_max": 1 / TARGET_FO_SPEEDUP},
    }


def table(report: dict[str, Any]) -> str:
    env, setup, ms, ratios = report["environment"], report["setup"], report["ms"], report["ratios"]
    lines = [
        f"fedmeta single-client step benchmark{' (--quick)' if report['quick'] else ''}: torch {env['torch']}, "
        f"{env['cpu_count']} CPUs, {env['threads']} thread; {setup['model']}, {setup['dataset']}, K={setup['batch_size']}",
        f"fast vs func outputs: max |diff| = {report['max_abs_diff_fast_vs_func']:.3g}",
        "ms per step, min / median of the repeats (round: one MetaClient.train round of H="
        f"{setup['local_steps']} steps, divided by H)",
        "",
        f"{'cell':<24} {'func exact':>15} {'fast exact':>15} {'func FO':>15} {'fast FO':>15} "
        f"{'fast/func ex':>13} {'fast/func FO':>13} {'ex/FO func':>11} {'ex/FO fast':>11}",
    ]
    for key, r in ratios.items():
        kind, alg, n = key.split("/")
        cell = lambda mode, path: ms[f"{kind}/{alg}/{mode}/{n}/{path}"]  # noqa: E731
        fmt = lambda c: f"{c['min_ms']:.3f} / {c['median_ms']:.3f}"  # noqa: E731
        lines.append(
            f"{key:<24} {fmt(cell('exact', 'func')):>15} {fmt(cell('exact', 'fast')):>15} "
            f"{fmt(cell('first_order', 'func')):>15} {fmt(cell('first_order', 'fast')):>15} "
            f"{r['fast_over_func/exact']['min']:>12.2f}x {r['fast_over_func/first_order']['min']:>12.2f}x "
            f"{r['exact_over_first_order/func']['min']:>10.2f}x {r['exact_over_first_order/fast']['min']:>10.2f}x")
    lines += ["", "ratios from the minima; medians in the JSON. Targets: ex/FO fast <= "
              f"{TARGET_EXACT_OVER_FO}x; fast/func FO <= {1 / TARGET_FO_SPEEDUP:.3f}x (>= {TARGET_FO_SPEEDUP}x faster)"]
    for key, r in ratios.items():
        ex_fo = r["exact_over_first_order/fast"]
        speed = r["fast_over_func/first_order"]
        lines.append(
            f"{key:<24} ex/FO fast {ex_fo['min']:.2f}x (median {ex_fo['median']:.2f}x) "
            f"{'met' if ex_fo['min'] <= TARGET_EXACT_OVER_FO else 'MISSED'}; "
            f"FO {1 / speed['min']:.2f}x faster (median {1 / speed['median']:.2f}x) "
            f"{'met' if 1 / speed['min'] >= TARGET_FO_SPEEDUP else 'MISSED'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = timing.parser(__doc__, RESULTS_PATH, "fewer repeats, N=1 only: a smoke test of a few seconds").parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    return timing.finish(run(QUICK if args.quick else FULL, args.quick), args, started, table)


if __name__ == "__main__":
    raise SystemExit(main())
