"""``fedmeta-tune``: an Optuna study over the settings of a centralized run or a Flower simulation.

``fedmeta-tune SPACE.toml [--jobs 2] [--trials 20] [--study-dir DIR] [--storage URL]`` reads a search-space file
(:mod:`fedmeta.simulations.tune_space`: the base run, the settings to search, the objective's metric and the study),
checks all of it before any trial runs, and runs the study: each trial is one run of
:func:`fedmeta.centralized.train` or :func:`fedmeta.simulations.run.simulate` with the trial's settings, its value the
run's final ``metric``. A trial reports the metric at every evaluation of the run (a tracker, :class:`PruneOn`), so
the median pruner can stop it early.

The study lives in a storage: by default an Optuna journal file, ``<study-dir>/study.journal``
(``optuna.storages.journal.JournalFileBackend``), or any ``--storage`` URL Optuna accepts (``sqlite:///study.db``).
Run the same command again after an interruption and the study continues: finished trials are kept, and a trial left
running by a process of this machine that no longer exists is marked failed and run again with the same settings
(its retry is enqueued). Several machines can share a study through one storage (a journal file on a shared file
system, or a database URL). ``--jobs N`` runs N trials at once, in N worker processes (Ray's simulation runs one per
process).

What it writes in the study directory: ``best.toml`` (the best trial's run: the ``[run]`` table of a space file, or
``flwr run . --run-config best.toml`` for a simulation), ``best.json`` (its params, value and trial), ``trials.csv`` and
``trials.md`` (every trial: number, state, value, params, start, end, seconds), Optuna's plots (``*.png``,
``optuna.visualization.matplotlib``) and each trial's run under ``trials/``.

Optuna is the optional extra ``fedmeta[tune]``; without it, this command and the reproductions that tune stop with
one line saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedmeta.extras import MissingExtra, need
from fedmeta.simulations.tune_space import SpaceError, StudySettings, TuneSpec, load_spec, runner_metrics

OWNER = "fedmeta-worker"
"""A trial's user attribute: the host, pid and process start time of the process that runs it."""
RETRY_OF = "fedmeta-retry-of"
"""A retried trial's user attribute: the number of the trial it runs again."""
INTERRUPTED = "fedmeta-interrupted"
"""A failed trial's user attribute: Ctrl-C stopped it (it is run again, as a killed one)."""
JOURNAL = "study.journal"
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def optuna_module(who: str = "fedmeta-tune") -> Any:
    """``optuna``, quiet (warnings only, no experimental-feature warnings), or :class:`fedmeta.extras.MissingExtra`:
    ``<who> needs Optuna: pip install 'fedmeta[tune]'``."""
    optuna = need("tune", who)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# --------------------------------------------------------------------------------------------
# Storage and recovery


JOURNAL_LOCK_GRACE_S = 10
"""A journal file's lock (Optuna's, held for each write) that a killed process left is released after this many
seconds without a write to the journal."""


def storage(url: str) -> Any:
    """An Optuna storage: a journal file for a path, or a database URL (``sqlite:///...``)."""
    optuna = optuna_module()
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

        path = Path(url).absolute()  # Optuna's lock is a symlink to this path: a relative one would dangle and a lock
        path.parent.mkdir(parents=True, exist_ok=True)  # left by a killed process would never be released
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)))
    # Optuna's heartbeats fail the trials of a process (on any machine) that stopped beating, and enqueue a retry
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9; its older name before
    hook = (dict(heartbeat_stale_trial_callback=retry(max_retry=3)) if retry is not None
            else dict(failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=3)))
    return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **hook)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a later process with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _alive(who: Mapping[str, Any]) -> bool:
    try:
        os.kill(int(who["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return who.get("start") is None or _start_time(int(who["pid"])) == who["start"]


def recover_stale(study: Any, retry: bool = True) -> list[int]:
    """Fail the trials left running by a process of this machine that is gone (killed mid-trial) and, with ``retry``,
    enqueue each one's settings again, as for the trials a Ctrl-C stopped; return their numbers. Trials of other
    machines are left to them (and, with a database storage, to Optuna's heartbeats)."""
    optuna = optuna_module()
    host, stale = socket.gethostname(), []
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    for t in trials:
        who = t.user_attrs.get(OWNER)
        gone = t.state.name == "RUNNING" and who and who["host"] == host and not _alive(who)
        if gone:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if gone or (t.state.name == "FAIL" and t.user_attrs.get(INTERRUPTED) and t.number not in retried):
            if retry:
                study.enqueue_trial(t.params, user_attrs={RETRY_OF: t.number}, skip_if_exists=False)
            stale.append(t.number)
    return stale


def counted(trials: Sequence[Any]) -> int:
    """Trials toward the study's budget: finished ones (a trial a kill or Ctrl-C stopped counts through its retry),
    running and waiting ones."""
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    retried |= {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}  # Optuna's heartbeat retries
    return sum(1 for t in trials if not (t.state.name == "FAIL" and (t.number in retried or t.user_attrs.get(INTERRUPTED))))


def open_study(spec: TuneSpec, store: Any, name: str, worker: int = 0) -> Any:
    """Create the study, or load it when it exists (it must have been made from the same space file). Worker ``w``'s
    sampler is seeded with ``seed + w``: workers with one seed would propose the same settings."""
    optuna = optuna_module()
    s = spec.study
    seed = None if s.seed < 0 else s.seed + worker
    if s.sampler == "grid":
        sampler = optuna.samplers.GridSampler(spec.grid(), seed=seed)
    elif s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, s.startup_trials))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_steps)
              if s.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=store, study_name=name, sampler=sampler, pruner=pruner, direction=spec.direction,
                                load_if_exists=True)
    made_from = study.user_attrs.get("space-digest")
    if made_from is None:
        study.set_user_attr("space-digest", spec.digest)
        study.set_user_attr("runner", spec.runner)
        study.set_user_attr("run", dict(spec.run))
    elif made_from != spec.digest:
        raise SpaceError(f"the study {name!r} in this storage was made from another space file (its run, space or objective "
                         f"differ); give a new --study-name or --study-dir")
    return study


