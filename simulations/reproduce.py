"""Reproductions of the papers' experiments, one command each.

``fedmeta-reproduce per-fedavg-fig1 [--quick]`` -- per-fedavg.txt Figure 1 (Section 5): FedAvg,
FedAvg + one adaptation step and Per-FedAvg + one step on the Fallah split (n = 10, MLP 80-60
ELU, alpha = 0.01, beta = 0.001, D = D' = 50, first-order as in eq. 23), for several tau and r.

``fedmeta-reproduce localmoml-table3 [--quick]`` -- localmoml Table 3 (Section 6.2) on
Fashion-MNIST: LocalMOML vs Per-FedAvg, n = 50, MLP 40-40, alpha = 0.001, K = K0 = 5,
H in {4, 10}, B' in {1, 5} tasks sampled on each of 4 groups, 5-shot / 10-step evaluation,
LocalMOML's momentum tuned on the first seed.

Every run goes through Flower's simulation engine (:func:`fedmeta.simulations.run.simulate`).
The summary (markdown) and the plots (PNG) land in ``--out`` (``docs/results/<name>``), every
run's results JSON and per-client CSV in ``--runs`` (``results/reproduce/<name>``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fedmeta import config as C
from fedmeta.simulations.config import ExperimentConfig

logger = logging.getLogger("fedmeta")


@dataclass(frozen=True)
class Budget:
    rounds: int
    evaluate_every: int
    seeds: tuple[int, ...]
    cells: tuple[tuple[int, int], ...]
    """(local steps, clients per round or per group) combinations."""
    momenta: tuple[float, ...] = (0.5,)
    """LocalMOML momentum candidates, tuned on the first seed."""


def _mean_std(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64) * 100
    return f"{v.mean():.2f} ± {v.std():.2f}"


def _acc(res: dict[str, Any], key: str) -> float:
    return float(res["final"][key])


# --------------------------------------------------------------------------------------------
# per-fedavg.txt Figure 1

FIG1_BASE = ExperimentConfig(
    dataset="fashion-mnist", num_clients=10, a_train=68, a_test=34, model="mlp-80-60-elu", inner_lr=0.01,
    meta_lr=0.001, lr=0.001, batch_size=50, meta_gradient="first_order", eval_protocol="one-step",
)  # fmt: skip
FIG1_FULL = Budget(rounds=1000, evaluate_every=100, seeds=(0, 1, 2), cells=((10, 2), (10, 5), (4, 2)))
FIG1_QUICK = Budget(rounds=150, evaluate_every=50, seeds=(0, 1, 2), cells=((10, 5),))


def fig1(budget: Budget, run: Callable[[ExperimentConfig], dict[str, Any]]) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Run the Figure 1 grid; return the markdown summary and the runs by label."""
    runs: dict[str, list[dict[str, Any]]] = {}
    lines = [
        "| tau | r (B of n=10) | FedAvg | FedAvg + 1 step | Per-FedAvg + 1 step | ordering PF+1 > FA+1 > FA |",
        "|---|---|---|---|---|---|",
    ]
    for tau, b in budget.cells:
        label = f"tau={tau}, r={b / FIG1_BASE.num_clients:g}"
        for algo in (C.FEDAVG, C.PER_FEDAVG):
            runs[f"{algo} ({label})"] = [
                run(FIG1_BASE.replace(algorithm=algo, local_steps=tau, clients_per_round=b, seed=s, num_rounds=budget.rounds,
                                      evaluate_every=budget.evaluate_every))
                for s in budget.seeds
            ]
        fa = [_acc(r, C.ACC_BEFORE) for r in runs[f"{C.FEDAVG} ({label})"]]
        fa1 = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.FEDAVG} ({label})"]]
        pf1 = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.PER_FEDAVG} ({label})"]]
        holds = np.mean(pf1) > np.mean(fa1) > np.mean(fa)
        lines.append(f"| {tau} | {b / 10:g} ({b}) | {_mean_std(fa)} | {_mean_std(fa1)} | {_mean_std(pf1)} | {'holds' if holds else 'does not hold'} |")
    head = (f"Fashion-MNIST, Fallah split n=10 (a=68 train / 34 test), MLP 784-80-60-10 ELU, alpha=0.01, beta=0.001, "
            f"D=D'=50, first-order, {budget.rounds} rounds, seeds {list(budget.seeds)}; accuracy (%) mean ± std over seeds "
            f"of the mean over the 10 clients.")
    return head + "\n\n" + "\n".join(lines) + "\n", runs


