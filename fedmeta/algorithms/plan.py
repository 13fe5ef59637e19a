"""How a node runs its clients' steps: vmapped, vmapped and compiled, or one client after the other.

:func:`~fedmeta.algorithms.executor.local_rounds` takes the same step of C clients three ways, which
compute the same numbers to float32 round-off:

* ``vmap``: one ``torch.func.vmap`` call of the algorithm's step over the stacked clients;
* ``compile``: that call compiled by ``torch.compile`` (Inductor: one graph of the forward passes, the
  ``torch.func`` backward passes and the update; :func:`compiled_step`, built once per process and setting);
* ``loop``: each client's step on its own (:func:`~fedmeta.algorithms.executor.local_round`'s path).

``vectorize="auto"`` chooses by measuring (:func:`choose`), once per process and *workload* (the
algorithm's settings, the loss, the number of clients and the shapes of their batches): on the first
chunk of a round it times one step of each candidate on that chunk's own batches (a warm-up call,
then the best of :data:`PROBE_REPEATS`; results discarded, no random draw consumed) and keeps the
fastest for every later round. Compiling costs seconds once per process (2-20 s measured on the
papers' MLPs), so ``compile`` is a candidate only when the round's vmapped steps take at least
:data:`COMPILE_MIN_ROUND_SECONDS` (a round that long pays the compilation back within a few rounds);
smaller rounds never compile. The choice is made before the round's first step and kept, so every
round of a process runs the same code, and is logged once (``fedmeta`` logger, INFO).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

logger = logging.getLogger("fedmeta")

COMPILE_MIN_ROUND_SECONDS = 0.5
"""``auto`` compiles only when one round's vmapped steps (one step's measured time x ``local_steps``) take at least this long."""
PROBE_REPEATS = 3
"""Timed calls per candidate (after one warm-up call); the fastest counts."""
_CACHE_LIMIT = 64


@dataclass(frozen=True)
class Plan:
    """What ``auto`` chose for one workload, and the measured seconds of one step of the chunk per candidate."""

    impl: str
    seconds: dict[str, float] = field(default_factory=dict)
    compile_seconds: float | None = None


_PLANS: dict[Hashable, Plan] = {}
_COMPILED: dict[Hashable, Callable[..., Any]] = {}


def _bounded(cache: dict) -> dict:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    return cache


def compiled_step(key: Hashable, vstep: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(vstep)`` (whole graph), one per ``key`` (the algorithm, its settings and the loss) in this
    process: a later round with the same key reuses the compiled code (Inductor recompiles for new shapes)."""
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _bounded(_COMPILED)[key] = torch.compile(vstep, fullgraph=True)
    return fn


def _best_time(fn: Callable[[], Any]) -> tuple[float, float]:
    """(seconds of the first call, the fastest of :data:`PROBE_REPEATS` later calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def choose(key: Hashable, candidates: dict[str, Callable[[], Any]], local_steps: int, label: str) -> Plan:
    """The plan of workload ``key``: the one measured before, or the fastest of ``candidates`` (name -> one step
    of the chunk; ``"compile"`` is tried only if the vmapped round is long enough, and dropped with a warning
    if it fails to compile)."""
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    seconds: dict[str, float] = {}
    for name in ("vmap", "loop"):
        if name in candidates:
            seconds[name] = _best_time(candidates[name])[1]
    compile_seconds = None
    vmap_round = seconds.get("vmap", 0.0) * local_steps
    if "compile" in candidates and vmap_round >= COMPILE_MIN_ROUND_SECONDS:
        try:
            compile_seconds, seconds["compile"] = _best_time(candidates["compile"])
        except Exception as err:  # noqa: BLE001 -- Inductor's failures have many types (no C++ compiler, ...)
            logger.warning("torch.compile of the %s step failed (%s: %s); running it uncompiled", label, type(err).__name__,
                           str(err).splitlines()[0] if str(err) else "")
    impl = min(seconds, key=seconds.__getitem__)
    plan = _bounded(_PLANS)[key] = Plan(impl, seconds, compile_seconds)
    timings = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items())
    skipped = "" if "compile" in seconds or "compile" not in candidates else \
        f"; not compiled: a round's vmapped steps take {vmap_round:.2f} s < {COMPILE_MIN_ROUND_SECONDS} s"
    logger.info("%s: running the clients' steps as %s (one step of the chunk: %s%s)", label, impl, timings, skipped)
    return plan


def known(key: Hashable) -> Plan | None:
    """The plan measured for ``key`` in this process, or ``None``."""
    return _PLANS.get(key)


def clear() -> None:
    """Forget the measured plans and compiled steps of this process (tests)."""
    _PLANS.clear()
    _COMPILED.clear()


__all__ = ["COMPILE_MIN_ROUND_SECONDS", "PROBE_REPEATS", "Plan", "choose", "clear", "compiled_step", "known"]
