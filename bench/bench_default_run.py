"""The default experiment (``make run``: LocalMOML then Per-FedAvg, every default) on each node layout, side by
side in one invocation (issue 23).

Each layout is one ``fedmeta-sim`` in a child process, one after the other on the same machine:

- ``one client per node``: ``--num-nodes 0``, what a deployment of one SuperNode per client does (and ``make
  run``'s default before issue 23);
- ``default: multi-client, vmap``: no flag, ``make run``'s default: ``num-nodes = -1`` (one node per Ray actor
  slot), clients vmapped (``vectorize = auto``), batched evaluation;
- ``multi-client nodes, loop``: the same with ``--vectorize loop`` (each client's step as with one client per node).

Per layout: the child's wall time (Python start, data check and each algorithm's Ray start-up included), client
meta-steps per second of it, the cores the machine had busy meanwhile (``/proc/stat``), each algorithm's final
personalized accuracy, the speed-up over the first layout and the accuracy difference. Then where the time went,
from the results files (:func:`split`):

- **start-up**: wall minus the ServerApps' own time (interpreter, data check, Ray and Flower start and stop);
- **round 1**: the first train round, in which Flower's actors start, import torch and fedmeta, load the data and
  make their first (slowest) call;
- **train math**: in the later rounds, the clients' handlers on the critical path (per round the longest
  handler, or the handlers' total over the actors running at once if more), as the replies report it
  (``client-timing``);
- **train framework**: the later train rounds' remaining time: Flower's and Ray's per-round cost (messages,
  serialization, the simulation engine's polling) and the server's sampling and aggregation;
- **evaluation** (its clients' math in brackets), **checkpoint** writes, and the **rest** of the ServerApps' time.

    .venv/bin/python bench/bench_default_run.py [--smoke] [--out PATH] [--layouts one,vmap,loop] [-- fedmeta-sim flags]

The table goes to stdout, the figures (with the provenance block) to ``bench/results/bench_default_run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import timing  # bench/timing.py (the script's folder is on sys.path)
from fedmeta.provenance import provenance
from fedmeta.simulations.processes import busy_cpu_seconds
from fedmeta.simulations.run import USAGE_PREFIX, client_steps

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_default_run.json"
LAYOUTS = {
    "one": ("one client per node", ["--num-nodes", "0"]),
    "default": ("default: multi-client, vmap", []),
    "loop": ("multi-client nodes, loop", ["--vectorize", "loop"]),
}
SMOKE = ["--algorithms", "local-moml", "--dataset", "sinewave", "--num-clients", "6", "--clients-per-round", "3", "--num-rounds", "3",
         "--evaluate-every", "3"]
"""``--smoke``: the tests' size (one algorithm, a few seconds of rounds per layout)."""


def critical_math(handler_seconds: dict[str, list[float]], rounds: Sequence[str], slots: int) -> float:
    """The clients' math on the critical path of ``rounds``: per round, the longest handler or the handlers' total
    spread over the ``slots`` actors that run at once, whichever is more."""
    total = 0.0
    for r in rounds:
        times = handler_seconds.get(r) or []
        if times:
            total += max(max(times), sum(times) / max(1, slots))
    return total


def split(runs: list[dict[str, Any]], wall: float, slots: int) -> dict[str, float]:
    """Where ``wall`` went, from the runs' results (see the module docstring)."""
    server = sum(r["seconds"] for r in runs)
    first = sum(r["round_seconds"].get("1", 0.0) for r in runs)
    later = [(r, [k for k in r["round_seconds"] if k != "1"]) for r in runs]
    train = sum(sum(r["round_seconds"][k] for k in keys) for r, keys in later)
    math_s = sum(critical_math(r["handler_seconds"]["train"], keys, slots) for r, keys in later)
    evaluation = sum(r["phase_seconds"]["evaluate"] for r in runs)
    eval_math = sum(critical_math(r["handler_seconds"]["evaluate"], list(r["handler_seconds"]["evaluate"]), slots) for r in runs)
    checkpoint = sum(r["phase_seconds"]["checkpoint"] for r in runs)
    return {
        "start_up": wall - server, "first_round": first, "train_math": math_s, "train_framework": train - math_s,
        "evaluation": evaluation, "evaluation_math": eval_math, "checkpoint": checkpoint,
        "rest": server - first - train - evaluation - checkpoint,
    }