# --------------------------------------------------------------------------------------------
# localmoml Table 3

TABLE3_BASE = ExperimentConfig(
    dataset="fashion-mnist", num_clients=50, a_train=68, a_test=34, model="mlp-40-40", inner_lr=0.001, batch_size=5,
    init_batch_size=5, meta_lr=0.05, lr=0.05, meta_gradient="exact", sampling_groups=4, eval_protocol="5-shot-10-step",
)  # fmt: skip
TABLE3_FULL = Budget(rounds=150, evaluate_every=50, seeds=(0, 1, 2), cells=((4, 1), (4, 5), (10, 1), (10, 5)), momenta=(0.1, 0.5, 0.9))
TABLE3_QUICK = Budget(rounds=100, evaluate_every=50, seeds=(0, 1, 2), cells=((4, 5),), momenta=(0.5,))


def table3(budget: Budget, run: Callable[[ExperimentConfig], dict[str, Any]]) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Run the Table 3 grid; LocalMOML's momentum is chosen on the first seed's final accuracy."""
    runs: dict[str, list[dict[str, Any]]] = {}
    lines = ["| H | B' per group (B) | Per-FedAvg | LocalMOML | momentum | LocalMOML ahead |", "|---|---|---|---|---|---|"]
    first, rest = budget.seeds[0], budget.seeds[1:]
    for h, bp in budget.cells:
        label = f"H={h}, B'={bp}"
        cfg = TABLE3_BASE.replace(local_steps=h, clients_per_round=bp, num_rounds=budget.rounds, evaluate_every=budget.evaluate_every)
        runs[f"{C.PER_FEDAVG} ({label})"] = [run(cfg.replace(algorithm=C.PER_FEDAVG, seed=s)) for s in budget.seeds]
        tuning = {m: run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=m, seed=first)) for m in budget.momenta}
        best = max(tuning, key=lambda m: _acc(tuning[m], C.ACC_AFTER))
        runs[f"{C.LOCAL_MOML} ({label})"] = [tuning[best]] + [run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=best, seed=s)) for s in rest]
        pf = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.PER_FEDAVG} ({label})"]]
        lm = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.LOCAL_MOML} ({label})"]]
        lines.append(f"| {h} | {bp} ({4 * bp}) | {_mean_std(pf)} | {_mean_std(lm)} | {best:g} of {list(budget.momenta)} | "
                     f"{'yes' if np.mean(lm) > np.mean(pf) else 'no'} |")
    head = (f"Fashion-MNIST, Fallah split n=50 (a=68 / 34), MLP 784-40-40-10, alpha=0.001, K=K0=5, step size 0.05 (LocalMOML eta, Per-FedAvg beta), exact Hessian, "
            f"4 groups sampling B' clients each, 5-shot / 10-step evaluation, {budget.rounds} rounds, seeds {list(budget.seeds)}; "
            f"accuracy (%) mean ± std over seeds of the mean over the 50 clients.")
    return head + "\n\n" + "\n".join(lines) + "\n", runs


REPRODUCTIONS = {
    "per-fedavg-fig1": (fig1, FIG1_FULL, FIG1_QUICK),
    "localmoml-table3": (table3, TABLE3_FULL, TABLE3_QUICK),
}


# --------------------------------------------------------------------------------------------
# plots


def _seed_mean(evals: list[dict[int, Any]], rounds: list[int], key: str) -> np.ndarray:
    """``key`` per evaluation round, averaged over seeds."""
    return np.mean([[ev[k][key] for k in rounds] for ev in evals], axis=0)


def plot(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """Accuracy vs round (mean over seeds) and the per-client accuracy distribution after adaptation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for label, rs in runs.items():
        evals = [{int(k): v for k, v in r["evaluate"].items()} for r in rs]
        rounds = sorted(evals[0])
        ax.plot(rounds, _seed_mean(evals, rounds, C.ACC_AFTER), marker="o", label=f"{label} + adaptation")
        if label.startswith(C.FEDAVG):
            ax.plot(rounds, _seed_mean(evals, rounds, C.ACC_BEFORE), linestyle="--", marker=".", label=f"{label}, no adaptation")
    ax.set(xlabel="round", ylabel="personalized test accuracy (mean over clients and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    curves = out / "accuracy_vs_round.png"
    fig.tight_layout()
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    data = [[float(m[C.ACC_AFTER]) for r in rs for m in r["clients"].values()] for rs in runs.values()]
    ax.boxplot(data)
    ax.set_xticks(range(1, len(runs) + 1), list(runs), rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="test accuracy after adaptation, per client (all seeds)")
    ax.grid(alpha=0.3)
    dist = out / "client_accuracy_distribution.png"
    fig.tight_layout()
    fig.savefig(dist, dpi=120)
    plt.close(fig)
    return [curves, dist]


def _run_key(cfg: ExperimentConfig) -> str:
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "results-dir"}, sort_keys=True)


