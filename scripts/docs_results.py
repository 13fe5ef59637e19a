"""The numbers in the docs, generated from results files: ``make docs-results``.

Every table this script owns sits in README.md, docs/getting-started.md, docs/results.md, docs/benchmarks.md or
bench/README.md between two markers::

    <!-- docs-results: SOURCE -->
    ...generated text: edit SOURCE (or re-run what wrote it), then `make docs-results`...
    <!-- /docs-results -->

where SOURCE is a checked-in summary, relative to the repository root:

- ``docs/results/<name>/summary.md``: a reproduction's summary, written by ``fedmeta-reproduce <name>`` from its
  runs' results files; the block is the summary's first table and its ``Runs:`` line (the code, libraries and
  machine behind it).
- ``docs/results/default-run/summary.json``: the default experiment (``make run``) for several seeds, written by
  ``python scripts/docs_results.py ingest-default-run results/*.json`` from the results files ``make run`` wrote;
  the block is seed 0's table as ``make run`` prints it, the mean and std over the seeds, and the runs' provenance.
- ``docs/results/<name>/summary.md#Heading``: the line of that summary starting with ``Heading`` and the list after
  it (e.g. a reproduction's verdicts).
- ``bench/summaries/bench_scale.json``, ``bench/summaries/bench_default_run.json`` and
  ``bench/summaries/bench_peers.json``: a ``make bench``, ``make bench-default-run`` and ``make bench-peers``
  report (the JSON the bench script writes, copied by ``ingest-bench``); the block is the table that run printed
  and its provenance. Until a full run's report is kept, the block says how to make one.

Commands::

    python scripts/docs_results.py                    # rewrite every block from its source
    python scripts/docs_results.py --check            # exit 1 naming every block that differs (tests/test_docs_results.py)
    python scripts/docs_results.py ingest-default-run results/*-fashion-mnist-n50-seed*.json
    python scripts/docs_results.py ingest-bench scale bench/results/bench_scale.json
    python scripts/docs_results.py ingest-bench peers bench/results/bench_peers.json
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fedmeta.provenance import RUNS_PREFIX

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/getting-started.md", "docs/results.md", "docs/benchmarks.md", "bench/README.md")
"""The files whose marked blocks this script writes."""
DEFAULT_RUN = "docs/results/default-run/summary.json"
BENCH_SCALE = "bench/summaries/bench_scale.json"
BENCH_DEFAULT_RUN = "bench/summaries/bench_default_run.json"
BENCH_PEERS = "bench/summaries/bench_peers.json"
BENCHES = {"scale": BENCH_SCALE, "default-run": BENCH_DEFAULT_RUN, "peers": BENCH_PEERS}
"""``ingest-bench NAME REPORT``: where each benchmark's report is kept."""
BLOCK = re.compile(r"(<!-- docs-results: (?P<source>[^ ]+) -->\n)(?P<body>.*?)(<!-- /docs-results -->)", re.S)


# --- rendering ------------------------------------------------------------------------------------------


def first_table(text: str) -> str:
    """The first markdown table (its consecutive ``|`` lines) of ``text``."""
    lines, found = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            lines.append(line)
            found = True
        elif found:
            break
    if not lines:
        raise ValueError("no markdown table")
    return "\n".join(lines)


def render_reproduction(path: Path) -> str:
    text = path.read_text()
    runs = [ln for ln in text.splitlines() if ln.startswith(RUNS_PREFIX)]
    if len(runs) != 1:
        raise ValueError(f"{path}: expected one line starting with {RUNS_PREFIX!r}, found {len(runs)}")
    return f"{first_table(text)}\n\n{runs[0]}\n"