# --------------------------------------------------------------------------------------------
# Trials


class PruneOn:
    """A tracker (:class:`fedmeta.tracking.Tracker`) that reports ``metric`` to the Optuna ``trial`` whenever the run logs
    it, and stops the run (``optuna.TrialPruned`` out of ``log``) when the trial's pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        value = values.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), int(step))
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"{self.metric} {float(value):.6g} at step {step}")

    def close(self) -> None:
        pass


def run_centralized(cfg: Any, out: Path, trackers: Sequence[Any]) -> dict[str, float]:
    """A :func:`fedmeta.centralized.train` run; its record in ``out.json``; its final values (NaN when it diverged)."""
    from fedmeta.centralized import train

    res = train(cfg, trackers=trackers)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res.to_dict()))
    return {"meta-loss": res.final_meta_loss, "train-loss": res.train_loss[-1] if res.diverged_at is None and res.train_loss else math.nan}


def run_simulation(cfg: Any, out: Path, trackers: Sequence[Any]) -> dict[str, float]:
    """A :func:`fedmeta.simulations.run.simulate` run, its results in ``out/``; its final values (none when it failed)."""
    from fedmeta.simulations.run import simulate

    res = simulate(cfg.replace(results_dir=str(out)), progress=False, trackers=trackers)
    return dict(res["final"]) if res["status"] == "ok" else {}


RUNS: dict[str, Callable[[Any, Path, Sequence[Any]], dict[str, float]]] = {"centralized": run_centralized, "simulation": run_simulation}
TRACKED: dict[str, Callable[[str], str]] = {"centralized": lambda metric: metric.replace("-", "_"),
                                            "simulation": lambda metric: f"evaluate/{metric}"}
"""A metric's name in the values a run sends its trackers (:mod:`fedmeta.tracking`): the centralized runner's
``meta_loss`` at each evaluation (step 0: the initial model) and ``train_loss`` at each iteration; a simulation's
``evaluate/<metric>`` at each evaluation round."""


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def objective(spec: TuneSpec, trials_dir: Path, worker: int = 0) -> Callable[[Any], float]:
    """A trial: the base run with the trial's settings; its value the final metric (NaN fails the trial)."""

    def run_trial(trial: Any) -> float:
        trial.set_user_attr(OWNER, owner())
        params = {d.key: d.suggest(trial) for d in spec.space}
        print(f"[trial {trial.number}] {_params(params)}: started (worker {worker})", flush=True)
        cfg = spec.config(params)
        pruning = PruneOn(trial, TRACKED[spec.runner](spec.objective.metric))
        try:
            finals = RUNS[spec.runner](cfg, trials_dir / f"{trial.number:04d}", (pruning,))
        except KeyboardInterrupt:  # Optuna fails the trial; the next run of the command runs it again
            trial.set_user_attr(INTERRUPTED, True)
            raise
        if spec.objective.metric not in finals:
            trial.set_user_attr("failure", "the run ended without a final " + spec.objective.metric)
            return math.nan
        return float(finals[spec.objective.metric])

    return run_trial


def _line(trial: Any, metric: str, worker: int) -> str:
    params = _params(trial.params)
    value = f"{metric} {trial.value:.6g}" if trial.value is not None else "no value"
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete and trial.datetime_start else 0.0
    retry = f", retry of trial {trial.user_attrs[RETRY_OF]}" if RETRY_OF in trial.user_attrs else ""
    return f"[trial {trial.number}] {params}: {value} ({trial.state.name.lower()}{retry}, {seconds:.1f} s, worker {worker})"


NEXT_TRIAL_LOCK = ".next-trial.lock"
"""In the study directory: the file lock a worker holds from counting the study's trials until its next trial exists
(it is released when the trial's run starts), so that workers starting at the same moment make no trial beyond the
budget. Workers on other machines sharing a database storage each lock their own study directory."""


