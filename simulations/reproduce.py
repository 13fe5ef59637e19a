"""Reproductions of the papers' experiments, one command each.

``fedmeta-reproduce per-fedavg-fig1 [--quick]`` -- per-fedavg.txt Figure 1 (Section 5): FedAvg,
FedAvg + one adaptation step and Per-FedAvg + one step on the Fallah split (n = 10, MLP 80-60
ELU, alpha = 0.01, beta = 0.001, D = D' = 50, first-order as in eq. 23), for several tau and r.

``fedmeta-reproduce localmoml-table3 [--protocol paper|authors] [--quick]`` -- localmoml Table 3 (Section 6.2) on
Fashion-MNIST: LocalMOML vs Per-FedAvg, n = 50, MLP 40-40. ``paper`` (default): alpha = 0.001, K = K0 = 5,
H in {4, 10}, B' in {1, 5} tasks sampled on each of 4 groups, 5-shot / 10-step evaluation, 150 rounds,
LocalMOML's momentum tuned on the first seed. ``authors``: the authors' released federated settings
(:data:`fedmeta.simulations.reproduce_flower.TABLE3_PROTOCOLS`), 5,000 rounds.

``fedmeta-reproduce localmoml-table2 [--protocol paper|authors|both] [--quick] [--jobs 2]`` -- localmoml Table 2
(Section 6.1): MAML (BSGD), MOML and LocalMOML on 25 sine tasks, K in {1, 3, 5}, 5 seeds, under the paper's protocol
and the authors' released code's, side by side; ``localmoml-table2-ablation`` changes one setting at a time from one
towards the other (:mod:`fedmeta.simulations.reproduce_table2`; the centralized runner).

``fedmeta-reproduce dif-maml-fig2 [--quick] [--jobs 2]`` -- dif-maml.txt Figure 2 (and Figure 6): Dif-MAML
on a graph of 6 sine-regression agents against centralized and non-cooperative agents, Adam and SGD,
and Theorem 1's O(mu^2) disagreement (:mod:`fedmeta.simulations.reproduce_dif`; the vmapped simulator).

``fedmeta-reproduce ggs-fig1 [--quick] [--jobs 2]`` -- multistep-maml-ggs.txt Figure 1 (Section
5.1): rank-one matrix factorization, 10 tasks per iteration, N = 3, alpha = 0.01, outer SGD with
its step size from {0.01, 0.003}, U = 10, delta from {1e-2, 1e-4} for GGS-MAML and ZO-MAML.

``fedmeta-reproduce ggs-fig2 [--quick] [--jobs 2]`` -- multistep-maml-ggs.txt Figure 2 (Section
5.2): sine regression with the 1-40-40-1 ReLU network, 25 tasks per iteration, N = 3, alpha =
1e-4, 10 samples per inner batch and 10 test points, Adam with step size 1e-4, U = 10, delta from
{1e-2, 1e-5, 1e-7}.

Both run MAML (exact), GGS-MAML (ggs), FO-MAML (first_order), ZO-MAML (zeroth_order) and, as an
extra row, FO-MuML (fo-muml Algorithm 3: meta-gradient fo_muml with s = N anchored steps) over
three seeds, pick each algorithm's grid point by its final meta-loss averaged over the seeds and
report the whole grid.

The first two go through Flower's simulation engine (:func:`fedmeta.simulations.run.simulate`;
their grids are in :mod:`fedmeta.simulations.reproduce_flower`); the multistep-maml-ggs figures
(:mod:`fedmeta.simulations.reproduce_ggs`) and localmoml Table 2 through the centralized runner
(:mod:`fedmeta.centralized`, no Flower), ``--jobs`` of them in parallel processes. The summary (markdown)
and the plots (PNG) land in ``--out`` (``docs/results/<name>``), every run's results JSON (and per-client
CSV) in ``--runs`` (``results/reproduce/<name>``); a finished run is reused (:mod:`fedmeta.simulations.runcache`).
The tuning steps of localmoml Tables 2 and 3 (eta, LocalMOML's momentum) are Optuna grid studies kept beside the run
cache (``tuning.journal``; Optuna is the extra ``fedmeta[tune]``), and the summaries list their trials.
This module is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fedmeta import config as C
from fedmeta.centralized import CentralizedConfig, RunResult
from fedmeta.extras import MissingExtra, need
from fedmeta.provenance import provenance
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.reproduce_flower import REPRODUCTIONS, TABLE3_PROTOCOLS, finished_runs, plot, run_key, table3
from fedmeta.simulations.reproduce_ggs import GGS_FIGURES, ggs_figure, plot_meta_loss
from fedmeta.simulations.runcache import CachedRuns, one_thread, runs_line

logger = logging.getLogger("fedmeta")
TUNED = ("localmoml-table2", "localmoml-table3")
"""Reproductions with a tuning step (an Optuna grid study, :func:`fedmeta.simulations.tune_report.grid_choice`)."""
TUNING_JOURNAL = "tuning.journal"
"""Beside a reproduction's run cache: the Optuna journal of its tuning studies (which trials ran, with their values)."""


