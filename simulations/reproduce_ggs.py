"""multistep-maml-ggs.txt Figures 1-2 with the centralized runner (:mod:`fedmeta.centralized`, no Flower):
the grids, the choice of each algorithm's grid point, the summary table and the plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedmeta import meta
from fedmeta.centralized import CentralizedConfig, RunResult
from fedmeta.simulations.runcache import save_figure


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


def seed_mean_curve(rs: Sequence[RunResult]) -> tuple[np.ndarray, np.ndarray]:
    """Iterations and the meta-loss averaged over seeds (up to the shortest curve, for diverged runs)."""
    n = min(len(r.iterations) for r in rs)
    return np.asarray(rs[0].iterations[:n]), np.mean([r.meta_loss[:n] for r in rs], axis=0)


def _score(rs: Sequence[RunResult]) -> float:
    """Final meta-loss averaged over seeds; a grid point with a diverged seed is never chosen."""
    finals = [r.final_meta_loss for r in rs]
    return float(np.mean(finals)) if all(np.isfinite(finals)) else math.inf


def _curve_mean(rs: Sequence[RunResult]) -> float:
    """The seed-mean meta-loss averaged over the recorded iterations: how fast, not just where, it went."""
    return float(np.mean(seed_mean_curve(rs)[1])) if math.isfinite(_score(rs)) else math.nan


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
        it, mean = seed_mean_curve(rs)
        ax.plot(it, mean, label=f"{label} (lr={cfg.meta_lr:g}{extra})")
        n = len(it)
        rel = np.mean([(np.asarray(r.meta_loss[:n]) / np.asarray(m.meta_loss[:n]) - 1) * 100 for r, m in zip(rs, maml)], axis=0)
        ax_rel.plot(it, rel, label=label)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, (label, rs) in enumerate(grid.items()):
        it, mean = seed_mean_curve(rs)
        ax_grid.plot(it, mean, label=label, linewidth=1, color=colors[i % 20])
    ax.set(yscale="log", ylabel="meta-loss (held-out tasks, after N inner steps)", title="chosen grid point per algorithm (mean over seeds)")
    ax_rel.set_yscale("symlog", linthresh=1.0)  # linear within +-1 %, logarithmic beyond: small and large gaps both show
    ax_rel.set(ylabel="meta-loss relative to MAML of the same seed (%)", title="relative to MAML (mean over seeds)")
    ax_grid.set(yscale="log", ylabel="meta-loss", title="whole grid (mean over seeds)")
    for a in (ax, ax_rel, ax_grid):
        a.set(xlabel="meta-iteration")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    return save_figure(fig, out / "meta_loss_vs_iteration.png")
