"""How a multi-client node runs its clients' steps: vmapped, or vmapped and compiled.

:func:`~fedmeta.algorithms.executor.local_rounds` takes the same step of C clients as

* ``vmap``: one ``torch.func.vmap`` call of the algorithm's step over the stacked clients, or
* ``compile``: that call compiled by ``torch.compile`` (Inductor: one graph of the forward passes, the
  ``torch.func`` backward passes and the update; :func:`compiled_step`, built once per process and setting),

which compute the same numbers to float32 round-off (and ``loop``, each client alone, where vmap cannot run
or when asked for).

``vectorize="auto"`` runs ``vmap`` unless compiling measurably pays (:func:`choose`), decided once per
process and *workload* (the algorithm's settings, what the loss computes, the number of clients) before the
round's first step, kept for every later round and logged once (``fedmeta`` logger, INFO). Compiling costs
seconds once per process (2-20 s measured on the papers' MLPs), so it is tried only when a round's vmapped
steps take at least :data:`COMPILE_MIN_ROUND_SECONDS` (one step timed on the chunk's own batches, x
``local_steps``); the compiled step is then timed the same way (a warm-up call, the best of
:data:`PROBE_REPEATS`; results discarded, no random draw consumed) and kept only if it is at least
:data:`COMPILE_MIN_SPEEDUP` times faster. Short rounds (every test, the default experiment) never time
anything and run exactly as ``vmap``; the margin keeps two runs of a long workload from choosing differently
by timing noise. The loop is not chosen by timing: with the same settings and seed a run computes the same
bits, which a timed choice between two close candidates would not keep.
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
MAX_COMPILED_VARIANTS = 4
"""``auto`` compiles at most this many step-size variants of one workload per process: the step sizes are constants of
the compiled graph, so a schedule that changes them every round would otherwise recompile every round."""
COMPILE_MIN_SPEEDUP = 1.5
"""``auto`` keeps the compiled step only if one step of the chunk is at least this many times faster than vmapped."""
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
_VARIANTS: dict[Hashable, set] = {}


def _bounded(cache: dict) -> dict:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    return cache


def compiled_step(key: Hashable, vstep: Callable[..., Any], family: Hashable = None) -> Callable[..., Any]:
    """``torch.compile(vstep)`` (whole graph), one per ``key`` (the algorithm, its settings and the loss) in this
    process: a later round with the same key reuses the compiled code (Inductor recompiles for new shapes).
    ``family``: ``key`` without the step sizes (counted for :func:`may_compile`)."""
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _bounded(_COMPILED)[key] = torch.compile(vstep, fullgraph=True)
        _bounded(_VARIANTS).setdefault(family, set()).add(key)
    return fn


def may_compile(key: Hashable, family: Hashable) -> bool:
    """Whether ``auto`` may offer compilation for ``key``: compiled already, or fewer than
    :data:`MAX_COMPILED_VARIANTS` step-size variants of its ``family`` compiled so far."""
    return key in _COMPILED or len(_VARIANTS.get(family, ())) < MAX_COMPILED_VARIANTS


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


def choose(key: Hashable, vmapped: Callable[[], Any], compiled: Callable[[], Any] | None, local_steps: int,
           label: str) -> Plan:
    """The plan of workload ``key``: the one chosen before, or ``compile`` if ``compiled`` (one compiled step of the
    chunk; ``None``: not a candidate) is worth trying and measured :data:`COMPILE_MIN_SPEEDUP` times faster than
    ``vmapped`` (one vmapped step), else ``vmap``. A compilation that fails is dropped with a warning."""
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    seconds: dict[str, float] = {}
    compile_seconds = None
    note = ""
    if compiled is not None:
        seconds["vmap"] = _best_time(vmapped)[1]
        vmap_round = seconds["vmap"] * local_steps
        if vmap_round >= COMPILE_MIN_ROUND_SECONDS:
            try:
                compile_seconds, seconds["compile"] = _best_time(compiled)
            except Exception as err:  # noqa: BLE001 -- Inductor's failures have many types (no C++ compiler, ...)
                lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.strip().endswith("raised:")]
                logger.warning("torch.compile of the %s step failed (%s: %s); running it uncompiled", label,
                               type(err).__name__, lines[0] if lines else "")
        else:
            note = f"; not compiled: a round's vmapped steps take {vmap_round:.2f} s < {COMPILE_MIN_ROUND_SECONDS} s"
    fast = "compile" in seconds and seconds["compile"] * COMPILE_MIN_SPEEDUP <= seconds["vmap"]
    plan = _bounded(_PLANS)[key] = Plan("compile" if fast else "vmap", seconds, compile_seconds)
    if seconds:
        timings = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in seconds.items())
        logger.info("%s: running the clients' steps as %s (one step of the chunk: %s%s)", label, plan.impl, timings, note)
    return plan


def known(key: Hashable) -> Plan | None:
    """The plan measured for ``key`` in this process, or ``None``."""
    return _PLANS.get(key)


def clear() -> None:
    """Forget the measured plans and compiled steps of this process (tests)."""
    _PLANS.clear()
    _COMPILED.clear()
    _VARIANTS.clear()


__all__ = ["COMPILE_MIN_ROUND_SECONDS", "COMPILE_MIN_SPEEDUP", "MAX_COMPILED_VARIANTS", "PROBE_REPEATS", "Plan", "choose", "clear", "compiled_step",
           "known", "may_compile"]