def work(spec: TuneSpec, url: str, name: str, study_dir: Path, worker: int = 0, jobs: int = 1) -> None:
    """One worker: trials until the study has ``spec.study.trials`` of them (or a grid is done)."""
    optuna = optuna_module()
    if jobs > 1:
        from fedmeta.simulations.runcache import one_thread

        one_thread()  # tiny models: one thread per process, one process per core
    study = open_study(spec, storage(url), name, worker)
    run_trial = objective(spec, study_dir / "trials", worker)

    def report(study: Any, trial: Any) -> None:
        print(_line(trial, spec.objective.metric, worker), flush=True)

    study_dir.mkdir(parents=True, exist_ok=True)
    with (study_dir / NEXT_TRIAL_LOCK).open("a") as lock:
        held = False

        def release() -> None:
            nonlocal held
            if held:
                fcntl.flock(lock, fcntl.LOCK_UN)
                held = False

        def run_released(trial: Any) -> float:  # the trial exists (running): the other workers count it now
            release()
            return run_trial(trial)

        while True:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = True
            try:
                if counted(study.get_trials(deepcopy=False)) >= spec.study.trials:
                    break
                grid_done = (spec.study.sampler == "grid"
                             and len(study.get_trials(deepcopy=False)) >= math.prod(len(d.choices) for d in spec.space))
                if grid_done and not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                    break
                study.optimize(run_released, n_trials=1, callbacks=[report], catch=())
            finally:
                release()


def _die_with_parent(reader: Any) -> None:
    """In a worker: exit when the parent is gone (the pipe's other end closes), so that killing ``fedmeta-tune`` stops
    its trials too and they are resumed by the next run."""

    def watch() -> None:
        try:
            reader.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker_main(spec: TuneSpec, url: str, name: str, study_dir: Path, worker: int, jobs: int, reader: Any) -> None:
    _die_with_parent(reader)
    work(spec, url, name, study_dir, worker, jobs)


def run_study(spec: TuneSpec, study_dir: Path, url: str | None = None, name: str = "study", jobs: int = 1) -> Any:
    """Run (or continue) the study to its budget with ``jobs`` trials at once, write its outputs, return the study."""
    url = url or str(study_dir / JOURNAL)
    study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(spec, storage(url), name)
    stale = recover_stale(study)
    if stale:
        print(f"trials {', '.join(map(str, stale))} stopped before they finished (a killed process or Ctrl-C): run again", flush=True)
    done = counted(study.get_trials(deepcopy=False))
    if done:
        print(f"study {name!r}: {done} of {spec.study.trials} trials there already", flush=True)
    if jobs == 1:
        work(spec, url, name, study_dir)
    else:
        ctx = multiprocessing.get_context("spawn")
        procs, writers = [], []
        for w in range(jobs):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(spec, url, name, study_dir, w, jobs, reader), name=f"fedmeta-tune-{w}")
            p.start()
            reader.close()
            procs.append(p)
            writers.append(writer)
        try:
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise RuntimeError(f"{len(failed)} of {jobs} workers failed (exit codes {failed}); see their output above")
    study = open_study(spec, storage(url), name)
    from fedmeta.simulations.tune_report import write_outputs

    write_outputs(study, spec, study_dir)
    return study


# --------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmeta-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False,
                                epilog="metrics: centralized runs: " + ", ".join(runner_metrics("centralized")) +
                                       "; simulations: " + ", ".join(runner_metrics("simulation")))
    p.add_argument("space", help="the search-space file (TOML; see fedmeta.simulations.tune_space)")
    p.add_argument("--study-dir", default=None, help="where the study's journal and outputs go (default: results/tune/<space file name>)")
    p.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///study.db) or a journal file's path "
                                                   "(default: <study-dir>/study.journal)")
    p.add_argument("--study-name", default=None, help="the study's name in the storage (default: the space file's name)")
    p.add_argument("--jobs", type=int, default=1, help="trials at once, one worker process each (default: 1)")
    StudySettings.add_arguments(p, defaults="the space file's [study], else the setting's")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be an integer >= 1, got {args.jobs}")
    flags = {k: getattr(args, k) for k in StudySettings.settings() if getattr(args, k) is not None}
    try:
        optuna_module()
        spec = load_spec(Path(args.space), flags)
    except (MissingExtra, SpaceError) as err:
        print(f"fedmeta-tune: error: {err}", file=sys.stderr)
        return 2
    stem = Path(args.space).stem
    study_dir = Path(args.study_dir or Path("results") / "tune" / stem)
    logging.getLogger("fedmeta").setLevel(logging.WARNING)
    try:
        study = run_study(spec, study_dir, args.storage, args.study_name or stem, args.jobs)
    except SpaceError as err:
        print(f"fedmeta-tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedmeta-tune: interrupted; run the same command to continue the study (in {study_dir})", file=sys.stderr)
        return 130
    with contextlib.suppress(ValueError):
        best = study.best_trial
        print(f"best: trial {best.number}, {spec.objective.metric} {best.value:.6g} with "
              + ", ".join(f"{k}={v}" for k, v in best.params.items()))
    print(f"written to {study_dir}: best.toml, best.json, trials.csv, trials.md and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