def run_layout(key: str, extra: Sequence[str], work: Path) -> dict[str, Any]:
    """One ``fedmeta-sim`` with the layout's flags and ``extra``, in a child process; its figures."""
    label, flags = LAYOUTS[key]
    results = work / key
    argv = [sys.executable, "-m", "fedmeta.simulations.run", "--results-dir", str(results), *flags, *extra]
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t0
    busy1 = busy_cpu_seconds()
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: fedmeta-sim exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*.json")) if not p.name.startswith(USAGE_PREFIX)]
    steps = sum(client_steps(r) for r in runs)
    cfg = runs[0]["config"]
    slots = max(1, int((os.cpu_count() or 1) / float(cfg["num-cpus"] or 1)))
    return {
        "layout": label, "flags": flags, "wall_s": wall, "client_steps": steps, "client_steps_per_s": steps / wall,
        "busy_cores": None if busy0 is None or busy1 is None else (busy1 - busy0) / wall,
        "split_s": split(runs, wall, slots),
        "rounds": sum(len(r["round_seconds"]) for r in runs),
        "final": {r["config"]["algorithm"]: {k: r["final"].get(k) for k in ("accuracy-after", "accuracy-after-std", "loss-after")}
                  for r in runs},
        "nodes": {r["config"]["algorithm"]: r["config"]["num-nodes"] or r["config"]["num-clients"] for r in runs},  # 0: one per client
    }


SPLIT_COLUMNS = (("start_up", "start-up"), ("first_round", "round 1"), ("train_math", "train math"),
                 ("train_framework", "train framework"), ("evaluation", "evaluation"), ("checkpoint", "checkpoint"), ("rest", "rest"))


def table(report: dict[str, Any]) -> str:
    rows, base = report["rows"], report["rows"][0]
    algorithms = list(base["final"])
    # personalized accuracy; the loss after fine-tuning where the task has no classes (sinewave)
    metric = "accuracy-after" if all(base["final"][a].get("accuracy-after") is not None for a in algorithms) else "loss-after"
    short = "acc" if metric == "accuracy-after" else "loss"
    head = (f"{'layout':<28} {'wall s':>7} {'speed-up':>8} {'client-steps/s':>14} {'busy cores':>10}"
            + "".join(f" {a + ' ' + short:>15}" for a in algorithms))
    lines = [head, "-" * len(head)]
    for r in rows:
        busy = r["busy_cores"]
        line = (f"{r['layout']:<28} {r['wall_s']:>7.1f} {base['wall_s'] / r['wall_s']:>7.2f}x {r['client_steps_per_s']:>14.1f} "
                f"{'n/a' if busy is None else f'{busy:.2f}':>10}")
        for a in algorithms:
            value = r["final"].get(a, {}).get(metric)
            line += f" {'n/a' if value is None else f'{value:.4f}':>15}"
        lines.append(line)
    lines.append("")
    for r in rows[1:]:
        diffs = ", ".join(f"{a} {r['final'][a][metric] - base['final'][a][metric]:+.4f}"
                          for a in algorithms if r["final"].get(a, {}).get(metric) is not None)
        lines.append(f"{r['layout']}: final {metric} minus one client per node: {diffs or 'n/a'} (nodes: {r['nodes']})")
    lines += ["", "Where the wall time went (s; both algorithms; rounds after the first split into the clients' math on the",
              "critical path and the framework's per-round cost; evaluation includes its math, shown in brackets):", ""]
    head = f"{'layout':<28}" + "".join(f" {label:>15}" for _, label in SPLIT_COLUMNS) + f" {'per round':>10}"
    lines += [head, "-" * len(head)]
    for r in rows:
        split = r["split_s"]
        cells = []
        for key, _ in SPLIT_COLUMNS:
            cell = f"{split[key]:.1f}"
            if key == "evaluation":
                cell += f" ({split['evaluation_math']:.1f})"
            cells.append(f" {cell:>15}")
        later = max(1, r["rounds"] - len(r["nodes"]))  # rounds after each run's first
        per_round = 1000 * (split["train_math"] + split["train_framework"]) / later
        lines.append(f"{r['layout']:<28}" + "".join(cells) + f" {per_round:>7.0f} ms")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tests' tiny experiment (LocalMOML on sinewave, 6 clients, 3 rounds)")
    p.add_argument("--layouts", default="one,default,loop", help=f"comma-separated, first is the baseline (of {', '.join(LAYOUTS)})")
    p.add_argument("--out", type=Path, default=RESULTS_PATH, help=f"where the JSON goes (default: {RESULTS_PATH})")
    p.add_argument("extra", nargs="*", help="more fedmeta-sim flags, after --")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.layouts.split(",") if k.strip()]
    if not keys or any(k not in LAYOUTS for k in keys):
        p.error(f"--layouts must name some of {', '.join(LAYOUTS)}, got {args.layouts!r}")
    extra = [*(SMOKE if args.smoke else []), *args.extra]
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-default-") as work:
        for key in keys:
            print(f"  {LAYOUTS[key][0]} ...", file=sys.stderr, flush=True)
            rows.append(run_layout(key, extra, Path(work)))
    report = {"smoke": args.smoke, "fedmeta_sim_flags": extra, "cores": os.cpu_count(), "rows": rows}
    report["provenance"] = provenance({"layouts": keys, "smoke": args.smoke, "extra": extra}, started=started)
    timing.emit(report, table(report), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
