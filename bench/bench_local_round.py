"""Benchmark: where one client's local round spends its time, against a plain PyTorch loop (issue 21).

The peer workload of ``bench_peers.py``: MLP 784-100-10, batch 10, real Fashion-MNIST client 0 of the
pathological 2-class split (2,625 train samples), one local epoch. Single-threaded
(``torch.set_num_threads(1)``: one Ray worker's share). Every cell is one client's whole local round,
timed interleaved with ``bench/timing.py``, reported per client-step:

* **plain PyTorch** (the reference): ``nn.Module`` + ``torch.optim.SGD``, ``zero_grad`` / ``backward`` /
  ``step`` on consecutive slices of a once-shuffled epoch (what pfl-research runs), and the same with
  fedmeta's per-step batch draws (``ClientData.sample``: a fresh batch without replacement per step).
* **FedAvg** (262 SGD steps), the changes of issue 21 one at a time, each a real configuration:
  ``func, check/step`` (the ``torch.func`` step and a finiteness check after every step: the round of
  a one-client node before), ``func`` (one check per round), ``fast, pure`` (plain autograd,
  :func:`fedmeta.fast.gradient` and the pure ``meta.axpy`` update, new tensors each step), ``fast`` (plain autograd updating the round's
  own copy in place: :func:`fedmeta.algorithms.executor.local_round` now).
* **Per-FedAvg first-order** (131 meta-steps of K=10): ``func`` and ``fast`` (now).
* **A node's 10 clients**: :func:`~fedmeta.algorithms.executor.local_rounds` vmapped (chunk 10) against
  the loop (each client on the fast path), per client-step.

Usage::

    .venv/bin/python bench/bench_local_round.py [--quick] [--out PATH]
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import timing  # bench/timing.py (the script's folder is on sys.path)
from timing import bench_interleaved  # bench/timing.py (the script's folder is on sys.path)
from measure import environment
from fedmeta import algorithms, fast, meta
from fedmeta import config as C
from fedmeta.algorithms import FedAvgConfig, PerFedAvgConfig
from fedmeta.algorithms.executor import check_finite, local_round, local_rounds
from fedmeta.clients.client import round_generator
from fedmeta.data import client_data
from fedmeta.simulations.apps import initial_model
from fedmeta.simulations.config import ExperimentConfig

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_local_round.json"
CFG = ExperimentConfig(num_nodes=0, model="mlp-100", dataset="fashion-mnist", partition="pathological", classes_per_client=2,
                       train_per_client=2625, test_per_client=500, num_clients=20, batch_size=10, lr=0.05)


def calls(clients: int, steps: int) -> tuple[dict[str, tuple[Callable[[], object], int]], Any]:
    """name -> (one call, client-steps per call)."""
    model = initial_model(CFG)
    datas = [client_data(CFG.dataset, c, **CFG.data_kwargs()) for c in range(clients)]
    d = datas[0]
    f_func, f_fast = meta.make_loss(model, CFG.criterion), fast.make_loss(model, CFG.criterion)
    w = meta.params_of(model)
    fedavg = FedAvgConfig(lr=0.05, local_steps=steps, batch_size=CFG.batch_size)
    fo = PerFedAvgConfig(inner_lr=0.05, meta_lr=0.05, local_steps=steps // 2, batch_size=CFG.batch_size,
                         meta_gradient="first_order")
    unit = algorithms.get(C.FEDAVG)

    def sampler(c: int = 0) -> Callable:
        return functools.partial(datas[c].sample, generator=round_generator(0, c, 2, 0))

    def plain(sampled: bool) -> Callable[[], object]:
        def call() -> None:
            m = initial_model(CFG)
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            perm = torch.randperm(d.num_train)
            x, y = d.x_train[perm], d.y_train[perm]
            draw = sampler()
            for s in range(steps):
                xb, yb = draw(CFG.batch_size) if sampled else (x[s * 10:(s + 1) * 10], y[s * 10:(s + 1) * 10])
                opt.zero_grad()
                CFG.criterion(m(xb), yb).backward()
                opt.step()
        return call

    def checked_every_step() -> None:  # the one-client round before issue 21: torch.func step, check after each
        wk, draw = {k: v.detach() for k, v in w.items()}, sampler()
        for s in range(1, steps + 1):
            wk, _ = unit.step(f_func, wk, None, unit.draw(draw, fedavg), fedavg)
            wk = {k: v.detach() for k, v in wk.items()}
            check_finite(s, model=wk)

    def pure_fast() -> None:
        wk, draw = w, sampler()
        for _ in range(steps):
            wk = meta.axpy(-fedavg.lr, fast.gradient(f_fast, wk, unit.draw(draw, fedavg)[0]), wk)  # new tensors each step
        check_finite(steps, model=wk)

    def group(vectorize: str) -> Callable[[], object]:
        def call() -> object:
            gens = [round_generator(0, c, 2, 0) for c in range(clients)]
            samplers = [functools.partial(dd.sample, generator=g) for dd, g in zip(datas, gens)]
            return local_rounds(C.FEDAVG, f_fast, w, samplers, gens, fedavg, chunk_size=clients, vectorize=vectorize)
        return call

    out = {
        "plain PyTorch, epoch slices": (plain(False), steps),
        "plain PyTorch, fedmeta draws": (plain(True), steps),
        "FedAvg func, check/step": (checked_every_step, steps),
        "FedAvg func": (lambda: local_round(C.FEDAVG, f_func, w, sampler(), fedavg, step_impl="func"), steps),
        "FedAvg fast, pure": (pure_fast, steps),
        "FedAvg fast": (lambda: local_round(C.FEDAVG, f_fast, w, sampler(), fedavg, step_impl="fast"), steps),
        "Per-FedAvg FO func": (lambda: local_round(C.PER_FEDAVG, f_func, w, sampler(), fo, step_impl="func"), steps // 2),
        "Per-FedAvg FO fast": (lambda: local_round(C.PER_FEDAVG, f_fast, w, sampler(), fo, step_impl="fast"), steps // 2),
        f"FedAvg {clients} clients, vmap": (group("vmap"), clients * steps),
        f"FedAvg {clients} clients, loop": (group("loop"), clients * steps),
    }
    return out, CFG


def run(quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    steps = 40 if quick else CFG.train_per_client // CFG.batch_size
    cells, _ = calls(clients=3 if quick else 10, steps=steps)
    timings = bench_interleaved({k: fn for k, (fn, _) in cells.items()}, warmup=1 if quick else 2,
                                repeats=2 if quick else 7, min_repeat_seconds=0.0 if quick else 0.2)
    rows = {}
    for k, (_, n) in cells.items():
        t = timings[k]
        rows[k] = {"client_steps_per_call": n, "us_per_step_min": t.min_ms * 1e3 / n, "us_per_step_median": t.median_ms * 1e3 / n,
                   "client_steps_per_s_min_time": n / (t.min_ms / 1e3)}
    return {"environment": environment(), "quick": quick, "threads": 1, "local_steps": steps, "cells": rows}


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    ref = report["cells"]["plain PyTorch, epoch slices"]["us_per_step_median"]
    lines = [f"one client's local round, MLP 784-100-10, batch 10, {report['local_steps']} local steps, 1 thread, {env['date']}",
             f"torch {env['torch']}, load average at start {' '.join(env['loadavg_at_start'])}",
             f"  {'cell':<32} {'us/step min':>11} {'us/step med':>11} {'client-steps/s':>14} {'/ plain (med)':>13}"]
    for k, r in report["cells"].items():
        lines.append(f"  {k:<32} {r['us_per_step_min']:>11.1f} {r['us_per_step_median']:>11.1f} "
                     f"{r['client_steps_per_s_min_time']:>14.0f} {r['us_per_step_median'] / ref:>12.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = timing.parser(__doc__, RESULTS_PATH, "a few seconds (the smoke test)").parse_args(argv)
    started = time.time()
    return timing.finish(run(args.quick), args, started, table)


if __name__ == "__main__":
    raise SystemExit(main())