def _load_module(name: str, path: Path):
    if str(path.parent) not in sys.path:  # a bench script imports its neighbours (bench/timing.py)
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def render_default_run(path: Path) -> str:
    from fedmeta.provenance import describe
    from fedmeta.simulations.run import _table  # the table `make run` prints

    summary = json.loads(path.read_text())
    runs = summary["runs"]
    seeds = sorted({r["seed"] for r in runs})
    algorithms = list(dict.fromkeys(r["config"]["algorithm"] for r in runs))
    first = [next(r for r in runs if r["seed"] == seeds[0] and r["config"]["algorithm"] == a) for a in algorithms]
    out = [f"Seed {seeds[0]}, as `{summary['command']}` prints it:", "", "```text", _table(first), "```", ""]
    if len(seeds) > 1:
        named = ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}"
        out += [f"Seeds {named}: mean ± std over the {len(seeds)} seeds of each run's figure (each figure is itself over the "
                f"{summary['clients']} clients).", "",
                "| algorithm | rounds | acc before | acc after | std over clients | p10 | seconds |", "|---|---|---|---|---|---|---|"]
        for a in algorithms:
            rs = [r for r in runs if r["config"]["algorithm"] == a]
            f = [r["final"] for r in rs]
            out.append(f"| {a} | {rs[0]['final_round']} | {_mean_std([x['accuracy-before'] for x in f])} | "
                       f"{_mean_std([x['accuracy-after'] for x in f])} | {_mean_std([x['accuracy-after-std'] for x in f])} | "
                       f"{_mean_std([x['accuracy-after-p10'] for x in f])} | {_mean_std([r['seconds'] for r in rs], 1)} |")
        out.append("")
    calls = summary.get("invocations", [])
    if calls:
        def minutes(seconds: float) -> str:
            return f"{int(seconds // 60)} min {seconds % 60:.0f} s"

        def listed(items: list[str]) -> str:
            return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"

        busy = [i["busy_cores"] for i in calls if i["busy_cores"] is not None]
        nodes = sorted({r["config"].get("num-nodes") for r in runs})
        seeds = listed([str(i["seed"]) for i in calls])
        walls = listed([minutes(i["wall_s"]) for i in calls])
        rates = listed([f"{i['client_steps_per_s']:.0f}" for i in calls])
        out += [f"Wall time of `{summary['command']}` (both algorithms), seeds {seeds}: {walls} ({rates} "
                f"client-steps/s" + (f"; {min(busy):.2f}-{max(busy):.2f} of {calls[0]['cores']} cores busy" if busy else "")
                + f"; {' or '.join(map(str, nodes))} multi-client nodes), as fedmeta-sim's last line gives it (from after the "
                "data check to the end; its `usage-*.json`).", ""]
    commits = sorted({(r["provenance"]["git"].get("commit") or "?")[:7] for r in runs})
    line = f"Runs: {describe(runs[0]['provenance'])}"
    if len(commits) > 1:
        line += f" (the runs span commits {', '.join(commits)})"
    out.append(line + ".")
    return "\n".join(out) + "\n"


def _round_numbers(obj: dict[str, Any]) -> dict[Any, Any]:
    """``round_seconds`` maps round numbers, which JSON keeps as strings, back to ints (as the report had them)."""
    if isinstance(obj.get("round_seconds"), dict):
        obj["round_seconds"] = {int(k): v for k, v in obj["round_seconds"].items()}
    return obj


def render_bench_scale(path: Path) -> str:
    from fedmeta.provenance import describe

    bench = _load_module("bench_scale", ROOT / "bench" / "bench_scale.py")
    report = json.loads(path.read_text(), object_hook=_round_numbers)
    return (f"```text\n{bench.table(report)}\n\ntotal wall time {report['wall_s']:.0f} s\n```\n\n"
            f"Run: {describe(report['provenance'])}.\n")


def render_bench_default_run(path: Path) -> str:
    from fedmeta.provenance import describe

    bench = _load_module("bench_default_run", ROOT / "bench" / "bench_default_run.py")
    report = json.loads(path.read_text())
    flags = " ".join(report["fedmeta_sim_flags"]) or "(none: every default)"
    return (f"```text\n{bench.table(report)}\n```\n\nfedmeta-sim flags besides each layout's: {flags}. "
            f"Run: {describe(report['provenance'])}.\n")


def render_bench_peers(path: Path) -> str:
    from fedmeta.provenance import describe

    bench = _load_module("bench_peers", ROOT / "bench" / "bench_peers.py")
    report = json.loads(path.read_text(), object_hook=_round_numbers)
    versions = report["repeats"][0]["pfl"]["versions"]
    return (f"```text\n{bench.table(report)}\n\ntotal wall time {report['wall_s']:.0f} s\n```\n\n"
            f"Run: {describe(report['provenance'])}; pfl-research {versions['pfl']} (torch {versions['torch']}).\n")


RENDERERS: dict[str, Callable[[Path], str]] = {DEFAULT_RUN: render_default_run, BENCH_SCALE: render_bench_scale,
                                               BENCH_DEFAULT_RUN: render_bench_default_run, BENCH_PEERS: render_bench_peers}


def render_missing_bench(source: str) -> str:
    """The block of a benchmark whose report is not kept yet: how to make one."""
    name = next(k for k, v in BENCHES.items() if v == source)
    target = "make bench" if name == "scale" else f"make bench-{name}"
    script = Path(source).name
    return (f"No full run's report is kept yet: run `{target}` on a quiet machine, then "
            f"`python scripts/docs_results.py ingest-bench {name} bench/results/{script}`.\n")


def render_section(path: Path, heading: str) -> str:
    """The line of ``path`` that starts with ``heading`` and the markdown list that follows it (``SOURCE#heading``)."""
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(heading)), None)
    if start is None:
        raise ValueError(f"{path}: no line starting with {heading!r}")
    out, seen_item = [lines[start], ""], False
    for ln in lines[start + 1:]:
        if ln.startswith("- ") or (seen_item and ln.startswith("  ")):
            out.append(ln)
            seen_item = True
        elif ln.strip() or seen_item:
            break
    if not seen_item:
        raise ValueError(f"{path}: no list after {heading!r}")
    return "\n".join(out) + "\n"


def render(source: str, root: Path = ROOT) -> str:
    source, _, heading = source.partition("#")
    path = root / source
    if heading:
        return render_section(path, heading)
    if source in BENCHES.values() and not path.exists():
        return render_missing_bench(source)
    if source in RENDERERS:
        return RENDERERS[source](path)
    if source.startswith("docs/results/") and source.endswith("/summary.md"):
        return render_reproduction(path)
    raise ValueError(f"no renderer for the source {source!r}")


