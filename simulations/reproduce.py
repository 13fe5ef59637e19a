"""Reproductions of the papers' experiments, one command each.

``fedmeta-reproduce per-fedavg-fig1 [--quick]`` -- per-fedavg.txt Figure 1 (Section 5): FedAvg,
FedAvg + one adaptation step and Per-FedAvg + one step on the Fallah split (n = 10, MLP 80-60
ELU, alpha = 0.01, beta = 0.001, D = D' = 50, first-order as in eq. 23), for several tau and r.

``fedmeta-reproduce localmoml-table3 [--protocol paper|authors] [--quick]`` -- localmoml Table 3 (Section 6.2) on
Fashion-MNIST: LocalMOML vs Per-FedAvg, n = 50, MLP 40-40. ``paper`` (default): alpha = 0.001, K = K0 = 5,
H in {4, 10}, B' in {1, 5} tasks sampled on each of 4 groups, 5-shot / 10-step evaluation, 150 rounds,
LocalMOML's momentum tuned on the first seed. ``authors``: the authors' released federated settings
(:data:`TABLE3_PROTOCOLS`), 5,000 rounds.

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

The first two go through Flower's simulation engine (:func:`fedmeta.simulations.run.simulate`);
the last two through the centralized runner (:mod:`fedmeta.centralized`, no Flower), ``--jobs``
of them in parallel processes. The summary (markdown) and the plots (PNG) land in ``--out``
(``docs/results/<name>``), every run's results JSON (and per-client CSV) in ``--runs``
(``results/reproduce/<name>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fedmeta import config as C
from fedmeta import meta
from fedmeta.centralized import CentralizedConfig, RunResult
from fedmeta.provenance import RUNS_PREFIX, describe, provenance
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
    num_nodes=0,  # one client per node: the layout docs/results' summaries were measured with
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
    num_nodes=0,  # one client per node: the layout docs/results' summaries were measured with
)  # fmt: skip
TABLE3_FULL = Budget(rounds=150, evaluate_every=50, seeds=(0, 1, 2), cells=((4, 1), (4, 5), (10, 1), (10, 5)), momenta=(0.1, 0.5, 0.9))
TABLE3_QUICK = Budget(rounds=100, evaluate_every=50, seeds=(0, 1, 2), cells=((4, 5),), momenta=(0.5,))


@dataclass(frozen=True)
class Table3Protocol:
    """The settings of one protocol of Table 3 and its budgets."""

    base: ExperimentConfig
    setting: str
    """The settings, as the summary's first line states them (the budget's rounds and seeds follow)."""
    full: Budget
    quick: Budget


TABLE3_PROTOCOLS = {
    "paper": Table3Protocol(
        TABLE3_BASE,
        "Fashion-MNIST, Fallah split n=50 (a=68 / 34), MLP 784-40-40-10, alpha=0.001, K=K0=5, step size 0.05 (LocalMOML eta, "
        "Per-FedAvg beta), exact Hessian, 4 groups sampling B' clients each, 5-shot / 10-step evaluation",
        TABLE3_FULL, TABLE3_QUICK),
    # The localmoml authors' released code, GitHub bokun-wang/moml, federated/: run.sh (--total_iters=5000 --update_lr=0.01
    # --meta_lr=0.01 --beta=0.7 --ft_lr=0.001 --H=4 --num_tasks=5 on 4 workers) and train.py (first-order gradients, the same
    # k_spt=5 support and k_qry=10 query points in all H steps of a round, the memory rebuilt each round from one step on
    # its own support batch, update_lr and meta_lr divided by 10 at 50 % and 75 % of the iterations); mnist10.py's a=168;
    # models.py's NeuralNetwork (ELU, no biases, Xavier-normal weights).
    # Per-FedAvg is the same code with beta = 1, which is fedmeta's Per-FedAvg with beta (meta-lr) = eta.
    "authors": Table3Protocol(
        TABLE3_BASE.replace(a_train=168, model="moml-mlp-40-40", inner_lr=0.01, lr=0.01, meta_lr=0.01, meta_gradient="first_order", outer_batch_size=10,
                            batch_draws="per-round", memory_policy="reset", eval_lr=0.001, lr_decay_at="0.5,0.75",
                            num_nodes=-1),  # the default multi-client nodes
        "Fashion-MNIST, Fallah split n=50 (a=168 / 34), the localmoml authors' federated settings: MLP 784-40-40-10 ELU "
        "without biases, "
        "alpha=0.01, eta (LocalMOML) = beta (Per-FedAvg) = 0.01, both divided by 10 at 50 % and 75 % of the rounds, "
        "LocalMOML beta 0.7, first order, 5 support / 10 query points per client drawn once per round, memory rebuilt every "
        "round from K0=5, 4 groups sampling B' clients each, evaluation 5-shot / 10 steps at 0.001",
        Budget(rounds=5000, evaluate_every=250, seeds=(0, 1, 2), cells=((4, 5),), momenta=(0.7,)),
        Budget(rounds=500, evaluate_every=250, seeds=(0, 1, 2), cells=((4, 5),), momenta=(0.7,))),
}
"""``fedmeta-reproduce localmoml-table3 --protocol paper|authors``: the paper's stated settings at fedmeta's budget, and
the authors' released code's (their budget, step sizes, schedule, batches and fine-tuning step)."""


def _bands(pf: Sequence[float], lm: Sequence[float]) -> str:
    """Whether LocalMOML is ahead of Per-FedAvg, judged by the seed bands (mean ± std over seeds)."""
    a, b = np.asarray(pf), np.asarray(lm)
    if b.mean() - b.std() > a.mean() + a.std():
        return "yes, beyond the seed bands"
    if b.mean() + b.std() < a.mean() - a.std():
        return "no: behind, beyond the seed bands"
    return f"{'ahead' if b.mean() > a.mean() else 'behind'} within the seed bands"


def table3(budget: Budget, run: Callable[[ExperimentConfig], dict[str, Any]],
           protocol: Table3Protocol = TABLE3_PROTOCOLS["paper"]) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Run the Table 3 grid of ``protocol``; LocalMOML's momentum is chosen on the first seed's final accuracy."""
    runs: dict[str, list[dict[str, Any]]] = {}
    lines = ["| H | B' per group (B) | Per-FedAvg | LocalMOML | LocalMOML - Per-FedAvg, same seed | momentum | LocalMOML ahead | "
             "s per run |", "|---|---|---|---|---|---|---|---|"]
    first, rest = budget.seeds[0], budget.seeds[1:]
    for h, bp in budget.cells:
        label = f"H={h}, B'={bp}"
        cfg = protocol.base.replace(local_steps=h, clients_per_round=bp, num_rounds=budget.rounds, evaluate_every=budget.evaluate_every)
        runs[f"{C.PER_FEDAVG} ({label})"] = [run(cfg.replace(algorithm=C.PER_FEDAVG, seed=s)) for s in budget.seeds]
        tuning = {m: run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=m, seed=first)) for m in budget.momenta}
        best = max(tuning, key=lambda m: _acc(tuning[m], C.ACC_AFTER))
        runs[f"{C.LOCAL_MOML} ({label})"] = [tuning[best]] + [run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=best, seed=s)) for s in rest]
        pf = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.PER_FEDAVG} ({label})"]]
        lm = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.LOCAL_MOML} ({label})"]]
        seconds = [float(r.get("seconds", math.nan)) for key in (f"{C.PER_FEDAVG} ({label})", f"{C.LOCAL_MOML} ({label})")
                   for r in runs[key]]
        lines.append(f"| {h} | {bp} ({4 * bp}) | {_mean_std(pf)} | {_mean_std(lm)} | {_mean_std(np.subtract(lm, pf))} | "
                     f"{best:g} of {list(budget.momenta)} | {_bands(pf, lm)} | {np.mean(seconds):.0f} |")
    head = (f"{protocol.setting}, {budget.rounds} rounds, seeds {list(budget.seeds)}; accuracy (%) after fine-tuning, mean ± std "
            f"over seeds of the mean over the 50 clients.")
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


