"""The search-space file of ``fedmeta-tune``: the base run, the settings to search, the objective and the study.

A space file is TOML::

    runner = "centralized"        # or "simulation" (Flower's Ray engine, fedmeta-sim's settings)

    [run]                         # the base run: settings of the runner (CentralizedConfig / ExperimentConfig keys)
    task = "sine-table2"
    iterations = 60

    [space.meta-lr]               # a setting to search: a range ...
    low = 1e-3
    high = 0.3
    log = true                    # optional: sample on a log scale (low > 0); step = ... for a stepped range

    [space.outer-optimizer]       # ... or a list of choices
    choices = ["sgd", "adam"]

    [objective]
    metric = "meta-loss"          # a final value of the run (fedmeta-tune --help lists them)
    direction = "minimize"        # default: maximize for accuracies, minimize otherwise

    [study]                       # every key is also a flag of fedmeta-tune (--trials 12)
    trials = 8

Everything is checked when the file is read, before any trial runs: an unknown key names the nearest valid one, and
every end of a range and every choice must be a value the setting allows (the run is built with each of them).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from fedmeta import config as C
from fedmeta import settings as S

RUNNERS = ("centralized", "simulation")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
CENTRALIZED_METRICS = ("meta-loss", "train-loss")
"""A centralized run's values: the last recorded evaluation (the meta-loss of eq. 2, or the few-shot test error with a
few-shot ``eval-protocol``) and the last iteration's training loss."""


def simulation_metrics() -> tuple[str, ...]:
    """A simulation's final personalized-evaluation values (``results["final"]``): each score, its std and 10th
    percentile over clients, and the held-out clients' (``new-``)."""
    base = (C.ACC_AFTER, C.ACC_BEFORE, C.LOSS_AFTER, C.LOSS_BEFORE)
    one = tuple(f"{k}{s}" for k in base for s in ("", "-std", "-p10"))
    return one + tuple(f"new-{k}" for k in one)


def runner_config(runner: str) -> type:
    """The settings class of ``runner``'s runs."""
    if runner == "centralized":
        from fedmeta.centralized import CentralizedConfig

        return CentralizedConfig
    from fedmeta.simulations.config import ExperimentConfig

    return ExperimentConfig


def runner_metrics(runner: str) -> tuple[str, ...]:
    return CENTRALIZED_METRICS if runner == "centralized" else simulation_metrics()


@dataclass(frozen=True)
class StudySettings(S.Settings):
    """The ``[study]`` table; each key is also a flag of ``fedmeta-tune``, which wins over the file."""

    KEY_LABELS = True
    trials: int = S.int_at_least(1, help="trials the study ends with (completed, pruned and failed ones; a retried trial "
                                         "counts once; with --jobs N, up to N - 1 more when workers start trials at the same "
                                         "moment); a grid stops at its last point").field(20)
    sampler: str = S.choice(lambda: SAMPLERS, help="tpe (Optuna's default), random, or grid: every combination of the "
                                                   "choices (each space entry needs choices)").field("tpe")
    pruner: str = S.choice(lambda: PRUNERS, help="median: stop a trial whose intermediate value is worse than the median "
                                                 "of the earlier trials' at the same step; none").field("median")
    startup_trials: int = S.int_at_least(0, help="trials that finish before the median pruner prunes and TPE stops "
                                                 "sampling at random").field(3)
    warmup_steps: int = S.int_at_least(0, help="steps (iterations or rounds) of a trial before it can be pruned").field(0)
    seed: int = S.int_at_least(-1, help="the sampler's seed; -1: none (each run of the study differs)").field(0)


@dataclass(frozen=True)
class ObjectiveSettings(S.Settings):
    """The ``[objective]`` table."""

    KEY_LABELS = True
    metric: str = S.text(help="the run's final value to optimize, also reported at each evaluation for pruning").field()
    direction: str = S.choice(lambda: ("", "minimize", "maximize"), empty_ok=False,
                              help="empty: maximize for accuracies, minimize otherwise").field("")


@dataclass(frozen=True)
class Dimension:
    """One ``[space.<key>]`` entry: a range (``low``, ``high``, ``log``, ``step``) or ``choices``."""

    name: str
    """The setting's field name (snake case)."""
    kind: type
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def key(self) -> str:
        return S.kebab(self.name)

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class TuneSpec:
    """A parsed, checked space file."""

    runner: str
    run: Mapping[str, Any]
    """The base run's settings, as in the file (kebab-case keys)."""
    space: tuple[Dimension, ...]
    objective: ObjectiveSettings
    study: StudySettings
    digest: str
    """A hash of what defines the study (runner, run, space, objective), to refuse resuming a different study."""

    @property
    def direction(self) -> str:
        return self.objective.direction or ("maximize" if "accuracy" in self.objective.metric else "minimize")

    def config(self, params: Mapping[str, Any]) -> Any:
        """The run of a trial: the base run with ``params`` (kebab-case keys) in it."""
        return runner_config(self.runner).from_mapping({**self.run, **params})

    def grid(self) -> dict[str, list[Any]]:
        return {d.key: list(d.choices) for d in self.space}


class SpaceError(ValueError):
    """A space file that cannot define a study (one line, naming the key)."""