def regenerate(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked block replaced by what its source renders to."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("source"), root) + m.group(4), text)


def drift(root: Path = ROOT, docs: Sequence[str] = DOCS) -> list[str]:
    """A unified diff for every doc whose blocks differ from their sources (empty: all up to date)."""
    diffs = []
    for doc in docs:
        text = (root / doc).read_text()
        new = regenerate(text, root)
        if new != text:
            diffs.append("".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), f"{doc} (as written)",
                                                      f"{doc} (from its sources)")))
    return diffs


# --- ingesting results files ------------------------------------------------------------------------------


def ingest_default_run(paths: Sequence[Path], command: str = "make run") -> dict[str, Any]:
    """The default-run summary from ``make run``'s results files, one per algorithm and seed: every run finished
    (status ok), ran the defaults (``ExperimentConfig()`` but for algorithm and seed; ``num-nodes = -1`` resolved to
    the machine's node count) and the same code. Files named ``usage-*.json`` are fedmeta-sim's figures of one
    invocation (wall time, client-steps/s, busy cores): each must name runs among the others."""
    from fedmeta.simulations.config import AUTO_NODES, ExperimentConfig
    from fedmeta.simulations.run import USAGE_PREFIX

    defaults = ExperimentConfig().to_dict()
    runs, usages, names = [], [], {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        if Path(path).name.startswith(USAGE_PREFIX):
            usages.append((Path(path), res))
            continue
        cfg = res["config"]
        if res.get("status") != "ok":
            raise ValueError(f"{path}: status {res.get('status')!r}, not 'ok': a failed run does not enter the docs")
        auto = defaults["num-nodes"] == AUTO_NODES and isinstance(cfg.get("num-nodes"), int) and cfg["num-nodes"] >= 1
        other = {k: (cfg.get(k), v) for k, v in defaults.items()
                 if k not in ("algorithm", "seed") and cfg.get(k) != v and not (k == "num-nodes" and auto)}
        if other:
            raise ValueError(f"{path}: not the default run; these settings differ (run, default): {other}")
        if "provenance" not in res:
            raise ValueError(f"{path}: no provenance block (written by code before issue 22)")
        names[Path(path).name] = cfg["seed"]
        runs.append({"seed": cfg["seed"], "config": {"algorithm": cfg["algorithm"], "num-rounds": cfg["num-rounds"],
                                                     "num-nodes": cfg["num-nodes"]},
                     "final": {k: v for k, v in res["final"].items() if k.startswith(("accuracy-", "loss-"))},
                     "final_round": res["final_round"], "seconds": res["seconds"], "provenance": res["provenance"]})
    keys = [(r["config"]["algorithm"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two results files for the same algorithm and seed: {sorted(keys)}")
    algorithms, seeds = {k[0] for k in keys}, {k[1] for k in keys}
    if len(keys) != len(algorithms) * len(seeds):
        raise ValueError(f"every algorithm needs every seed: got {sorted(keys)}")
    runs.sort(key=lambda r: (r["seed"], r["config"]["algorithm"] != "local-moml", r["config"]["algorithm"]))  # make run's order
    invocations = []
    for path, u in usages:
        if not u.get("runs") or any(n not in names for n in u["runs"]) or len({names[n] for n in u["runs"]}) != 1:
            raise ValueError(f"{path}: names runs {u.get('runs')} that are not among the results files given (one seed each)")
        invocations.append({"seed": names[u["runs"][0]], "runs": len(u["runs"]),
                            **{k: u[k] for k in ("wall_s", "client_steps", "client_steps_per_s", "busy_cores", "cores")}})
    invocations.sort(key=lambda i: i["seed"])
    return {"command": command, "clients": defaults["num-clients"], "runs": runs, "invocations": invocations}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a block differs from its source")
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("ingest-default-run", help=f"write {DEFAULT_RUN} from make run's results files")
    d.add_argument("results", nargs="+", type=Path)
    b = sub.add_parser("ingest-bench", help="keep a benchmark's report: scale (make bench), default-run (make bench-default-run) "
                                            "or peers (make bench-peers)")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("report", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "ingest-default-run":
        out = ROOT / DEFAULT_RUN
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(ingest_default_run(args.results), indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    elif args.cmd == "ingest-bench":
        report = json.loads(args.report.read_text())
        if "provenance" not in report or report.get("quick") or report.get("smoke"):
            raise SystemExit(f"{args.report}: not a full benchmark report with provenance (a --quick or --smoke run is not kept)")
        out = ROOT / BENCHES[args.name]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out.relative_to(ROOT)}")
    if args.check:
        diffs = drift()
        for diff in diffs:
            sys.stdout.write(diff)
        if diffs:
            print("docs-results: the blocks above differ from their sources; run `make docs-results`", file=sys.stderr)
        return 1 if diffs else 0
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            path.write_text(new)
            print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
