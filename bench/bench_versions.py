"""Two versions of fedmeta side by side (``make bench-versions OLD=<commit>``): is this checkout slower than an older one?

Runs benchmark scripts (``bench_default_run.py``, ``bench_peers.py``, ``bench_single_step.py``) of this checkout and of ``OLD`` in turn, repeat by
repeat (old then new, then new then old, ...: the machine's drifts hit both alike), each version from its own tree and its own
interpreter, and prints every rate of the new version over the old one's, per repeat and their median.

``OLD`` is checked out as a git worktree under ``build/versions/<commit>`` with a venv of its own that installs only
fedmeta (editable, from that tree) and reads every other package from this checkout's venv, so both versions run the
same torch, Flower and Ray. Usage::

    .venv/bin/python bench/bench_versions.py OLD [--bench default-run --bench peers] [--repeats 2]
        [--default-run-args "-- --num-rounds 200"] [--peers-args "--repeats 1 --rounds 4"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import timing  # bench/timing.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "bench_versions.json"


def _rates_default_run(report: dict[str, Any]) -> dict[str, float]:
    rates = {f"{r['layout']}: client-steps/s": r["client_steps_per_s"] for r in report["rows"]}
    first = report["rows"][0]["client_steps_per_s"]
    rates.update({f"{r['layout']} / {report['rows'][0]['layout']}": r["client_steps_per_s"] / first for r in report["rows"][1:]})
    return rates


def _rates_peers(report: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in report["medians"].items() if v is not None}


def _rates_single_step(report: dict[str, Any]) -> dict[str, float]:
    return {f"{cell}: steps/s": 1000.0 / t["min_ms"] for cell, t in report["ms"].items()}


BENCHES: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, float]]]] = {
    "default-run": ("bench_default_run.py", _rates_default_run),
    "peers": ("bench_peers.py", _rates_peers),
    "single-step": ("bench_single_step.py", _rates_single_step),
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def old_version(commit: str) -> tuple[Path, Path]:
    """``commit``'s tree (a detached worktree under build/versions) and its interpreter, made on first use."""
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"bench_versions: {commit!r} is not a commit of this repository (give a commit, branch or tag)") from None
    tree = ROOT / "build" / "versions" / sha[:12]
    if not tree.exists():
        _git("worktree", "add", "--detach", str(tree), sha)
    python = tree / ".venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tree / ".venv")], check=True)  # pip, setuptools: shared
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        Path(purelib, "_shared_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # torch, flwr, ray, ...
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(tree)], check=True)
    return tree, python


def run(old: str, benches: Sequence[str], repeats: int, extra: dict[str, list[str]], progress: Callable[[str], None]) -> dict:
    versions = {"old": old_version(old), "new": (ROOT, Path(sys.executable))}
    report: dict[str, Any] = {"old": _git("rev-parse", old), "new": _git("rev-parse", "HEAD"), "repeats": []}
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        for i in range(1, repeats + 1):
            rep: dict[str, Any] = {}
            for bench in benches:
                script, rates = BENCHES[bench]
                sides = list(versions.items())
                for side, (tree, python) in (sides if i % 2 else sides[::-1]):  # old first, then new first: drifts cancel
                    progress(f"[repeat {i}/{repeats}] {bench}, {side} version")
                    out = Path(tmp) / f"{bench}-{side}-{i}.json"
                    argv = [str(python), str(tree / "bench" / script), "--out", str(out), *extra[bench]]
                    proc = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{bench} ({side}) exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                    rep[f"{bench} {side}"] = rates(json.loads(out.read_text()))
                rep[f"{bench} new / old"] = {k: v / rep[f"{bench} old"][k] for k, v in rep[f"{bench} new"].items()
                                             if rep[f"{bench} old"].get(k)}
            report["repeats"].append(rep)
    report["medians"] = {f"{bench} new / old": {k: statistics.median(r[f"{bench} new / old"][k] for r in report["repeats"])
                                                for k in report["repeats"][0][f"{bench} new / old"]} for bench in benches}
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"new {report['new'][:12]} over old {report['old'][:12]} (median of {len(report['repeats'])} interleaved repeats; "
             "> 1: the new version is faster, or its ratio larger)"]
    for bench, ratios in report["medians"].items():
        lines.append(f"  {bench}")
        lines += [f"    {k:<58} {v:6.3f}  (per repeat: {', '.join(f'{r[bench][k]:.3f}' for r in report['repeats'])})"
                  for k, v in ratios.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the older commit (or branch, tag)")
    p.add_argument("--bench", action="append", choices=sorted(BENCHES), help="benchmarks to run (default: all)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    for bench in BENCHES:
        p.add_argument(f"--{bench}-args", default="", help=f"arguments of {BENCHES[bench][0]}, one shell-quoted string")
    p.add_argument("--out", type=Path, default=RESULTS_PATH, help=f"where to write the JSON (default: {RESULTS_PATH})")
    args = p.parse_args(argv)
    extra = {b: shlex.split(getattr(args, f"{b.replace('-', '_')}_args")) for b in BENCHES}
    started = time.time()
    report = run(args.old, args.bench or sorted(BENCHES), args.repeats, extra, lambda m: print(m, file=sys.stderr, flush=True))
    return timing.finish(report, args, started, table)


if __name__ == "__main__":
    raise SystemExit(main())
