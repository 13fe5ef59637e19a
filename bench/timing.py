"""The timing harness shared by the benchmarks (method of ``shared/perf-anchors.md``).

Warm-up calls, then repeats that each loop enough calls to last at least ``min_repeat_seconds``;
min and median per call over the repeats. Several functions are timed interleaved, repeat by
repeat, so that their ratios are not skewed by the VM's slow drifts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Timing:
    """Per-call wall time of one function, in milliseconds."""

    min_ms: float
    median_ms: float
    calls_per_repeat: int
    repeats: int


def _seconds(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - t0


def calls_per_repeat(fn: Callable[[], object], min_seconds: float) -> int:
    """The smallest power of two of calls of ``fn`` that lasts at least ``min_seconds``."""
    calls = 1
    while _seconds(fn, calls) < min_seconds:
        calls *= 2
    return calls


def bench_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    min_repeat_seconds: float,
    slow_call_seconds: float = float("inf"),
    slow_repeats: int = 0,
    alternate: bool = False,
) -> dict[str, Timing]:
    """Time several functions, alternating between them repeat by repeat.

    Parameters
    ----------
    fns
        ``name -> fn``; each ``fn()`` is one call to time.
    warmup
        Untimed calls of each function before timing (the first one also sizes the cell).
    repeats
        Timed repeats of each function.
    min_repeat_seconds
        Each repeat loops enough calls to last at least this long.
    slow_call_seconds, slow_repeats
        The slow-cell rule: if the slowest first call takes longer than ``slow_call_seconds``,
        every function is warmed up by that one call only and timed over ``slow_repeats`` repeats.
    alternate
        Reverse the order of the functions every other repeat (first to last, then last to first, ...),
        so that no function always runs right after the same one.

    Returns
    -------
    dict[str, Timing]
        Per name, min and median over the repeats of (repeat time / calls in the repeat).
    """
    first = {name: _seconds(fn, 1) for name, fn in fns.items()}
    slow = max(first.values()) > slow_call_seconds
    repeats = slow_repeats if slow else repeats
    for fn in fns.values():
        for _ in range(0 if slow else warmup - 1):
            fn()
    calls = {name: calls_per_repeat(fn, min_repeat_seconds) for name, fn in fns.items()}
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in (order[::-1] if alternate and r % 2 else order):
            per_call[name].append(_seconds(fn, calls[name]) / calls[name])
    return {
        name: Timing(min_ms=1e3 * min(t), median_ms=1e3 * statistics.median(t), calls_per_repeat=calls[name], repeats=repeats)
        for name, t in per_call.items()
    }


# --- what every benchmark script's command line and output share


def parser(doc: str | None, results_path: Path, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's command line: ``--quick`` (``quick_help``) and ``--out`` (default ``results_path``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=results_path, help=f"where to write the JSON (default: {results_path})")
    return p


def emit(report: dict[str, Any], text: str, out: Path) -> None:
    """Print a benchmark's table and write its figures to ``out`` (JSON)."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"figures written to {out}")


def finish(report: dict[str, Any], args: argparse.Namespace, started: float, table: Callable[[dict[str, Any]], str]) -> int:
    """Record the run's provenance (its flags as config) in ``report``, print ``table(report)``, write the JSON to ``args.out``."""
    from fedmeta.provenance import provenance

    report["provenance"] = provenance(vars(args), started=started)
    emit(report, table(report), args.out)
    return 0
