"""localmoml Table 2 (Section 6.1): MAML (BSGD), MOML and LocalMOML on 25 sine tasks, under two protocols.

``fedmeta-reproduce localmoml-table2 [--protocol paper|authors|both] [--quick] [--jobs 2]`` runs the table;
``fedmeta-reproduce localmoml-table2-ablation [--quick] [--jobs 2]`` changes one setting at a time from the
``authors`` protocol towards ``paper`` (:data:`ABLATION_STEPS`).

A protocol is a set of ordinary :class:`fedmeta.centralized.CentralizedConfig` settings, the momentum beta per K and
the step size eta per K and algorithm (:class:`Protocol`); nothing downstream looks at its name.

- ``paper``: Section 6.1 as written: the exact meta-gradient of eq. (3) (its Hessian on the independent batch S2),
  B = 3 distinct tasks per iteration, 5 unseen test tasks drawn per seed, each seed's own initial model, and the
  beta the paper states (0.5 at K = 1, 0.7 at K = 5).
- ``authors``: the released code, GitHub ``bokun-wang/moml``, folder ``sinewave/``, where it differs from the text
  (each setting's docstring in :class:`fedmeta.centralized.CentralizedConfig` names the file and lines it comes from;
  docs/results.md lists them with what still differs).

Both run the authors' budget: 40,000 iterations for MAML and MOML (``sinewave/config.py``, ``total_iterations``) and,
for LocalMOML, the same number of sampled points: ``(40,000 // ((K0 + K H) / (K H))) // H`` rounds of H = 5 local steps
(``sinewave/train.py``, the LocalMOML branch). eta and beta at K = 1 and K = 3 are those of the authors' README commands;
where neither the README nor the paper gives one (eta at K = 5), eta is tuned on the paper's grid with the first seed,
scored on validation tasks of their own seed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedmeta.centralized import CentralizedConfig, RunResult
from fedmeta.simulations.reproduce_ggs import seed_mean_curve
from fedmeta.simulations.runcache import save_figure

MAML, MOML, LOCAL = "MAML (BSGD)", "MOML", "LocalMOML"
ALGORITHMS = {MAML: "maml", MOML: "moml", LOCAL: "local-moml"}
"""Table 2's rows (NASA and BSpiderBoost, also in the paper's table, are not in fedmeta)."""

PAPER_TABLE = {
    1: {MAML: (0.651, 0.123, 2.083), MOML: (0.310, 0.025, 2.732), LOCAL: (0.381, 0.059, 3.182)},
    5: {MAML: (0.188, 0.016, 2.449), MOML: (0.128, 0.011, 3.170), LOCAL: (0.133, 0.020, 3.649)},
}
"""The paper's Table 2: test error, its std over 5 seeds, and ms per iteration (the authors' GPU)."""
README_TABLE = {
    1: {MAML: (0.8356, 0.0719, 2.586), MOML: (0.2905, 0.0069, 3.325), LOCAL: (0.4316, 0.0530, 4.268)},
    3: {MAML: (0.3083, 0.0277, 3.286), MOML: (0.1732, 0.0392, 3.279), LOCAL: (0.1573, 0.0084, 3.922)},
}
"""What the authors' README printed for its commands ('Output (K = 1)', 'Output (K = 3)'): the same three numbers."""
README_ETA = {(1, MAML): 0.001, (1, MOML): 0.005, (1, LOCAL): 0.005, (3, MAML): 0.005, (3, MOML): 0.01, (3, LOCAL): 0.01}
"""eta of the authors' README commands (``python train.py --alg ... --K ... --lr ...``)."""
PAPER_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)
"""Section 6.1's grid of initial step sizes, also the README's."""
VALIDATION_SEED = 10_000
"""Seed of the validation tasks on which a missing eta is tuned (never the test tasks)."""

COMMON = dict(task="sine-table2", num_tasks=25, task_set="grid", tasks_per_iteration=3, inner_steps=1, inner_lr=0.01, local_steps=5,
              decay_at=0.75, outer_optimizer="sgd")
"""Section 6.1 and the authors' code agree on these: the 25 grid tasks, B = 3, alpha = 0.01, one inner step, eta / 10 at
75 % of the iterations, H = 5, plain SGD; the 1-40-40-1 ReLU network with PyTorch's default initialization."""


