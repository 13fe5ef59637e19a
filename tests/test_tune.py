"""fedmeta-tune: the space file's checks, a small sine study through the real Optuna (pruning, a kill mid-study and its
resume, two trials at once, the docs' example), and the reproductions' grid studies."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fakes import doc_snippet
from fedmeta.simulations import tune
from fedmeta.simulations.tune_report import grid_choice
from fedmeta.simulations.tune_space import SpaceError, load_spec

optuna = pytest.importorskip("optuna")  # the extra fedmeta[tune]; the test environment installs it

PAGE = "docs/tuning.md"
SPACE = doc_snippet("space", "toml", page=PAGE)
CLI = Path(sys.executable).with_name("fedmeta-tune")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_trials(study_dir: Path, name: str) -> list:
    study = optuna.load_study(study_name=name, storage=tune.storage(str(study_dir / tune.JOURNAL)))
    return study.get_trials(deepcopy=False)


# --------------------------------------------------------------------------------------------
# The space file: every problem before any trial


@pytest.mark.parametrize("change, message", [
    (("[space.meta-lr]", "[space.meta-lrr]"), r"\[space.meta-lrr\]: unknown config key 'meta-lrr'.*did you mean 'meta-lr'\?"),
    (("low = 1e-3\nhigh = 0.3\nlog = true", "low = -0.1\nhigh = 0.3"), r"\[space.meta-lr\] low = -0.1 is not allowed: meta_lr \(beta\) must be a finite number > 0, got -0.1"),
    (("metric = \"meta-loss\"", "metric = \"meta-los\""), r"metric must be one of \['meta-loss', 'train-loss'\].*did you mean 'meta-loss'\?"),
    (("trials = 6", "trials = 0"), r"trials must be an integer >= 1, got 0"),
    (("[study]", "[studdy]"), r"unknown key 'studdy'.*did you mean 'study'\?"),
    (("\nlog = true\n", "\nlog = true\nstep = 0.01\n"), r"log = true needs low > 0 and no step, got low = 0.001, step = 0.01"),
    (("iterations = 30", "iterations = 0"), r"\[run\]: iterations \(K\) must be an integer >= 1, got 0"),
    (("[space.meta-lr]", "[space.meta-gradient]"), r"\[space.meta-gradient\]: meta-gradient is a str setting: give choices = \[...\], not a range"),
])
def test_a_bad_space_file_is_one_line_before_any_trial(tmp_path, capsys, change, message):
    old, new = change
    assert old in SPACE
    space = write(tmp_path / "bad.toml", SPACE.replace(old, new, 1))
    assert tune.main([str(space), "--study-dir", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedmeta-tune: error: ") and re.search(message, err), err
    assert not (tmp_path / "study").exists()  # nothing ran, nothing written


def test_a_choice_the_setting_does_not_allow_and_a_grid_of_ranges_are_refused(tmp_path):
    space = write(tmp_path / "s.toml", SPACE + '\n[space.outer-optimizer]\nchoices = ["sgd", "adamw"]\n')
    with pytest.raises(SpaceError, match=r"\[space.outer-optimizer\] = 'adamw' is not allowed: outer_optimizer must be one of "
                                         r"\['adam', 'sgd'\].*did you mean 'adam'\?"):
        load_spec(space)
    with pytest.raises(SpaceError, match=r"sampler 'grid' needs choices for every setting: \[space.meta-lr\] is a range"):
        load_spec(write(tmp_path / "g.toml", SPACE), {"sampler": "grid"})


def test_a_flag_wins_over_the_file_and_the_direction_follows_the_metric(tmp_path):
    spec = load_spec(write(tmp_path / "s.toml", SPACE), {"trials": 9})
    assert (spec.study.trials, spec.study.startup_trials, spec.direction) == (9, 2, "minimize")
    assert spec.config({"meta-lr": 0.05}).meta_lr == 0.05 and spec.config({}).iterations == 30
    sim = write(tmp_path / "sim.toml", 'runner = "simulation"\n[run]\ndataset = "sinewave"\n[space.inner-lr]\nlow = 0.001\nhigh = 0.1\n'
                                       '[objective]\nmetric = "accuracy-after"\n')
    assert load_spec(sim).direction == "maximize"


def test_without_optuna_it_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` does where it is not installed
    assert tune.main([str(write(tmp_path / "s.toml", SPACE))]) == 2
    assert capsys.readouterr().err == "fedmeta-tune: error: fedmeta-tune needs Optuna: pip install 'fedmeta[tune]'\n"
    from fedmeta.simulations.reproduce import main as reproduce

    assert reproduce(["localmoml-table2", "--quick", "--out", str(tmp_path / "o"), "--runs", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ("fedmeta-reproduce: error: fedmeta-reproduce localmoml-table2 tunes on a grid and needs "
                                       "Optuna: pip install 'fedmeta[tune]'\n")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------
# The reproductions' grid studies


def test_a_grid_study_scores_every_point_picks_as_min_does_and_keeps_its_trials(tmp_path):
    grid = (0.001, 0.005, 0.01, 0.05)
    scores = {0.001: 0.9, 0.005: 0.4, 0.01: 0.4, 0.05: math.nan}  # a tie (the first in grid order wins) and a diverged run
    scored = []

    def score(p):
        scored.append(p["meta-lr"])
        return scores[p["meta-lr"]]

    journal = tmp_path / "tuning.journal"
    best, rows = grid_choice(journal, "eta", {"meta-lr": grid}, score, "minimize")
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    assert best == {"meta-lr": min(finite, key=finite.get)} == {"meta-lr": 0.005}
    assert scored == list(grid)
    assert [(r["number"], r["params"]["meta-lr"], r["state"]) for r in rows] == [
        (0, 0.001, "COMPLETE"), (1, 0.005, "COMPLETE"), (2, 0.01, "COMPLETE"), (3, 0.05, "FAIL")]
    scored.clear()
    again, rows2 = grid_choice(journal, "eta", {"meta-lr": grid}, score, "minimize")  # a second invocation: nothing rescored
    assert (again, scored, len(rows2)) == (best, [], 4)
    assert grid_choice(None, "acc", {"momentum": (0.1, 0.5, 0.9)}, lambda p: {0.1: 0.7, 0.5: 0.8, 0.9: 0.8}[p["momentum"]],
                       "maximize")[0] == {"momentum": 0.5}


def test_a_grid_trial_left_running_by_a_killed_reproduction_is_scored_again(tmp_path):
    journal = tmp_path / "tuning.journal"
    study = optuna.create_study(storage=tune.storage(str(journal)), study_name="eta")
    dead = {"host": tune.socket.gethostname(), "pid": 2**22 + 1, "start": None}  # above Linux's pid_max: no such process
    study.enqueue_trial({"meta-lr": 0.01}, user_attrs={tune.OWNER: dead})
    trial = study.ask()  # running, its process gone
    trial.suggest_categorical("meta-lr", [0.001, 0.01])
    best, rows = grid_choice(journal, "eta", {"meta-lr": (0.001, 0.01)}, lambda p: {0.001: 0.5, 0.01: 0.3}[p["meta-lr"]], "minimize")
    assert best == {"meta-lr": 0.01}
    assert [(r["params"]["meta-lr"], r["state"]) for r in rows] == [(0.01, "FAIL"), (0.001, "COMPLETE"), (0.01, "COMPLETE")]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # this test asks, not optimizes
@pytest.mark.parametrize("where", ["study.journal", "sqlite:///{tmp}/study.db"])
def test_a_trial_left_running_by_a_dead_process_of_this_machine_is_failed_and_enqueued_again(tmp_path, where):
    store = tune.storage(where.format(tmp=tmp_path) if "://" in where else str(tmp_path / where))
    study = optuna.create_study(storage=store, study_name="s")
    alive = study.ask()
    alive.set_user_attr(tune.OWNER, tune.owner())  # this process: running, not stale
    dead = study.ask({"meta-lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True)})
    dead.set_user_attr(tune.OWNER, {"host": tune.socket.gethostname(), "pid": 2**22 + 1, "start": None})
    elsewhere = study.ask()
    elsewhere.set_user_attr(tune.OWNER, {"host": "another-machine", "pid": 2**22 + 1, "start": None})  # left to that machine
    assert tune.recover_stale(study) == [1]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["RUNNING", "FAIL", "RUNNING", "WAITING"]
    assert trials[3].system_attrs["fixed_params"] == dead.params and trials[3].user_attrs[tune.RETRY_OF] == 1
    assert tune.counted(trials) == 3  # the failed one counts through its retry


def test_a_trial_stopped_by_ctrl_c_is_run_again_and_counts_once():
    study = optuna.create_study()
    done = study.ask({"meta-lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True)})
    study.tell(done, 0.5)
    stopped = study.ask({"meta-lr": optuna.distributions.FloatDistribution(1e-3, 0.3, log=True)})
    stopped.set_user_attr(tune.INTERRUPTED, True)
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    assert tune.counted(study.get_trials()) == 1
    assert tune.recover_stale(study) == [1]
    waiting = study.get_trials()[2]
    assert (waiting.state.name, waiting.system_attrs["fixed_params"], waiting.user_attrs[tune.RETRY_OF]) == ("WAITING", stopped.params, 1)
    assert tune.counted(study.get_trials()) == 2 and tune.recover_stale(study) == []  # retried once


# --------------------------------------------------------------------------------------------
# A small sine study through the command line


class Lines:
    """A process's output, line by line, as it comes (a reader thread; the test waits on each line)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.seen, self.q = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        while True:
            line = self.q.get(timeout=timeout)
            assert line is not None, f"the process ended before printing {pattern!r}:\n{''.join(self.seen)}"
            self.seen.append(line)
            if re.search(pattern, line):
                return line


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(CLI), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def grid_values(spec) -> dict[float, float]:
    """The final meta-loss at each point of localmoml's step-size grid, run here (the centralized runner, no Optuna)."""
    from fedmeta.centralized import train
    from fedmeta.simulations.reproduce_table2 import PAPER_GRID

    return {lr: train(spec.config({"meta-lr": lr})).final_meta_loss for lr in PAPER_GRID}