# --------------------------------------------------------------------------------------------
# multistep-maml-ggs.txt Figures 1-2: centralized meta-training (fedmeta.centralized, no Flower)


@dataclass(frozen=True)
class GridBudget:
    iterations: int
    eval_every: int
    seeds: tuple[int, ...]
    meta_lrs: tuple[float, ...]
    """The outer step-size grid (every algorithm)."""
    deltas: tuple[float, ...]
    """The smoothing-radius grid (ggs and zeroth_order)."""
    eval_tasks: int = 500
    """Held-out tasks of the meta-loss."""


@dataclass(frozen=True)
class GgsFigure:
    """One figure of multistep-maml-ggs Section 5: the paper's setting and our budgets."""

    base: CentralizedConfig
    full: GridBudget
    quick: GridBudget
    setting: str
    """The setting in words, with what the paper leaves open and where our values come from."""
    authors_iterations: int
    """Meta-iterations in the authors' code (the paper does not say)."""


GGS_ALGORITHMS = {"MAML": "exact", "GGS-MAML": "ggs", "FO-MAML": "first_order", "ZO-MAML": "zeroth_order", "FO-MuML": "fo_muml"}
"""The paper's four algorithms and, as an extra row, FO-MuML (fo-muml Algorithm 3 with s = N), by meta-gradient."""
SMOOTHED = ("ggs", "zeroth_order")
"""The estimators whose delta is tuned."""