def _finished_runs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Results already in ``runs_dir``, keyed by their configuration (without the results directory)."""
    found = {}
    for path in sorted(runs_dir.glob("*/*.json")):
        res = json.loads(path.read_text())
        if isinstance(res, dict) and "config" in res and "final" in res:
            res["path"] = str(path)
            found[_run_key(ExperimentConfig.from_mapping(res["config"]))] = res
    return found


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmeta-reproduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("name", choices=sorted(REPRODUCTIONS))
    p.add_argument("--quick", action="store_true", help="a reduced budget that finishes in under 10 minutes on 2 cores")
    p.add_argument("--out", default="docs/results", help="where the summary and plots go (default: docs/results/<name>)")
    p.add_argument("--runs", default="results/reproduce", help="where every run's results go (default: results/reproduce/<name>)")
    args = p.parse_args(argv)
    experiment, full, quick = REPRODUCTIONS[args.name]
    budget = quick if args.quick else full
    tag = args.name + ("-quick" if args.quick else "")
    out, runs_dir = Path(args.out) / tag, Path(args.runs) / tag
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, stream=sys.stdout)

    from fedmeta.simulations.run import simulate

    count = reused = 0
    finished = _finished_runs(runs_dir)

    def run(cfg: ExperimentConfig) -> dict[str, Any]:
        nonlocal count, reused
        count += 1
        t0 = time.perf_counter()
        key = _run_key(cfg)
        if key in finished:  # the same run finished before: reuse it (an interrupted command resumes)
            res, how = finished[key], "reused"
            reused += 1
        else:
            run_dir = runs_dir / hashlib.sha1(key.encode()).hexdigest()[:12]
            res, how = simulate(cfg.replace(results_dir=str(run_dir))), "ran"
        print(f"[{count}] {cfg.algorithm} H/tau={cfg.local_steps} B={cfg.clients_per_round} momentum={cfg.momentum} seed={cfg.seed}: "
              f"acc before {res['final'].get(C.ACC_BEFORE, float('nan')):.4f} after {res['final'].get(C.ACC_AFTER, float('nan')):.4f} "
              f"({how}, {time.perf_counter() - t0:.0f} s)", flush=True)
        return res

    t0 = time.perf_counter()
    summary, runs = experiment(budget, run)
    minutes = (time.perf_counter() - t0) / 60
    figures = plot(runs, out)
    command = f"fedmeta-reproduce {args.name}" + (" --quick" if args.quick else "")
    text = f"## {args.name}{' (quick budget)' if args.quick else ''}\n\n`{command}`: {count} simulations, {minutes:.1f} min wall time"
    text += f" for the {count - reused} not reused from an earlier, interrupted invocation" if reused else ""
    text += f".\n\n{summary}"
    text += "\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
    (out / "summary.md").write_text(text)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "runs.json").write_text(json.dumps({k: [r["path"] for r in v] for k, v in runs.items()}, indent=1))
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