@pytest.mark.subprocess
def test_a_journal_lock_left_by_a_killed_process_is_released_and_the_study_opens(tmp_path, monkeypatch):
    """A process killed while it held the journal's lock (Optuna's, taken for each write) leaves it behind; the next
    ``fedmeta-tune`` with the same relative ``--study-dir`` opens the study after the grace period instead of waiting
    forever (Optuna's symlink lock dangled when the journal's path was relative)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "JOURNAL_LOCK_GRACE_S", 3)
    url = f"study/{tune.JOURNAL}"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fedmeta.simulations import tune; "
                               "tune.storage(sys.argv[1])._backend._lock.acquire(); print('locked', flush=True); sys.stdin.read()", url],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.kill()  # by pid, holding the lock
        holder.wait(timeout=60)
    assert os.path.islink(url + ".lock")
    spec = load_spec(write(tmp_path / "s.toml", SPACE))
    opening = threading.Thread(target=tune.open_study, args=(spec, tune.storage(url), "s"), daemon=True)
    opening.start()
    opening.join(timeout=60)  # a hang guard: it waited forever
    assert not opening.is_alive() and not os.path.lexists(url + ".lock")
    assert tune.open_study(spec, tune.storage(url), "s").user_attrs["space-digest"] == spec.digest


def test_workers_counting_the_budget_at_the_same_moment_make_no_trial_beyond_it(tmp_path, monkeypatch):
    """Two workers of a 1-trial study, the first held between counting the study's trials and creating its trial until
    the second has counted too (or 1 s has passed): without the lock both would see 0 trials and make one each."""
    spec = load_spec(write(tmp_path / "s.toml", SPACE), {"trials": 1})
    monkeypatch.setattr(tune, "objective", lambda spec, trials_dir, worker: lambda trial: 0.0)
    both_counted, first = threading.Barrier(2), threading.Lock()
    counted = tune.counted

    def counted_then_wait(trials):
        n = counted(trials)
        if first.acquire(blocking=False):  # the first count of the study: wait for the other worker's
            with contextlib.suppress(threading.BrokenBarrierError):
                both_counted.wait(timeout=1.0)
        elif both_counted.n_waiting:
            both_counted.wait()
        return n

    monkeypatch.setattr(tune, "counted", counted_then_wait)
    url = str(tmp_path / "study" / tune.JOURNAL)
    workers = [threading.Thread(target=tune.work, args=(spec, url, "s", tmp_path / "study", w)) for w in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert len(load_trials(tmp_path / "study", "s")) == 1


@pytest.mark.subprocess
def test_a_study_killed_mid_trial_resumes_prunes_and_beats_the_grids_worst(tmp_path):
    space = write(tmp_path / "sine.toml", SPACE)
    args = [str(space), "--study-dir", "study"]
    first = start(args, tmp_path)
    try:
        out = Lines(first)
        out.wait_for(r"^\[trial 0\] .*\(complete")
        killed = int(out.wait_for(r"^\[trial 1\] .*started").split("]")[0].split()[-1])
        first.kill()  # by pid, in the middle of trial 1
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    before = load_trials(tmp_path / "study", "sine")
    assert [(t.number, t.state.name) for t in before] == [(0, "COMPLETE"), (killed, "RUNNING")]

    second = subprocess.run([str(CLI), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "trials 1 stopped before they finished (a killed process or Ctrl-C): run again" in second.stdout
    trials = load_trials(tmp_path / "study", "sine")
    assert trials[0].datetime_start == before[0].datetime_start and trials[0].value == before[0].value  # kept, not rerun
    assert trials[1].state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get(tune.RETRY_OF) == 1]
    assert len(retry) == 1 and retry[0].params == before[1].params and retry[0].state.name in ("COMPLETE", "PRUNED")
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6 and len(trials) == 7
    assert any(t.state.name == "PRUNED" for t in trials), [(t.number, t.state.name, t.intermediate_values) for t in trials]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert all(t.last_step < 30 for t in pruned)  # stopped before the run's last iteration

    spec = load_spec(space)
    best = min(t.value for t in trials if t.state.name == "COMPLETE")
    worst = max(grid_values(spec).values())
    assert best < worst - 0.05, (best, worst)
    rows = list(csv.DictReader((tmp_path / "study" / "trials.csv").open()))
    assert [r["state"] for r in rows] == [t.state.name for t in trials] and rows[1]["state"] == "FAIL"
    assert re.search(r"meta-lr = [0-9.e-]+\n", (tmp_path / "study" / "best.toml").read_text())


@pytest.mark.subprocess
def test_the_docs_example_runs_two_trials_at_once(tmp_path):
    """docs/tuning.md: its space file and its command, as written."""
    write(tmp_path / "sine.toml", SPACE)
    command = shlex.split(doc_snippet("command", "sh", page=PAGE))
    assert command[0] == "fedmeta-tune" and "--jobs" in command
    proc = subprocess.run([str(CLI), *command[1:], "--trials", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = tmp_path / command[command.index("--study-dir") + 1]
    for name in ("study.journal", "best.toml", "best.json", "trials.csv", "trials.md", "optimization_history.png", "slice.png", tune.NEXT_TRIAL_LOCK):
        assert (study / name).exists(), name
    trials = [t for t in load_trials(study, "sine") if t.datetime_complete]
    assert len(trials) == 4  # two workers starting a trial at the same moment make no trial beyond the budget
    overlapping = [(a.number, b.number) for a in trials for b in trials
                   if a.number < b.number and a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete]
    assert overlapping, [(t.number, t.datetime_start, t.datetime_complete) for t in trials]
    assert {line.split("worker ")[1].rstrip(")") for line in proc.stdout.splitlines() if "started (worker" in line} == {"0", "1"}


SIM_SPACE = """runner = "simulation"