GGS_FIGURES = {
    "ggs-fig1": GgsFigure(
        base=CentralizedConfig(task="matrix-factorization", inner_steps=3, inner_lr=0.01, outer_optimizer="sgd", tasks_per_iteration=10,
                               batch_size=1, test_batch_size=1, num_directions=10),
        full=GridBudget(iterations=2000, eval_every=50, seeds=(0, 1, 2), meta_lrs=(0.01, 0.003), deltas=(1e-2, 1e-4)),
        quick=GridBudget(iterations=40, eval_every=10, seeds=(0, 1, 2), meta_lrs=(0.01, 0.003), deltas=(1e-2, 1e-4), eval_tasks=100),
        setting=("Rank-one matrix factorization (Section 5.1), l_i(w) = 1/4 ||w w^T - g_i g_i^T||_F^2, 10 tasks per iteration, N = 3, "
                 "alpha = 0.01, outer SGD, U = 10, float32. Not in the paper, taken from the authors' code (JunjieYang97/GGS-MAML-DL, "
                 "matrix_rank_train.py): d = 20, g_i ~ N(0, s_i^2 I) with s_i ~ U[0, 0.1] per task, w_0 ~ N(0, 2/(d+1) I)."),
        authors_iterations=2000,
    ),
    "ggs-fig2": GgsFigure(
        base=CentralizedConfig(task="sine", inner_steps=3, inner_lr=1e-4, outer_optimizer="adam", meta_lr=1e-4, tasks_per_iteration=25,
                               batch_size=10, test_batch_size=10, num_directions=10),
        full=GridBudget(iterations=1000, eval_every=25, seeds=(0, 1, 2), meta_lrs=(1e-4,), deltas=(1e-2, 1e-5, 1e-7)),
        quick=GridBudget(iterations=20, eval_every=10, seeds=(0, 1, 2), meta_lrs=(1e-4,), deltas=(1e-2, 1e-7), eval_tasks=100),
        setting=("Sine regression (Section 5.2), 1-40-40-1 ReLU network, a ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5], 25 tasks per "
                 "iteration, N = 3 inner SGD steps with alpha = 1e-4 on 10 samples each, 10 test points, Adam with step size 1e-4, "
                 "U = 10, float32. Independent Hessian batches D_j of 10 samples (Algorithm 1). Not in the paper, taken from the "
                 "authors' code (regression_train.py, learner.py): Kaiming-normal weights and zero biases."),
        authors_iterations=3000,
    ),
}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _loss_cell(rs: Sequence[RunResult]) -> str:
    finals = np.array([r.final_meta_loss for r in rs])
    bad = int(np.isnan(finals).sum())
    if bad:
        return f"diverged in {bad} of {len(rs)} seeds"
    return f"{_fmt(finals.mean())} ± {finals.std():.2g}"


def _vs_maml(rs: Sequence[RunResult], maml: Sequence[RunResult]) -> str:
    """Final meta-loss relative to MAML's on the same seed (same initial model and tasks), in percent."""
    rel = np.array([(r.final_meta_loss / m.final_meta_loss - 1) * 100 for r, m in zip(rs, maml)])
    return "-" if np.isnan(rel).any() else f"{rel.mean():+.2f}% ± {rel.std():.2f}"


