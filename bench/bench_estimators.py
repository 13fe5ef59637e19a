"""Benchmark: time and peak memory of one client meta-step for every meta-gradient estimator.

Measured in one run, on the CPU, single-threaded (``torch.set_num_threads(1)``, one Ray worker
with ``num_cpus=1``):

* **What.** One Per-FedAvg client meta-step, ``fedmeta.meta.per_fedavg_step`` (the inner loop,
  the outer gradient, the N ``(I - alpha H)`` corrections and the meta-update), for every
  estimator in ``meta.META_GRADIENTS``, N in {1, 3, 5} inner steps, K in {5, 50} samples per
  batch, on the papers' MLPs (784-40-40-10 ReLU, 784-80-60-10 ELU, 1-40-40-1 ReLU sine) and the
  small conv net. On ``mlp-40-40`` the same grid is also run for one LocalMOML step
  (``meta.local_moml_step``). The data are random and synthetic (1x28x28 images in [0, 1] with
  10 classes and cross-entropy; sinewave points ``x ~ U(-5, 5)``, ``y = sin x`` with MSE), so no
  data set is needed. Each call works on the same ``2N + 1`` batches (``MetaBatches.draw``), so
  every call of one variant does identical work.
* **Time.** As in ``bench_meta_step.py`` and ``shared/perf-anchors.md``: warm-up calls, then
  repeats that each loop enough calls to last at least 50 ms; min and median per call. All the
  variants of one (model, K, N) cell are timed interleaved, repeat by repeat, so their ratios to
  ``first_order`` are measured in the same run under the same drift of this noisy VM. Cells whose
  slowest call takes more than a second get one warm-up call and fewer repeats.
* **Peak memory.** The peak, above the level at the start of the call, of the tensor bytes the
  CPU allocator handed out during one call: ``torch.profiler`` with ``profile_memory=True``
  records every allocation (+bytes) and free (-bytes) with a timestamp; the peak is the maximum
  of their running sum in time order. These are requested tensor sizes (not RSS, no allocator
  slack, no Python objects); the inputs (parameters, batches) exist before the call and are not
  counted. Measured once per variant, outside the timed repeats.

The markdown table goes to stdout and every cell to ``bench/results/bench_estimators.json``.

Usage::

    .venv/bin/python bench/bench_estimators.py [--quick] [--out PATH]
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

import timing  # bench/timing.py (the script's folder is on sys.path)
from timing import bench_interleaved  # bench/timing.py (the script's folder is on sys.path)
from fedmeta import config as C
from fedmeta import meta
from fedmeta.meta import Batch, LossFn, Params, Sampler
from fedmeta.models import build_model

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_estimators.json"
BASELINE = "first_order"
"""The estimator every ratio is taken to."""
SEED = 0
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """A model and the synthetic data it is fed."""

    model: str
    """A name of ``fedmeta.models.MODELS``."""
    label: str
    input_shape: tuple[int, ...]
    num_classes: int
    """Classes (cross-entropy), or 1 for regression (MSE)."""

    @property
    def regression(self) -> bool:
        return self.num_classes == 1

    def criterion(self):
        return torch.nn.functional.mse_loss if self.regression else torch.nn.functional.cross_entropy

    def sampler(self, gen: torch.Generator) -> Sampler:
        """``sample(k)``: ``k`` fresh synthetic samples, drawn from ``gen``."""

        def sample(k: int) -> Batch:
            if self.regression:  # one sinewave task, A = 1, phi = 0 (localmoml Section 6.1)
                x = 10.0 * torch.rand(k, *self.input_shape, generator=gen) - 5.0
                return x, torch.sin(x)
            x = torch.rand(k, *self.input_shape, generator=gen)
            return x, torch.randint(0, self.num_classes, (k,), generator=gen)

        return sample


MNIST = (1, 28, 28)
WORKLOADS = (
    Workload("mlp-40-40", "MLP 784-40-40-10 ReLU", MNIST, 10),
    Workload("mlp-80-60-elu", "MLP 784-80-60-10 ELU", MNIST, 10),
    Workload("sine-mlp", "MLP 1-40-40-1 ReLU (sine)", (1,), 1),
    Workload("cnn", "CNN 2x[conv5x5, pool] 32/64, FC 128", MNIST, 10),
)
LOCAL_MOML_MODELS = ("mlp-40-40",)
"""Models on which LocalMOML's step is benchmarked too (it costs what Per-FedAvg's does)."""


@dataclass(frozen=True)
class HyperParameters:
    """The step sizes and estimator settings of every call (they barely change the cost)."""

    inner_lr: float = 0.01
    """alpha, the adaptation step size."""
    meta_lr: float = 0.001
    """Per-FedAvg's beta, the local meta step size."""
    lr: float = 0.001
    """LocalMOML's eta, the local meta step size."""
    momentum: float = 0.5
    """LocalMOML's beta, the weight of the fresh adapted model in the personalized model."""
    delta: float = 1e-3
    """Finite-difference step (``hessian_free``) and smoothing radius (``ggs``, ``zeroth_order``)."""
    num_directions: int = 10
    """U, Gaussian directions per Hessian estimate (``ggs``, ``zeroth_order``)."""

    def estimator(self, name: str) -> meta.MetaGradient:
        return meta.meta_gradient(name, delta=self.delta, num_directions=self.num_directions)


