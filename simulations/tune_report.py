"""What a study leaves behind: its best run, its trials as a table, Optuna's plots; and the grid studies of the
reproductions' tuning steps (:func:`grid_choice`)."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedmeta.simulations.tune import OWNER, RETRY_OF, optuna_module, owner, recover_stale, storage
from fedmeta.simulations.tune_space import TuneSpec

SCORED = "fedmeta-scored"
"""A grid trial's user attribute: its value was scored (a diverged run fails the trial, scored all the same)."""
COLUMNS = ("number", "state", "value", "params", "last step", "started", "completed", "seconds", "retry of")


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, params, the last reported step, start, end, seconds, retried trial."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params),
                     "last step": t.last_step, "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                     "completed": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else "",
                     "seconds": None if seconds is None else round(seconds, 1), "retry of": t.user_attrs.get(RETRY_OF)})
    return rows


def _shown(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_shown(x)}" for k, x in v.items())
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_shown(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def toml_value(v: Any) -> str:
    """A TOML scalar or array (JSON's strings, numbers and arrays are TOML's)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v)


def write_outputs(study: Any, spec: TuneSpec, out: Path) -> list[Path]:
    """``best.toml``, ``best.json``, ``trials.csv``, ``trials.md`` and the plots, in ``out``."""
    rows = trial_rows(study)
    written = [out / "trials.csv", out / "trials.md"]
    with (out / "trials.csv").open("w", newline="") as fh:
        keys = sorted({k for r in rows for k in r["params"]})
        writer = csv.writer(fh)
        writer.writerow([c for c in COLUMNS if c != "params"] + keys)
        for r in rows:
            writer.writerow([r[c] if r[c] is not None else "" for c in COLUMNS if c != "params"] + [r["params"].get(k, "") for k in keys])
    head = (f"{spec.runner} runs, {spec.direction} {spec.objective.metric}; sampler {spec.study.sampler}, pruner "
            f"{spec.study.pruner}; {len(rows)} trials")
    (out / "trials.md").write_text(f"{head}\n\n{markdown_table(rows)}\n")
    try:
        best = study.best_trial
    except ValueError:  # no trial completed
        return written
    run = {**spec.run, **best.params}
    (out / "best.toml").write_text(f"# fedmeta-tune: the best trial ({best.number}) of study {study.study_name!r}, "
                                   f"{spec.objective.metric} = {best.value!r}; runner {spec.runner}\n"
                                   + "".join(f"{k} = {toml_value(v)}\n" for k, v in run.items()))
    (out / "best.json").write_text(json.dumps({"runner": spec.runner, "trial": best.number, "metric": spec.objective.metric,
                                               "direction": spec.direction, "value": best.value, "params": best.params,
                                               "run": run}, indent=1))
    return written + [out / "best.toml", out / "best.json"] + plots(study, out)


def plots(study: Any, out: Path) -> list[Path]:
    """Optuna's matplotlib plots that apply to this study: the optimization history, the intermediate values (when
    trials reported any), a slice per parameter, and with two or more parameters the importances and (with SciPy
    installed) the contour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = optuna_module()
    vis = optuna.visualization.matplotlib
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    kinds: list[tuple[str, Callable[[Any], Any]]] = [("optimization_history", vis.plot_optimization_history)]
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        kinds.append(("intermediate_values", vis.plot_intermediate_values))
    if complete:
        kinds.append(("slice", vis.plot_slice))
    if len({k for t in complete for k in t.params}) >= 2 and len(complete) >= 2:
        kinds.append(("param_importances", vis.plot_param_importances))
        if importlib.util.find_spec("scipy") is not None:  # Optuna's contour plot interpolates with SciPy
            kinds.append(("contour", vis.plot_contour))
    paths = []
    for name, plot in kinds:
        with warnings.catch_warnings():  # Optuna's "experimental" notes and matplotlib's layout notes
            warnings.simplefilter("ignore")
            result = plot(study)
            axes = result.ravel()[0] if hasattr(result, "ravel") else result
            fig = axes.get_figure()
            fig.tight_layout()
            fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        paths.append(out / f"{name}.png")
    return paths


# --------------------------------------------------------------------------------------------
# The reproductions' tuning steps


def grid_choice(journal: Path | None, name: str, grid: Mapping[str, Sequence[Any]], score: Callable[[Mapping[str, Any]], float],
                direction: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Tune on ``grid`` with an Optuna grid study ``name`` in the journal file ``journal`` (None: in memory): every grid
    point is a trial whose value is ``score(params)`` (a run the reproduction already has, from its run cache); NaN (a
    diverged run) fails the trial. Returns the chosen params (the best value; among equal values the first in grid
    order, as ``min``/``max`` over the grid picks; None when every trial failed) and the trials as :func:`trial_rows`.

    A study already in the journal (an earlier or interrupted invocation) is continued: its scored trials are kept, and a
    trial left running by a process that is gone is failed and its grid point scored again."""
    optuna = optuna_module("this reproduction tunes on a grid and")
    store = storage(str(journal)) if journal is not None else None
    study = optuna.create_study(storage=store, study_name=name, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.GridSampler({k: list(v) for k, v in grid.items()}, seed=0))
    recover_stale(study, retry=False)
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]
    scored = {tuple(t.params[k] for k in keys) for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get(SCORED) and set(keys) <= set(t.params)}

    def trial_value(trial: Any) -> float:
        value = score({k: trial.suggest_categorical(k, list(grid[k])) for k in keys})
        trial.set_user_attr(SCORED, True)
        return value

    for p in points:  # in grid order, so that a summary lists the trials as the grid reads
        if tuple(p[k] for k in keys) not in scored:
            study.enqueue_trial(p, user_attrs={OWNER: owner()})
            study.optimize(trial_value, n_trials=1, catch=())
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        return None, rows
    best = (min if direction == "minimize" else max)(r["value"] for r in done)
    order = {tuple(p[k] for k in keys): i for i, p in enumerate(points)}
    chosen = min((r for r in done if r["value"] == best), key=lambda r: order.get(tuple(r["params"][k] for k in keys), len(order)))
    return dict(chosen["params"]), rows


def trials_lines(title: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A summary's lines for one tuning study: which trials ran (number, params, value, state)."""
    return [f"{title}: " + "; ".join(f"trial {r['number']} {_shown(r['params'])}: {_shown(r['value'])} ({r['state'].lower()})" for r in rows)]