@dataclass(frozen=True)
class Protocol:
    """One way of running Table 2: settings of the centralized runner, beta per K, eta per (K, algorithm)."""

    name: str
    settings: Mapping[str, Any]
    """:class:`CentralizedConfig` fields, for every algorithm and K."""
    momentum: Mapping[int, float]
    """beta of MOML and LocalMOML, per K."""
    meta_lr: Mapping[tuple[int, str], float] = field(default_factory=lambda: dict(README_ETA))
    """eta per (K, algorithm) where it is given; the others are tuned on :data:`PAPER_GRID`."""
    test_tasks: int = 5
    """Unseen test tasks."""


PROTOCOLS = {
    "paper": Protocol("paper", dict(meta_gradient="exact", task_sampling="distinct", memory_init="first-visit",
                                    memory_gradient="direction", init_seed=-1, eval_protocol="few-shot"),
                      momentum={1: 0.5, 3: 0.5, 5: 0.7}, test_tasks=500),
    "authors": Protocol("authors", dict(meta_gradient="first_order", task_sampling="with-replacement", memory_init="initial-model",
                                        memory_gradient="through-memory", init_seed=1234, eval_protocol="few-shot-fixed"),
                        momentum={1: 0.3, 3: 0.5, 5: 0.7}),
}
"""``paper``'s beta at K = 3 is the README's (the paper has no K = 3); ``authors``' at K = 5 is the paper's (the README has no
K = 5). ``paper`` scores 500 unseen tasks per seed and reports the first 5 (the paper's count) and all 500."""


@dataclass(frozen=True)
class Table2Budget:
    iterations: int
    """MAML and MOML iterations; LocalMOML gets :func:`local_moml_rounds` of them."""
    eval_every: int
    seeds: tuple[int, ...]
    ks: tuple[int, ...] = (1, 3, 5)
    grid: tuple[float, ...] = PAPER_GRID
    """Where eta is tuned (when a protocol does not give it)."""
    validation_tasks: int = 100


BUDGETS = {
    "full": Table2Budget(iterations=40_000, eval_every=2_000, seeds=(0, 1, 2, 3, 4)),
    "ablation": Table2Budget(iterations=40_000, eval_every=2_000, seeds=(0, 1, 2)),
    "quick": Table2Budget(iterations=200, eval_every=100, seeds=(0, 1), ks=(1, 5), grid=(0.005, 0.01), validation_tasks=20),
}


