"""The reproductions that run on Flower's simulation engine (:func:`fedmeta.simulations.run.simulate`): per-fedavg.txt
Figure 1 and localmoml Table 3 under two protocols. ``fedmeta-reproduce`` (:mod:`fedmeta.simulations.reproduce`) runs them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fedmeta import config as C
from fedmeta.simulations.config import ExperimentConfig


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
           protocol: Table3Protocol = TABLE3_PROTOCOLS["paper"], journal: Path | None = None) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Run the Table 3 grid of ``protocol``; LocalMOML's momentum is chosen on the first seed's final accuracy (the highest;
    the first of equal ones), by an Optuna grid study over ``budget.momenta`` per cell
    (:func:`fedmeta.simulations.tune_report.grid_choice`, in the journal file ``journal``, in memory when None) whose
    trials score the runs."""
    from fedmeta.simulations.tune_report import grid_choice, trials_lines

    runs: dict[str, list[dict[str, Any]]] = {}
    notes: list[str] = []
    lines = ["| H | B' per group (B) | Per-FedAvg | LocalMOML | LocalMOML - Per-FedAvg, same seed | momentum | LocalMOML ahead | "
             "s per run |", "|---|---|---|---|---|---|---|---|"]
    first, rest = budget.seeds[0], budget.seeds[1:]
    for h, bp in budget.cells:
        label = f"H={h}, B'={bp}"
        cfg = protocol.base.replace(local_steps=h, clients_per_round=bp, num_rounds=budget.rounds, evaluate_every=budget.evaluate_every)
        runs[f"{C.PER_FEDAVG} ({label})"] = [run(cfg.replace(algorithm=C.PER_FEDAVG, seed=s)) for s in budget.seeds]
        tuning = {m: run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=m, seed=first)) for m in budget.momenta}
        key = hashlib.sha1(json.dumps([run_key(cfg.replace(algorithm=C.LOCAL_MOML, momentum=m, seed=first)) for m in budget.momenta]
                                      ).encode()).hexdigest()[:8]
        name = f"table3-H{h}-B{bp}-momentum-{key}"
        chosen, rows = grid_choice(journal, name, {"momentum": budget.momenta}, lambda p: _acc(tuning[p["momentum"]], C.ACC_AFTER), "maximize")
        best = chosen["momentum"] if chosen else budget.momenta[0]
        notes += trials_lines(f"{label}: LocalMOML's momentum, the trials of the Optuna grid study {name!r} ({journal or 'in memory'})", rows)
        runs[f"{C.LOCAL_MOML} ({label})"] = [tuning[best]] + [run(cfg.replace(algorithm=C.LOCAL_MOML, momentum=best, seed=s)) for s in rest]
        pf = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.PER_FEDAVG} ({label})"]]
        lm = [_acc(r, C.ACC_AFTER) for r in runs[f"{C.LOCAL_MOML} ({label})"]]
        seconds = [float(r.get("seconds", math.nan)) for key in (f"{C.PER_FEDAVG} ({label})", f"{C.LOCAL_MOML} ({label})")
                   for r in runs[key]]
        lines.append(f"| {h} | {bp} ({4 * bp}) | {_mean_std(pf)} | {_mean_std(lm)} | {_mean_std(np.subtract(lm, pf))} | "
                     f"{best:g} of {list(budget.momenta)} | {_bands(pf, lm)} | {np.mean(seconds):.0f} |")
    head = (f"{protocol.setting}, {budget.rounds} rounds, seeds {list(budget.seeds)}; accuracy (%) after fine-tuning, mean ± std "
            f"over seeds of the mean over the 50 clients.")
    return head + "\n\n" + "\n".join(lines) + "\n\nTuning (first seed, final accuracy after fine-tuning):\n\n" + "\n".join(
        f"- {n}" for n in notes) + "\n", runs


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


def run_key(cfg: ExperimentConfig) -> str:
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k != "results-dir"}, sort_keys=True)


def finished_runs(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """Results already in ``runs_dir``, keyed by their configuration (without the results directory)."""
    found = {}
    for path in sorted(runs_dir.glob("*/*.json")):
        res = json.loads(path.read_text())
        if isinstance(res, dict) and "config" in res and "final" in res:
            res["path"] = str(path)
            found[run_key(ExperimentConfig.from_mapping(res["config"]))] = res
    return found