HPARAMS = HyperParameters()


@dataclass(frozen=True)
class Budget:
    """What the benchmark covers and how long it may run."""

    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    """K."""
    inner_steps: tuple[int, ...]
    """N."""
    warmup: int
    """Untimed calls of each variant before timing (the first one also sizes the cell)."""
    repeats: int
    """Timed repeats of each variant."""
    min_repeat_seconds: float
    """Each repeat loops enough calls to last at least this long."""
    slow_call_seconds: float
    """A cell whose slowest first call takes longer than this is warmed up once and gets ``slow_repeats``."""
    slow_repeats: int


FULL = Budget(
    models=tuple(w.model for w in WORKLOADS),
    batch_sizes=(5, 50),
    inner_steps=(1, 3, 5),
    warmup=3,
    repeats=7,
    min_repeat_seconds=0.05,
    slow_call_seconds=1.0,
    slow_repeats=5,
)
QUICK = Budget(
    models=("mlp-40-40", "sine-mlp", "cnn"),
    batch_sizes=(5,),
    inner_steps=(1, 3),
    warmup=1,
    repeats=2,
    min_repeat_seconds=0.01,
    slow_call_seconds=0.2,
    slow_repeats=2,
)


# --------------------------------------------------------------------------- peak memory


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Silence file descriptor 2: Kineto, the profiler's C++ backend, logs every start and stop there."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak tensor memory allocated on the CPU during one call of ``fn``, above the level at its start.

    The profiler records one ``[memory]`` event per allocation (``+nbytes``) and per free
    (``-nbytes``); the peak is the maximum of their running sum in time order. Frees of tensors
    that existed before the call lower the sum, so the result is the growth over the starting level.

    Raises
    ------
    RuntimeError
        If the profiler recorded no allocation (then it measured nothing, and 0 would be a lie).
    """
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]  # fmt: skip
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocation: peak memory cannot be measured")
    events.sort(key=lambda e: e.start_ns())  # stable: simultaneous events keep their recording order
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return peak


# --------------------------------------------------------------------------- the calls


@dataclass(frozen=True)
class Variant:
    """One timed function: an algorithm's client meta-step with one estimator."""

    algorithm: str
    estimator: str
    call: Callable[[], object]

    @property
    def key(self) -> str:
        return f"{self.algorithm}/{self.estimator}"