def _seed_mean_curve(rs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray]:
    """Iterations and the meta-loss averaged over seeds (up to the shortest curve, for diverged runs)."""
    n = min(len(r.iterations) for r in rs)
    return np.asarray(rs[0].iterations[:n]), np.mean([r.meta_loss[:n] for r in rs], axis=0)


def _score(rs: Sequence[RunResult]) -> float:
    """Final meta-loss averaged over seeds; a grid point with a diverged seed is never chosen."""
    finals = [r.final_meta_loss for r in rs]
    return float(np.mean(finals)) if all(np.isfinite(finals)) else math.inf


def _curve_mean(rs: Sequence[RunResult]) -> float:
    """The seed-mean meta-loss averaged over the recorded iterations: how fast, not just where, it went."""
    return float(np.mean(_seed_mean_curve(rs)[1])) if math.isfinite(_score(rs)) else math.nan


def ggs_figure(
    fig: GgsFigure, budget: GridBudget, run_all: Callable[[list[CentralizedConfig]], list[RunResult]]
) -> tuple[str, dict[str, list[RunResult]], dict[str, list[RunResult]]]:
    """Run the whole grid; return the summary, each algorithm's chosen runs and every grid point's runs (by label)."""
    grid: dict[tuple[str, float, float | None], list[CentralizedConfig]] = {}
    for label, name in GGS_ALGORITHMS.items():
        for lr in budget.meta_lrs:
            for delta in budget.deltas if name in SMOOTHED else (None,):
                cfg = fig.base.replace(meta_gradient=name, meta_lr=lr, iterations=budget.iterations, eval_every=budget.eval_every,
                                       eval_tasks=budget.eval_tasks, **({} if delta is None else {"delta": delta}))
                grid[(label, lr, delta)] = [cfg.replace(seed=s) for s in budget.seeds]
    done = iter(run_all([c for cfgs in grid.values() for c in cfgs]))
    runs = {point: [next(done) for _ in cfgs] for point, cfgs in grid.items()}
    best = {label: min((p for p in runs if p[0] == label), key=lambda p: _score(runs[p])) for label in GGS_ALGORITHMS}

    def label_of(point: tuple[str, float, float | None]) -> str:
        label, lr, delta = point
        return f"{label} (lr={lr:g}" + (f", delta={delta:g})" if delta is not None else ")")

    maml = runs[best["MAML"]]
    rows = ["| algorithm | meta-gradient | meta-lr | delta | final meta-loss | vs MAML, same seed | mean over the curve | "
            "oracle calls per iteration | s per run |", "|---|---|---|---|---|---|---|---|---|"]
    for label, point in best.items():
        rs, cfg = runs[point], runs[point][0].config
        est = meta.meta_gradient(cfg.meta_gradient, delta=cfg.delta, num_directions=cfg.num_directions)
        cost = est.cost(cfg.inner_steps) * cfg.tasks_per_iteration
        calls = ", ".join(f"{n} {k}" for k, n in (("gradients", cost.gradients), ("HVPs", cost.hvps), ("loss evals", cost.loss_evals)) if n)
        rows.append(f"| {label} | {cfg.meta_gradient} | {point[1]:g} | {'-' if point[2] is None else f'{point[2]:g}'} | {_loss_cell(rs)} | "
                    f"{_vs_maml(rs, maml)} | {_fmt(_curve_mean(rs))} | {calls} | {np.mean([r.seconds for r in rs]):.1f} |")
    grid_rows = ["| algorithm | meta-lr | delta | final meta-loss | vs MAML, same seed | mean over the curve | s per run | chosen |",
                 "|---|---|---|---|---|---|---|---|"]
    for point, rs in runs.items():
        grid_rows.append(f"| {point[0]} | {point[1]:g} | {'-' if point[2] is None else f'{point[2]:g}'} | {_loss_cell(rs)} | "
                         f"{_vs_maml(rs, maml)} | {_fmt(_curve_mean(rs))} | {np.mean([r.seconds for r in rs]):.1f} | "
                         f"{'yes' if best[point[0]] == point else ''} |")
    ranked = sorted(best, key=lambda label: _score(runs[best[label]]))
    by_curve = sorted(best, key=lambda label: (math.isnan(_curve_mean(runs[best[label]])), _curve_mean(runs[best[label]])))
    initial = np.mean([r.meta_loss[0] for r in runs[best["MAML"]]])  # the same initial model and tasks for every algorithm of a seed
    if budget == fig.quick:
        why = f"the --quick smoke-test budget; the authors' code runs {fig.authors_iterations}"
    elif budget.iterations < fig.authors_iterations:
        why = f"the authors' code runs {fig.authors_iterations}; cut so that ggs-fig1 and ggs-fig2 together take about 25 min on 2 CPU cores"
    else:
        why = "as in the authors' code"
    head = (f"{fig.setting}\n\nBudget: {budget.iterations} meta-iterations per run ({why}), seeds {list(budget.seeds)}, outer step sizes "
            f"{list(budget.meta_lrs)}, delta {list(budget.deltas)} (ggs, zeroth_order). Meta-loss: the loss after N = {fig.base.inner_steps} "
            f"inner SGD steps (eq. 6) on fresh data, averaged over {budget.eval_tasks} held-out tasks (the same tasks for every algorithm "
            f"of a seed), recorded every {budget.eval_every} iterations; the initial model's is {_fmt(initial)} (mean over seeds). "
            f"Each algorithm's grid point is the one with the lowest final meta-loss averaged over the seeds; "
            f"\"mean over the curve\" averages the seed-mean meta-loss over all recorded iterations (lower = faster). "
            f"Final meta-loss: mean ± std over seeds; \"vs MAML, same seed\": the final meta-loss relative to the chosen MAML run "
            f"of the same seed (same initial model, training and held-out tasks), mean ± std over seeds.")
    text = (head + "\n\n" + "\n".join(rows) + "\n\n"
            + f"Ranking by final meta-loss: {' < '.join(ranked)}. By mean over the curve: {' < '.join(by_curve)}.\n\n"
            + "The whole grid:\n\n" + "\n".join(grid_rows) + "\n")
    return text, {label: runs[p] for label, p in best.items()}, {label_of(p): rs for p, rs in runs.items()}