def _describe_centralized(cfg: CentralizedConfig, res: RunResult) -> str:
    state = f"diverged at iteration {res.diverged_at}" if res.diverged_at is not None else f"final meta-loss {res.final_meta_loss:.5g}"
    return (f"{cfg.algorithm} {cfg.meta_gradient} K={cfg.batch_size} meta-lr={cfg.meta_lr:g} delta={cfg.delta:g} seed={cfg.seed}: "
            f"{state}")


def _main_centralized(args: argparse.Namespace) -> int:
    from fedmeta.centralized import train

    protocol = args.protocol if args.name == "localmoml-table2" and args.protocol != "both" else ""  # one protocol only
    tag = args.name + (f"-{protocol}" if protocol else "") + ("-quick" if args.quick else "")
    out = Path(args.out) / tag
    out.mkdir(parents=True, exist_ok=True)
    one_thread()
    # Table 2 and its ablation share one cache: the ablation's first row is the table's authors' runs
    cache = "localmoml-table2" + ("-quick" if args.quick else "") if args.name.startswith("localmoml-table2") else tag
    run_all = CachedRuns(Path(args.runs) / cache, args.jobs, train, RunResult.from_dict, _describe_centralized)

    started, t0 = time.time(), time.perf_counter()
    if args.name.startswith("localmoml-table2"):
        from fedmeta.simulations import reproduce_table2 as t2

        if args.name == "localmoml-table2":
            protocols = [t2.PROTOCOLS[p] for p in (t2.PROTOCOLS if args.protocol == "both" else (args.protocol,))]
            budget = t2.BUDGETS["quick" if args.quick else "full"]
            table, grid = t2.table2(protocols, budget, run_all, t2.load_authors_code(Path(args.out) / "localmoml-table2" / t2.AUTHORS_CODE),
                                    journal=Path(args.runs) / cache / TUNING_JOURNAL)
            summary = t2.describe_setting(budget, protocols) + "\n\n" + table
        else:
            table, grid = t2.ablation(t2.BUDGETS["quick" if args.quick else "ablation"], run_all)
            summary = table
        figures = t2.plot(grid, out) if args.name == "localmoml-table2" else []
    else:
        fig = GGS_FIGURES[args.name]
        summary, best, grid = ggs_figure(fig, fig.quick if args.quick else fig.full, run_all)
        figures = plot_meta_loss(best, grid, out)
    minutes = (time.perf_counter() - t0) / 60
    run_minutes = sum(r.seconds for rs in grid.values() for r in rs) / 60
    command = (f"fedmeta-reproduce {args.name}" + (f" --protocol {protocol}" if protocol else "") + (" --quick" if args.quick else "")
               + (f" --jobs {args.jobs}" if args.jobs > 1 else ""))
    count, reused = run_all.count, run_all.reused
    text = f"## {args.name}{' (quick budget)' if args.quick else ''}\n\n`{command}`: {count} runs"
    if reused == count:
        text += ", all reused from an earlier invocation"
    else:
        text += f", {minutes:.1f} min wall time" + (f" ({args.jobs} processes in parallel)" if args.jobs > 1 else "")
        text += f" for the {count - reused} not reused from an earlier invocation" if reused else ""
    text += f"; the runs' own wall times add up to {run_minutes:.1f} min"
    text += f".\n\n{summary}"
    text += "\n" + runs_line(provenance({"name": args.name, "quick": bool(args.quick), "jobs": args.jobs}, started=started), count, reused)
    text += "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    (out / "summary.md").write_text(text)
    print()
    print(text)
    return 0


