"""Live tracking (fedmeta.tracking): TensorBoard event files and W&B offline runs hold every per-round value of a
run's results JSON; a tracker's exception stops a run and propagates; a missing package is one line naming the
extra; a bad ``track`` names the field and its choices."""

from __future__ import annotations

import json
import threading

import pytest

from fedmeta import tracking
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.run import simulate


class Stop(Exception):
    """What a tuner raises from a tracker to stop a trial (optuna.TrialPruned is an Exception too)."""


class Recorder:
    """An in-process tracker: keeps what it is given; raises :class:`Stop` at ``stop_at``."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.rows: dict[int, dict[str, float]] = {}
        self.closed = 0
        self.stop_at = stop_at

    def log(self, step, values):
        self.rows[step] = dict(values)
        if step == self.stop_at:
            raise Stop(f"pruned at {step}")

    def close(self):
        self.closed += 1


def sine_cfg(tmp_path, **kw) -> ExperimentConfig:
    base = dict(algorithm="per-fedavg", dataset="sinewave", num_clients=4, clients_per_round=2, num_rounds=3, evaluate_every=2,
                local_steps=1, num_nodes=2, results_dir=str(tmp_path), checkpoint=False)
    return ExperimentConfig(**{**base, **kw})


@pytest.mark.ray
def test_a_trackers_exception_stops_the_simulation_after_that_round_and_propagates(ray_runner, tmp_path):
    before = {t.ident for t in threading.enumerate()}
    stopper, watcher = Recorder(stop_at=2), Recorder()
    with pytest.raises(Stop, match="pruned at 2"):
        simulate(sine_cfg(tmp_path, num_rounds=6), progress=False, trackers=[watcher, stopper])
    assert sorted(stopper.rows) == [1, 2] and sorted(watcher.rows) == [1, 2]  # no round after the stop
    assert stopper.closed == 1 and watcher.closed == 1
    assert set(watcher.rows[2]) >= {"train/train-loss", "evaluate/loss-after", "round_seconds"}
    left = [t for t in threading.enumerate() if t.ident not in before and not t.daemon]
    assert not left, f"threads left running: {left}"
    assert not (tmp_path / "per-fedavg-sinewave-n4-seed0.json").exists()  # a stopped run writes no results


# --- the centralized runner (no Flower, fast) ---------------------------------------------------------------------


from fedmeta import centralized  # noqa: E402

QUAD = centralized.CentralizedConfig(task="quadratic", iterations=6, eval_every=2, eval_tasks=4, tasks_per_iteration=2)


def test_a_trackers_exception_stops_the_centralized_run_after_that_iteration_and_propagates():
    stopper, watcher = Recorder(stop_at=3), Recorder()
    with pytest.raises(Stop, match="pruned at 3"):
        centralized.train(QUAD, trackers=[watcher, stopper])
    assert sorted(stopper.rows) == [0, 1, 2, 3] and stopper.closed == 1 and watcher.closed == 1
    assert set(watcher.rows[0]) == {"meta_loss"} and set(watcher.rows[2]) == {"train_loss", "meta_loss"}
    assert set(watcher.rows[3]) == {"train_loss"}


def test_the_centralized_runners_trackers_see_every_value_of_its_record():
    watcher = Recorder()
    res = centralized.train(QUAD, trackers=[watcher]).to_dict()
    expected: dict[int, dict[str, float]] = {}
    for k, loss in enumerate(res["train_loss"], start=1):
        expected.setdefault(k, {})["train_loss"] = loss
    for k, loss in zip(res["iterations"], res["meta_loss"]):
        expected.setdefault(k, {})["meta_loss"] = loss
    assert watcher.rows == expected and watcher.closed == 1