[run]
algorithm = "per-fedavg"
dataset = "sinewave"
num-clients = 4
clients-per-round = 2
num-rounds = 4
evaluate-every = 2
local-steps = 1
num-nodes = 2
checkpoint = false

[space.meta-lr]
choices = [0.001, 0.05]

[objective]
metric = "loss-after"

[study]
sampler = "grid"
trials = 2
startup-trials = 1
"""


@pytest.mark.ray
def test_a_simulation_study_reports_each_evaluation_round_and_prunes_on_it(ray_runner, tmp_path):
    import json

    from fedmeta.simulations.config import ExperimentConfig

    spec = load_spec(write(tmp_path / "sim.toml", SIM_SPACE))
    study = tune.run_study(spec, tmp_path / "study", name="sim")
    first, second = study.get_trials(deepcopy=False)
    assert (first.params, first.state.name) == ({"meta-lr": 0.05}, "COMPLETE")
    results = json.loads(next((tmp_path / "study" / "trials" / "0000").glob("*.json")).read_text())
    assert first.intermediate_values == {r: m["loss-after"] for r, m in ((int(r), m) for r, m in results["evaluate"].items())}
    assert first.value == results["final"]["loss-after"]
    # the other step size is worse at round 2 than the first trial was: stopped there, round 4 never ran
    assert second.state.name == "PRUNED" and list(second.intermediate_values) == [2]
    assert second.intermediate_values[2] > first.intermediate_values[2]
    import tomllib

    best = tomllib.loads((tmp_path / "study" / "best.toml").read_text())
    assert ExperimentConfig.from_mapping(best).meta_lr == 0.05  # the best run, as a run config