def cell_variants(workload: Workload, batch_size: int, inner_steps: int) -> list[Variant]:
    """One client meta-step per (algorithm, estimator) on one (model, K, N), as argument-free calls.

    The model is initialised from :data:`SEED` (without touching the global RNG) and the ``2N + 1``
    batches are drawn once, so every call of a variant does identical work. Hyper-parameters: :data:`HPARAMS`.
    """
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = build_model(workload.model, workload.input_shape, workload.num_classes)
    f: LossFn = meta.make_loss(model, workload.criterion())
    w: Params = meta.params_of(model)
    data_gen = torch.Generator().manual_seed(SEED)
    batches = meta.MetaBatches.draw(workload.sampler(data_gen), inner_steps, batch_size)
    hp = HPARAMS

    def per_fedavg(name: str) -> Callable[[], object]:
        est, gen = hp.estimator(name), torch.Generator().manual_seed(SEED + 1)
        return lambda: meta.per_fedavg_step(f, w, batches, hp.inner_lr, hp.meta_lr, est, gen)

    def local_moml(name: str) -> Callable[[], object]:
        est, gen = hp.estimator(name), torch.Generator().manual_seed(SEED + 1)
        u = meta.local_moml_init_memory(f, w, batches.inner, hp.inner_lr, est)
        return lambda: meta.local_moml_step(f, w, u, batches, hp.inner_lr, hp.lr, hp.momentum, est, gen)

    variants = [Variant(C.PER_FEDAVG, name, per_fedavg(name)) for name in meta.META_GRADIENTS]
    if workload.model in LOCAL_MOML_MODELS:
        variants += [Variant(C.LOCAL_MOML, name, local_moml(name)) for name in meta.META_GRADIENTS]
    return variants


def run_cell(workload: Workload, batch_size: int, inner_steps: int, budget: Budget) -> list[dict[str, Any]]:
    """Time and profile every variant of one (model, K, N) cell; one record per variant."""
    variants = cell_variants(workload, batch_size, inner_steps)
    timings = bench_interleaved(
        {v.key: v.call for v in variants},
        warmup=budget.warmup, repeats=budget.repeats, min_repeat_seconds=budget.min_repeat_seconds,
        slow_call_seconds=budget.slow_call_seconds, slow_repeats=budget.slow_repeats,
    )
    peaks = {v.key: peak_bytes(v.call) for v in variants}
    records = []
    for v in variants:
        base = f"{v.algorithm}/{BASELINE}"
        ms, ms0 = timings[v.key], timings[base]
        cost = HPARAMS.estimator(v.estimator).cost(inner_steps)
        records.append({
            "algorithm": v.algorithm,
            "model": workload.model,
            "batch_size": batch_size,
            "inner_steps": inner_steps,
            "estimator": v.estimator,
            "oracle_calls": asdict(cost),
            "ms": asdict(ms),
            "ms_over_first_order": {"min": ms.min_ms / ms0.min_ms, "median": ms.median_ms / ms0.median_ms},
            "peak_bytes": peaks[v.key],
            "peak_mib": peaks[v.key] / MIB,
            "peak_over_first_order": peaks[v.key] / peaks[base],
        })  # fmt: skip
    return records