def _unknown(where: str, found: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in found:
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SpaceError(f"unknown key {key!r} in {where}{hint} (valid keys: {', '.join(allowed)})")


def _dimension(cls: type, key: str, entry: Any, base: Callable[[Mapping[str, Any]], Any]) -> Dimension:
    where = f"[space.{key}]"
    if not isinstance(entry, dict):
        raise SpaceError(f"{where} must be a table (low/high or choices), got {entry!r}")
    _unknown(where, entry, ("low", "high", "log", "step", "choices"))
    known = cls.settings()
    name = key.replace("-", "_")
    if name not in known:
        try:  # Settings.from_mapping names the key and the nearest valid one
            cls.from_mapping({key: None})
        except ValueError as err:
            raise SpaceError(f"{where}: {str(err).replace(' (value None)', '')}") from None
    setting = known[name]
    if "choices" in entry:
        if set(entry) != {"choices"} or not isinstance(entry["choices"], list) or not entry["choices"]:
            raise SpaceError(f"{where} must have either choices (a non-empty list) or low and high, not both")
        values = tuple(entry["choices"])
        for v in values:
            _check_value(where, key, v, base)
        return Dimension(name, setting.kind, choices=values)
    if setting.kind not in (int, float):
        raise SpaceError(f"{where}: {key} is a {setting.kind.__name__} setting: give choices = [...], not a range")
    if "low" not in entry or "high" not in entry:
        raise SpaceError(f"{where} needs low and high (or choices)")
    low, high, log, step = entry["low"], entry["high"], entry.get("log", False), entry.get("step")
    for label, v in (("low", low), ("high", high), ("step", step)):
        if v is None:
            continue
        ints = setting.kind is int
        if isinstance(v, bool) or not isinstance(v, int if ints else (int, float)) or not math.isfinite(v):
            raise SpaceError(f"{where} {label} must be {'an integer' if ints else 'a finite number'}, got {v!r}")
    if not isinstance(log, bool):
        raise SpaceError(f"{where} log must be true or false, got {log!r}")
    if not low < high:
        raise SpaceError(f"{where} needs low < high, got low = {low!r}, high = {high!r}")
    if log and (low <= 0 or step is not None):
        raise SpaceError(f"{where}: log = true needs low > 0 and no step, got low = {low!r}" + (f", step = {step!r}" if step else ""))
    if step is not None and step <= 0:
        raise SpaceError(f"{where} step must be > 0, got {step!r}")
    for label, v in (("low", low), ("high", high)):
        _check_value(f"{where} {label}", key, v, base)
    kind = setting.kind
    return Dimension(name, kind, low=kind(low), high=kind(high), log=log, step=None if step is None else kind(step))


def _check_value(where: str, key: str, value: Any, base: Callable[[Mapping[str, Any]], Any]) -> None:
    """The base run with ``key = value`` must be a valid run (the setting's range and the config's own checks)."""
    try:
        base({key: value})
    except ValueError as err:
        raise SpaceError(f"{where} = {value!r} is not allowed: {err}") from None


def load_spec(path: Path, study_flags: Mapping[str, Any] | None = None) -> TuneSpec:
    """Read and check a space file (``study_flags``: ``[study]`` values from the command line, which win)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpaceError(f"no space file {str(path)!r}") from None
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{path} is not valid TOML: {err}") from None
    _unknown(str(path), data, ("runner", "run", "space", "objective", "study"))
    runner = data.get("runner", "centralized")
    if runner not in RUNNERS:
        raise SpaceError(f"runner must be one of {list(RUNNERS)}, got {runner!r}")
    run = data.get("run", {})
    space = data.get("space", {})
    for table, value in (("[run]", run), ("[space]", space), ("[objective]", data.get("objective", {})), ("[study]", data.get("study", {}))):
        if not isinstance(value, dict):
            raise SpaceError(f"{table} must be a table, got {value!r}")
    if not space:
        raise SpaceError(f"{path} has no [space.<setting>] table: nothing to search")
    cls = runner_config(runner)

    def base(params: Mapping[str, Any]) -> Any:
        return cls.from_mapping({**run, **params})

    try:
        base({})
    except ValueError as err:
        raise SpaceError(f"[run]: {err}") from None
    dims = tuple(_dimension(cls, key, entry, base) for key, entry in space.items())
    for d in dims:
        if S.kebab(d.name) in {k.replace("_", "-") for k in run}:
            raise SpaceError(f"[space.{d.key}] is also set in [run]: remove it from one of them")
    try:
        objective = ObjectiveSettings.from_mapping(data.get("objective", {}), what="[objective] key")
        study = StudySettings.from_mapping({**data.get("study", {}), **(study_flags or {})}, what="[study] key")
    except (ValueError, TypeError) as err:
        raise SpaceError(str(err).replace("missing 1 required positional argument: 'metric'", "[objective] needs metric")) from None
    metrics = runner_metrics(runner)
    if objective.metric not in metrics:
        near = difflib.get_close_matches(objective.metric, metrics, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SpaceError(f"[objective] metric must be one of {list(metrics)} for a {runner} run, got {objective.metric!r}{hint}")
    if study.sampler == "grid" and any(not d.choices for d in dims):
        bad = next(d.key for d in dims if not d.choices)
        raise SpaceError(f"sampler 'grid' needs choices for every setting: [space.{bad}] is a range")
    defining = {"runner": runner, "run": run, "space": space, "objective": dataclasses.asdict(objective)}
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return TuneSpec(runner, dict(run), dims, objective, study, digest)