def plot_meta_loss(best: dict[str, list[RunResult]], grid: dict[str, list[RunResult]], out: Path) -> list[Path]:
    """Meta-loss vs iteration, mean over seeds: the chosen grid points, the same relative to MAML, and the whole grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_rel, ax_grid) = plt.subplots(1, 3, figsize=(18, 5))
    maml = best["MAML"]
    for label, rs in best.items():
        cfg = rs[0].config
        extra = f", delta={cfg.delta:g}" if cfg.meta_gradient in SMOOTHED else ""
        it, mean = _seed_mean_curve(rs)
        ax.plot(it, mean, label=f"{label} (lr={cfg.meta_lr:g}{extra})")
        n = len(it)
        rel = np.mean([(np.asarray(r.meta_loss[:n]) / np.asarray(m.meta_loss[:n]) - 1) * 100 for r, m in zip(rs, maml)], axis=0)
        ax_rel.plot(it, rel, label=label)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, (label, rs) in enumerate(grid.items()):
        it, mean = _seed_mean_curve(rs)
        ax_grid.plot(it, mean, label=label, linewidth=1, color=colors[i % 20])
    ax.set(yscale="log", ylabel="meta-loss (held-out tasks, after N inner steps)", title="chosen grid point per algorithm (mean over seeds)")
    ax_rel.set_yscale("symlog", linthresh=1.0)  # linear within +-1 %, logarithmic beyond: small and large gaps both show
    ax_rel.set(ylabel="meta-loss relative to MAML of the same seed (%)", title="relative to MAML (mean over seeds)")
    ax_grid.set(yscale="log", ylabel="meta-loss", title="whole grid (mean over seeds)")
    for a in (ax, ax_rel, ax_grid):
        a.set(xlabel="meta-iteration")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    return _save(fig, out / "meta_loss_vs_iteration.png")


def _save(fig: Any, path: Path) -> list[Path]:
    """Write a matplotlib figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def runs_line(block: dict[str, Any], count: int, reused: int) -> str:
    """``Runs: commit ... (clean tree), <date>; <versions>; ...`` for the invocation whose provenance is ``block``;
    runs reused from an earlier invocation are counted, since their code may be older."""
    line = RUNS_PREFIX + describe(block)
    if reused:
        line += f" ({reused} of {count} runs reused from an earlier invocation, whose results files record their own commit)"
    return line + "."