def local_moml_rounds(iterations: int, k: int, k0: int, h: int) -> int:
    """LocalMOML's rounds for the sample budget of ``iterations`` MAML iterations, as the authors' train.py computes it:
    ``ratio = (K0 + K H) / (K H)``, ``(iterations // ratio) // H`` rounds (40,000 -> 5,714 for K0 = 2K, H = 5)."""
    return int(iterations // ((k0 + k * h) / (k * h))) // h


def config(protocol: Protocol, k: int, label: str, budget: Table2Budget, meta_lr: float, seed: int = 0) -> CentralizedConfig:
    """The run of ``label`` at batch size K under ``protocol``, scored on its test tasks."""
    algorithm = ALGORITHMS[label]
    base = CentralizedConfig(**COMMON, **protocol.settings, batch_size=k, test_batch_size=k, init_batch_size=2 * k, algorithm=algorithm,
                             momentum=1.0 if algorithm == "maml" else protocol.momentum[k], meta_lr=meta_lr, seed=seed,
                             eval_tasks=protocol.test_tasks, eval_every=budget.eval_every, iterations=budget.iterations)
    if algorithm == "local-moml":
        rounds = max(1, local_moml_rounds(budget.iterations, k, base.init_batch_size, base.local_steps))
        base = base.replace(iterations=rounds, eval_every=max(1, budget.eval_every * rounds // budget.iterations))
    return base


def validation(cfg: CentralizedConfig, budget: Table2Budget) -> CentralizedConfig:
    """``cfg`` scored on validation tasks (unseen tasks of their own seed) instead of its test tasks."""
    return cfg.replace(eval_protocol="few-shot", eval_tasks=budget.validation_tasks, eval_seed=VALIDATION_SEED)


def final_error(r: RunResult, first: int | None = None) -> float:
    """Mean test error over the first ``first`` test tasks (all: None); NaN for a diverged run."""
    return float(np.mean(r.final_task_errors[:first])) if r.final_task_errors else math.nan


def ms_per_step(r: RunResult) -> float:
    """ms per iteration; for LocalMOML per local step, as the authors' code times it (the time of a round over H)."""
    done = r.diverged_at if r.diverged_at is not None else r.config.iterations
    steps = done * (r.config.local_steps if r.config.algorithm == "local-moml" else 1)
    return 1000 * r.train_seconds / max(1, steps)


def band(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return (float(v.mean()), float(v.std())) if not np.isnan(v).any() else (math.nan, math.nan)


def cell(values: Sequence[float]) -> str:
    bad = int(np.isnan(np.asarray(values, dtype=np.float64)).sum())
    if bad:
        return f"diverged in {bad} of {len(values)} seeds"
    m, s = band(values)
    return f"{m:.3f} ± {s:.3f}"


def verdict(lower: Sequence[float], higher: Sequence[float]) -> str:
    """Is ``lower`` below ``higher``, judged by the seed bands (mean ± std)? ``holds``: the bands do not overlap and
    ``lower`` is below; ``reversed``: they do not overlap and it is above; otherwise ``not separable``. A diverged run
    (NaN) has an infinite error: where runs diverged, the side with fewer diverged seeds is the lower one, and as many
    on both sides is ``not separable``."""
    bad_low, bad_high = (int(np.isnan(np.asarray(v, dtype=np.float64)).sum()) for v in (lower, higher))
    if bad_low or bad_high:
        which = "holds" if bad_low < bad_high else "reversed" if bad_low > bad_high else "not separable"
        return f"{which} (diverged: {bad_low} of {len(lower)} and {bad_high} of {len(higher)} seeds)"
    (a, sa), (b, sb) = band(lower), band(higher)
    if a + sa < b - sb:
        return "holds"
    if b + sb < a - sa:
        return "reversed"
    return "not separable"


def tuned_meta_lrs(protocol: Protocol, budget: Table2Budget, run_all: Callable[[list[CentralizedConfig]], list[RunResult]],
                   journal: Path | None = None) -> tuple[dict[tuple[int, str], float], list[str]]:
    """eta per (K, algorithm): the protocol's where given, else the grid point with the lowest final validation error
    (first seed; a diverged run never wins; every run diverged: the smallest eta). Each tuning step is an Optuna grid
    study over the grid (:func:`fedmeta.simulations.tune_report.grid_choice`, kept in the journal file ``journal``, in
    memory when None) whose trials score the runs of ``run_all``. Also the lines saying what was tuned and which trials
    ran."""
    missing = [(k, label) for k in budget.ks for label in ALGORITHMS if (k, label) not in protocol.meta_lr]
    chosen, notes = {key: v for key, v in protocol.meta_lr.items() if key[0] in budget.ks}, []
    if not missing:
        return chosen, notes
    from fedmeta.simulations.tune_report import grid_choice, trials_lines

    trials = {(k, label, lr): validation(config(protocol, k, label, budget, lr, budget.seeds[0]), budget)
              for k, label in missing for lr in budget.grid}
    done = dict(zip(trials, run_all(list(trials.values()))))
    for k, label in missing:
        scores = {lr: final_error(done[(k, label, lr)]) for lr in budget.grid}
        key = hashlib.sha1(json.dumps([trials[(k, label, lr)].to_dict() for lr in budget.grid], sort_keys=True).encode()).hexdigest()[:8]
        name = f"{protocol.name}-K{k}-{ALGORITHMS[label]}-eta-{key}"
        best, rows = grid_choice(journal, name, {"meta-lr": budget.grid},
                                 lambda params: scores[params["meta-lr"]], "minimize")
        chosen[(k, label)] = best["meta-lr"] if best else min(budget.grid)
        shown = ", ".join(f"{lr:g}: {s:.3f}" if math.isfinite(s) else f"{lr:g}: diverged" for lr, s in scores.items())
        notes.append(f"{protocol.name}, K = {k}, {label}: eta {chosen[(k, label)]:g} (validation error {shown})")
        notes += trials_lines(f"{protocol.name}, K = {k}, {label}: the trials of the Optuna grid study {name!r} ({journal or 'in memory'})", rows)
    return chosen, notes


AUTHORS_CODE = "authors_code.json"
"""Beside the summary: the authors' own code run on this machine, one seed per cell (its printed lines, with how it was
run; see the file)."""


def load_authors_code(path: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """The authors' code's results by (K, algorithm); none when ``path`` does not exist."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {(int(r["K"]), r["algorithm"]): r for r in data["runs"]}


def table2(protocols: Sequence[Protocol], budget: Table2Budget, run_all: Callable[[list[CentralizedConfig]], list[RunResult]],
           authors_code: Mapping[tuple[int, str], Mapping[str, Any]] | None = None, journal: Path | None = None
           ) -> tuple[str, dict[str, list[RunResult]]]:
    """Run every protocol's grid; return the side-by-side summary and the runs by label. ``journal``: the journal file of
    the eta studies (:func:`tuned_meta_lrs`)."""
    authors_code = authors_code or {}
    etas: dict[str, dict[tuple[int, str], float]] = {}
    notes: list[str] = []
    for p in protocols:
        etas[p.name], tuned = tuned_meta_lrs(p, budget, run_all, journal)
        notes += tuned
    cfgs = {(p.name, k, label): [config(p, k, label, budget, etas[p.name][(k, label)], s) for s in budget.seeds]
            for p in protocols for k in budget.ks for label in ALGORITHMS}
    done = iter(run_all([c for cs in cfgs.values() for c in cs]))
    runs = {key: [next(done) for _ in cs] for key, cs in cfgs.items()}

    head = "| K | algorithm | the paper's Table 2 | authors' README | authors' code here, seed 0 |"
    rule = "|---|---|---|---|---|"
    for p in protocols:
        head += f" {p.name}: eta, beta | {p.name}: test error (5 tasks) |" + (" (500 tasks) |" if p.test_tasks > 5 else "") + \
                f" {p.name}: ms |"
        rule += "---|---|" + ("---|" if p.test_tasks > 5 else "") + "---|"
    rows = [head, rule]
    for k in budget.ks:
        for label in ALGORITHMS:
            paper, readme, theirs = PAPER_TABLE.get(k, {}).get(label), README_TABLE.get(k, {}).get(label), authors_code.get((k, label))
            given = [f"{t[0]:.3f} ± {t[1]:.3f} ({t[2]:.2f} ms)" if t else "-" for t in (paper, readme)]
            ours = f"{theirs['test_error']:.3f} ({theirs['ms_per_iteration']:.2f} ms)" if theirs else "-"
            row = f"| {k} | {label} | {given[0]} | {given[1]} | {ours} |"
            for p in protocols:
                rs = runs[(p.name, k, label)]
                beta = "-" if label == MAML else f"{p.momentum[k]:g}"
                row += f" {etas[p.name][(k, label)]:g}, {beta} | {cell([final_error(r, 5) for r in rs])} |"
                if p.test_tasks > 5:
                    row += f" {cell([final_error(r) for r in rs])} |"
                row += f" {np.mean([ms_per_step(r) for r in rs]):.2f} |"
            rows.append(row)

    lines = []
    for p in protocols:
        for k in budget.ks:
            errs = {label: [final_error(r, None if p.test_tasks > 5 else 5) for r in runs[(p.name, k, label)]] for label in ALGORITHMS}
            lines.append(f"{p.name}, K = {k}: MOML < MAML {verdict(errs[MOML], errs[MAML])}, LocalMOML < MAML "
                         f"{verdict(errs[LOCAL], errs[MAML])} ({', '.join(f'{lb} {cell(v)}' for lb, v in errs.items())}"
                         f"{'; 500 tasks' if p.test_tasks > 5 else ''}).")
    text = "\n".join(rows) + "\n\nVerdicts (judged by the seed bands, mean ± std over seeds):\n\n" + "\n".join(f"- {v}" for v in lines) + "\n"
    if notes:
        text += "\nTuned step sizes (first seed, validation tasks of their own seed, the paper's grid):\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    curves = {f"{name}: K={k} {label} (eta={etas[name][(k, label)]:g})": rs for (name, k, label), rs in runs.items()}
    return text, curves


def describe_setting(budget: Table2Budget, protocols: Sequence[Protocol]) -> str:
    """The setting in words, for the summary's head."""
    local = local_moml_rounds(budget.iterations, 1, 2, 5)
    text = (f"localmoml Section 6.1: 25 training tasks A sin(phi + x), A in {{1..5}}, phi = i pi/5; 1-40-40-1 ReLU network, "
            f"PyTorch's default initialization; MSE; x ~ U(-5, 5) drawn online; B = 3 tasks per iteration, K samples per batch, "
            f"alpha = 0.01, one inner step; {budget.iterations} iterations for MAML and MOML, {local} rounds of H = 5 local "
            f"steps for LocalMOML (K0 = 2K: the same number of sampled points); eta / 10 from 75 % of them on. Test: 10 steps "
            f"of gradient descent at lr 0.01 on 10 points of an unseen task A ~ U(1, 5), phi ~ U(pi/5, pi), then the MSE on "
            f"100 points; mean over the test tasks, then mean ± std over seeds {list(budget.seeds)}. ms: this machine's CPU, "
            f"one thread per run (two runs at a time with --jobs 2), per iteration (LocalMOML: per local step, as the authors' "
            f"code times it); the paper's and README's ms are the authors' hardware.")
    for p in protocols:
        text += f"\n\n`{p.name}`: " + ", ".join(f"{k} = {v}" for k, v in p.settings.items()) + "."
    return text


# --------------------------------------------------------------------------------------------
# The ablation: from the authors' protocol towards the paper's, one setting at a time

ABLATION_K = 1
ABLATION_STEPS: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("authors' protocol", {}),
    ("exact meta-gradient (Hessian on S2)", {"meta_gradient": "exact"}),
    ("step along eq. (3), not through the memory", {"memory_gradient": "direction"}),
    ("memories start at the first visit", {"memory_init": "first-visit"}),
    ("each seed's own initial model", {"init_seed": -1}),
    ("distinct tasks per iteration", {"task_sampling": "distinct"}),
    ("5 unseen test tasks drawn per seed", {"eval_protocol": "few-shot", "eval_tasks": 500}),
    ("the paper's beta (0.5)", {"momentum": 0.5}),
    ("6,000 iterations (LocalMOML: 857 rounds)", {"iterations": 0.15}),
)
"""One change each, applied to the ``authors`` protocol at K = 1 (the others stay as they are); ``iterations`` is a
fraction of the budget's (0.15 of 40,000)."""
IGNORED_BY = {MAML: {"momentum", "memory_init", "memory_gradient"}, MOML: set(), LOCAL: {"memory_init"}}
"""Settings an algorithm does not read (LocalMOML resets its memory every round): left unchanged, so that run is the
first row's (and is not run again)."""


def ablation(budget: Table2Budget, run_all: Callable[[list[CentralizedConfig]], list[RunResult]]) -> tuple[str, dict[str, list[RunResult]]]:
    """MAML, MOML and LocalMOML at K = 1 under each :data:`ABLATION_STEPS` change; which one flips an ordering."""
    p, k = PROTOCOLS["authors"], ABLATION_K
    cfgs = {}
    for step, change in ABLATION_STEPS:
        for label in ALGORITHMS:
            settings = {name: v for name, v in change.items() if name != "iterations" and name not in IGNORED_BY[label]}
            scaled = budget
            if "iterations" in change:
                iters = max(1, round(change["iterations"] * budget.iterations))
                scaled = Table2Budget(iterations=iters, eval_every=max(1, budget.eval_every * iters // budget.iterations), seeds=budget.seeds)
            cfg = config(p, k, label, scaled, p.meta_lr[(k, label)]).replace(**settings)
            cfgs[(step, label)] = [cfg.replace(seed=s) for s in budget.seeds]
    done = iter(run_all([c for cs in cfgs.values() for c in cs]))
    runs = {key: [next(done) for _ in cs] for key, cs in cfgs.items()}
    rows = [f"| change from the authors' protocol (K = {k}) | MAML | MOML | LocalMOML | MOML < MAML | LocalMOML < MAML |",
            "|---|---|---|---|---|---|"]
    for step, change in ABLATION_STEPS:
        errs = {label: [final_error(r, 5) for r in runs[(step, label)]] for label in ALGORITHMS}
        same = {label: bool(change) and set(change) <= IGNORED_BY[label] for label in ALGORITHMS}  # the first row's runs
        shown = {label: cell(errs[label]) + (" (as above)" if same[label] else "") for label in ALGORITHMS}
        rows.append(f"| {step} | {shown[MAML]} | {shown[MOML]} | {shown[LOCAL]} | {verdict(errs[MOML], errs[MAML])} | "
                    f"{verdict(errs[LOCAL], errs[MAML])} |")
    head = (f"From fedmeta's `authors` protocol at K = {k} (eta and beta of the README), one setting changed per row towards "
            f"`paper`; test error on 5 test tasks, mean ± std over seeds {list(budget.seeds)}; orderings judged by the seed bands.")
    return head + "\n\n" + "\n".join(rows) + "\n", {f"{step}: {label}": rs for (step, label), rs in runs.items()}


# --------------------------------------------------------------------------------------------
# Plots


def plot(curves: Mapping[str, list[RunResult]], out: Path) -> list[Path]:
    """Test error vs sampled points (in MAML iterations), mean over seeds: one panel per protocol and K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    protocols = sorted({label.split(":")[0] for label in curves})
    ks = sorted({int(label.split("K=")[1].split(" ")[0]) for label in curves})
    fig, axes = plt.subplots(len(protocols), len(ks), figsize=(5.5 * len(ks), 4.2 * len(protocols)), squeeze=False)
    for row, name in zip(axes, protocols):
        for ax, k in zip(row, ks):
            panel = f"{name}: K={k} "
            for label, rs in curves.items():
                if label.startswith(panel):
                    it, mean = seed_mean_curve(rs)  # up to the first divergence
                    bad = [r.diverged_at * budget_scale(r.config) for r in rs if r.diverged_at is not None]
                    note = f", diverged in {len(bad)} of {len(rs)} seeds, first at {min(bad):,.0f}" if bad else ""
                    ax.plot(np.asarray(it) * budget_scale(rs[0].config), mean, label=label[len(panel):] + note)
            ax.set(xlabel="MAML iterations (LocalMOML: the same sampled points)", ylabel="test error after adaptation", yscale="log",
                   title=f"{name} protocol, K = {k} (mean over seeds)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    paths = save_figure(fig, out / "test_error_vs_iteration.png")
    moml = {label: rs for label, rs in curves.items() if " MOML " in label and rs[0].config.task_sampling == "distinct" and rs[0].memory_ages}
    if moml:  # distinct draws: a task's memory age is geometric with p = B / n
        fig, axes = plt.subplots(1, len(moml), figsize=(6 * len(moml), 4), squeeze=False)
        for ax, (label, rs) in zip(axes[0], moml.items()):
            counts = np.zeros(max(len(r.memory_ages) for r in rs))
            for r in rs:
                counts[: len(r.memory_ages)] += r.memory_ages
            ages = np.arange(1, len(counts) + 1)
            ax.bar(ages, counts / counts.sum(), width=1.0, alpha=0.6, label="measured (all seeds)")
            p = rs[0].config.tasks_per_iteration / rs[0].config.num_tasks
            ax.plot(ages, p * (1 - p) ** (ages - 1), "k-", lw=1, label=f"geometric, p = B/n = {p:.2f}")
            ax.set(xlabel="age of the memory u_i when task i is sampled again (iterations)", ylabel="fraction of revisits",
                   title=f"{label}: mean age {float((ages * counts).sum() / counts.sum()):.1f}", xlim=(0, min(len(counts), 60)))
            ax.legend(fontsize=8)
        paths += save_figure(fig, out / "memory_age_histogram.png")
    return paths


def budget_scale(cfg: CentralizedConfig) -> float:
    """MAML iterations per recorded iteration of ``cfg``: 1, or for LocalMOML a round's sampled points in MAML iterations."""
    if cfg.algorithm != "local-moml":
        return 1.0
    k, h = cfg.batch_size, cfg.local_steps
    return h * (cfg.init_batch_size + k * h) / (k * h)