# --------------------------------------------------------------------------- report


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _mib(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _calls(c: dict[str, int]) -> str:
    """Oracle calls of one meta-step: ``g`` gradients, ``h`` Hessian-vector products, ``f`` forward-only losses."""
    parts = [f"{c['gradients']}g"] + [f"{c[k]}{s}" for k, s in (("hvps", "h"), ("loss_evals", "f")) if c[k]]
    return " + ".join(parts)


def table(report: dict[str, Any], algorithm: str) -> str:
    """One markdown row per (model, K, N, estimator) of ``algorithm``."""
    labels = {w.model: w.label for w in WORKLOADS}
    lines = [
        (
            "| model | K | N | estimator | oracle calls | ms min / med | ms / first_order (min / med) "
            "| peak MiB | peak / first_order |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cells"]:
        if r["algorithm"] != algorithm:
            continue
        ms, ratio = r["ms"], r["ms_over_first_order"]
        lines.append(
            f"| {labels[r['model']]} | {r['batch_size']} | {r['inner_steps']} | {r['estimator']} "
            f"| {_calls(r['oracle_calls'])} | {_ms(ms['min_ms'])} / {_ms(ms['median_ms'])} "
            f"| {ratio['min']:.2f}x / {ratio['median']:.2f}x "
            f"| {_mib(r['peak_mib'])} | {r['peak_over_first_order']:.2f}x |"
        )
    return "\n".join(lines)


def summary(report: dict[str, Any], algorithm: str) -> str:
    """Per (model, K, N): first_order's cost and every estimator's ratio to it (time: min over repeats; peak memory)."""
    labels = {w.model: w.label for w in WORKLOADS}
    others = [e for e in meta.META_GRADIENTS if e != BASELINE]
    cells: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    for r in report["cells"]:
        if r["algorithm"] == algorithm:
            cells.setdefault((r["model"], r["batch_size"], r["inner_steps"]), {})[r["estimator"]] = r
    lines = [
        f"| model | K | N | {BASELINE} ms (min) | {BASELINE} MiB | "
        + " | ".join(f"{e} time / mem" for e in others)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(others),
    ]
    for (model, k, n), by_est in cells.items():
        fo = by_est[BASELINE]
        ratios = " | ".join(
            f"{by_est[e]['ms_over_first_order']['min']:.1f}x / {by_est[e]['peak_over_first_order']:.2f}x"
            for e in others
        )
        lines.append(f"| {labels[model]} | {k} | {n} | {_ms(fo['ms']['min_ms'])} | {_mib(fo['peak_mib'])} | {ratios} |")
    return "\n".join(lines)


def report_text(report: dict[str, Any]) -> str:
    env, hp, budget = report["environment"], report["hyperparameters"], report["budget"]
    lines = [
        f"# fedmeta estimator benchmark{' (--quick)' if report['quick'] else ''}",
        "",
        (
            f"torch {env['torch']}, {env['cpu_count']} CPUs, {report['threads']} thread; "
            f"inner_lr (alpha) {hp['inner_lr']}, meta_lr (beta) {hp['meta_lr']}, LocalMOML lr (eta) {hp['lr']}, "
            f"momentum {hp['momentum']}, delta {hp['delta']}, num_directions (U) {hp['num_directions']}; "
            f"synthetic data, {budget['repeats']} repeats of >= {1e3 * budget['min_repeat_seconds']:.0f} ms "
            f"({budget['slow_repeats']} in cells with a call > {budget['slow_call_seconds']} s); "
            f"wall time {report['wall_seconds']:.0f} s."
        ),
        "Oracle calls per meta-step: g gradients, h Hessian-vector products, f forward-only loss evaluations.",
        "Ratios are to first_order in the same (model, K, N) cell, timed interleaved in the same run.",
        "",
        "## Summary: Per-FedAvg step, ratio to first_order (time: min of the repeats; memory: peak)",
        "",
        summary(report, C.PER_FEDAVG),
        "",
        f"## {C.PER_FEDAVG}: one client meta-step (per_fedavg_step)",
        "",
        table(report, C.PER_FEDAVG),
    ]
    if any(r["algorithm"] == C.LOCAL_MOML for r in report["cells"]):
        lines += ["", f"## {C.LOCAL_MOML}: one client meta-step (local_moml_step)", "", table(report, C.LOCAL_MOML)]
    return "\n".join(lines)


def run(budget: Budget, quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Measure every cell of ``budget`` and return the report (see the module docstring)."""
    t0 = time.perf_counter()
    workloads = [w for w in WORKLOADS if w.model in budget.models]
    cells = []
    for w in workloads:
        for k in budget.batch_sizes:
            for n in budget.inner_steps:
                c0 = time.perf_counter()
                cells += run_cell(w, k, n, budget)
                progress(f"{w.model} K={k} N={n}: {time.perf_counter() - c0:.1f} s")
    return {
        "quick": quick,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t0,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "threads": torch.get_num_threads(),
        "budget": asdict(budget),
        "hyperparameters": asdict(HPARAMS),
        "peak_memory_method": (
            "torch.profiler profile_memory: max running sum of CPU allocation/free bytes during one call"
        ),
        "cells": cells,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = timing.parser(__doc__, RESULTS_PATH, "a few cells, short repeats: a smoke test of well under a minute").parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    report = run(QUICK if args.quick else FULL, args.quick, lambda msg: print(msg, file=sys.stderr, flush=True))
    return timing.finish(report, args, started, report_text)


if __name__ == "__main__":
    raise SystemExit(main())