class _Stop(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta-reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("name", choices=sorted([*REPRODUCTIONS, *GGS_FIGURES, "localmoml-table2", "localmoml-table2-ablation", "dif-maml-fig2"]))
    p.add_argument("--protocol", choices=("paper", "authors", "both"), default=None,
                   help="localmoml-table2: Section 6.1 as written, the authors' released code's choices, or both side by side (default); "
                        "localmoml-table3: the paper's stated settings at fedmeta's budget (default) or the authors' federated settings")
    p.add_argument("--quick", action="store_true", help="a reduced budget that finishes in under 10 minutes on 2 cores (ggs-*: under a minute)")
    p.add_argument("--out", default="docs/results", help="where the summary and plots go (default: docs/results/<name>)")
    p.add_argument("--runs", default="results/reproduce", help="where every run's results go (default: results/reproduce/<name>)")
    p.add_argument("--jobs", type=int, default=1, help="ggs-*, localmoml-table2, dif-maml-fig2: runs in parallel processes, one thread each (default: 1)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be an integer >= 1, got {args.jobs}")
    if args.protocol is not None and args.name not in ("localmoml-table2", "localmoml-table3"):
        p.error("--protocol is for localmoml-table2 and localmoml-table3 only")
    if args.protocol == "both" and args.name == "localmoml-table3":
        p.error("--protocol for localmoml-table3 is paper or authors (one summary each)")
    args.protocol = args.protocol or ("both" if args.name == "localmoml-table2" else "paper")
    if args.name in TUNED:  # its tuning steps are Optuna studies: without Optuna, one line before any work
        try:
            need("tune", f"fedmeta-reproduce {args.name} tunes on a grid and")
        except MissingExtra as err:
            print(f"fedmeta-reproduce: error: {err}", file=sys.stderr)
            return 2
    if args.name in GGS_FIGURES or args.name.startswith("localmoml-table2"):
        return _main_centralized(args)
    if args.name == "dif-maml-fig2":
        from fedmeta.simulations.reproduce_dif import main_dif

        return main_dif(args)
    experiment, full, quick = REPRODUCTIONS[args.name]
    authors = args.name == "localmoml-table3" and args.protocol == "authors"
    if authors:
        t3 = TABLE3_PROTOCOLS["authors"]
        experiment, full, quick = functools.partial(table3, protocol=t3), t3.full, t3.quick
    budget = quick if args.quick else full
    tag = args.name + ("-authors" if authors else "") + ("-quick" if args.quick else "")
    out, runs_dir = Path(args.out) / tag, Path(args.runs) / tag
    if args.name == "localmoml-table3":
        experiment = functools.partial(experiment, journal=runs_dir / TUNING_JOURNAL)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, stream=sys.stdout)

    from fedmeta.simulations.run import data_key, check_all, report_failure, resolve_nodes, simulate

    count = reused = 0
    checked: set[tuple] = set()
    finished = finished_runs(runs_dir)

    def run(cfg: ExperimentConfig) -> dict[str, Any]:
        nonlocal count, reused
        count += 1
        t0 = time.perf_counter()
        cfg = resolve_nodes(cfg)  # num-nodes = -1 as simulate() resolves it: its results record the resolved config
        key = run_key(cfg)
        if key in finished:  # the same run finished before: reuse it (an interrupted command resumes)
            res, how = finished[key], "reused"
            reused += 1
        else:
            if data_key(cfg) not in checked:  # data and model, in this process, before this run's Ray starts
                if not check_all([cfg], "fedmeta-reproduce"):
                    raise _Stop(2)
                checked.add(data_key(cfg))
            run_dir = runs_dir / hashlib.sha1(key.encode()).hexdigest()[:12]
            res, how = simulate(cfg.replace(results_dir=str(run_dir)), check=False), "ran"
            if res["status"] != "ok":  # a failed run must not enter a figure
                report_failure(res, "fedmeta-reproduce")
                raise _Stop(1)
        print(f"[{count}] {cfg.algorithm} H/tau={cfg.local_steps} B={cfg.clients_per_round} momentum={cfg.momentum} seed={cfg.seed}: "
              f"acc before {res['final'].get(C.ACC_BEFORE, float('nan')):.4f} after {res['final'].get(C.ACC_AFTER, float('nan')):.4f} "
              f"({how}, {time.perf_counter() - t0:.0f} s)", flush=True)
        return res

    started, t0 = time.time(), time.perf_counter()
    try:
        summary, runs = experiment(budget, run)
    except _Stop as stop:  # bad inputs (2) or a run that failed (1), already reported in one place
        return stop.code
    minutes = (time.perf_counter() - t0) / 60
    figures = plot(runs, out)
    command = f"fedmeta-reproduce {args.name}" + (" --protocol authors" if authors else "") + (" --quick" if args.quick else "")
    text = f"## {tag.removesuffix('-quick')}{' (quick budget)' if args.quick else ''}\n\n`{command}`: {count} simulations"
    if reused == count:
        text += ", all reused from an earlier invocation"
    else:
        text += f", {minutes:.1f} min wall time" + (f" for the {count - reused} not reused from an earlier, interrupted invocation" if reused else "")
    run_minutes = sum(float(r.get("seconds", 0.0)) for rs in runs.values() for r in rs) / 60
    text += f"; the runs' own wall times add up to {run_minutes:.1f} min"
    block = provenance({"name": args.name, **({"protocol": "authors"} if authors else {}), "quick": bool(args.quick),
                        **dataclasses.asdict(budget)}, started=started)
    text += f".\n\n{summary}"
    text += "\n" + runs_line(block, count, reused)
    text += "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    (out / "summary.md").write_text(text)
    runs_dir.mkdir(parents=True, exist_ok=True)
    index = {"runs": {k: [r["path"] for r in v] for k, v in runs.items()}, "provenance": block}
    (runs_dir / "runs.json").write_text(json.dumps(index, indent=1))
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