def _config_key(cfg: Any) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


class CachedRuns:
    """The runs of one reproduction, each kept as JSON in ``runs_dir`` under its configuration: a run that
    finished before is reused (an interrupted command resumes), the others run in ``jobs`` processes with
    one thread each. Calling it with configurations returns their results, in order.

    ``run(cfg)``: a picklable function returning a result with ``config``, ``seconds`` and ``to_dict()``;
    ``load(dict)``: the result read back; ``describe(cfg, result)``: its progress line."""

    def __init__(self, runs_dir: Path, jobs: int, run: Callable[[Any], Any], load: Callable[[dict[str, Any]], Any],
                 describe: Callable[[Any, Any], str]) -> None:
        self.runs_dir, self.jobs, self.run, self.describe = runs_dir, jobs, run, describe
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.finished = {}
        for path in sorted(runs_dir.glob("*.json")):
            res = load(json.loads(path.read_text()))
            self.finished[_config_key(res.config)] = res
        self.count = self.reused = 0

    def _report(self, cfg: Any, res: Any, how: str) -> None:
        self.count += 1
        print(f"[{self.count}] {self.describe(cfg, res)} ({how}, {res.seconds:.0f} s)", flush=True)

    def _keep(self, cfg: Any, res: Any) -> None:
        key = _config_key(cfg)
        record = {**res.to_dict(), "provenance": provenance(cfg.to_dict(), started=time.time() - res.seconds)}
        (self.runs_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:12]}.json").write_text(json.dumps(record))
        self.finished[key] = res
        self._report(cfg, res, "ran")

    def __call__(self, cfgs: list[Any]) -> list[Any]:
        pending = list({_config_key(c): c for c in cfgs if _config_key(c) not in self.finished}.values())
        for c in cfgs:
            if _config_key(c) in self.finished:
                self.reused += 1
                self._report(c, self.finished[_config_key(c)], "reused")
        if self.jobs > 1 and len(pending) > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from multiprocessing import get_context

            with ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_one_thread) as pool:
                futures = {pool.submit(self.run, c): c for c in pending}
                for fut in as_completed(futures):
                    self._keep(futures[fut], fut.result())
        else:
            for c in pending:
                self._keep(c, self.run(c))
        return [self.finished[_config_key(c)] for c in cfgs]


def _one_thread() -> None:
    """Tiny models: one intra-op thread per process is fastest, and leaves the other core to the other job."""
    import torch

    torch.set_num_threads(1)


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
    _one_thread()
    # Table 2 and its ablation share one cache: the ablation's first row is the table's authors' runs
    cache = "localmoml-table2" + ("-quick" if args.quick else "") if args.name.startswith("localmoml-table2") else tag
    run_all = CachedRuns(Path(args.runs) / cache, args.jobs, train, RunResult.from_dict, _describe_centralized)

    started, t0 = time.time(), time.perf_counter()
    if args.name.startswith("localmoml-table2"):
        from fedmeta.simulations import reproduce_table2 as t2

        if args.name == "localmoml-table2":
            protocols = [t2.PROTOCOLS[p] for p in (t2.PROTOCOLS if args.protocol == "both" else (args.protocol,))]
            budget = t2.BUDGETS["quick" if args.quick else "full"]
            table, grid = t2.table2(protocols, budget, run_all, t2.load_authors_code(Path(args.out) / "localmoml-table2" / t2.AUTHORS_CODE))
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
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, stream=sys.stdout)

    from fedmeta.simulations.run import data_key, check_all, report_failure, simulate

    count = reused = 0
    checked: set[tuple] = set()
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
    text = f"## {tag.removesuffix('-quick')}{' (quick budget)' if args.quick else ''}\n\n`{command}`: {count} simulations, {minutes:.1f} min wall time"
    text += f" for the {count - reused} not reused from an earlier, interrupted invocation" if reused else ""
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
