"""Live tracking (fedmeta.tracking): TensorBoard event files and W&B offline runs hold every per-round value of a
run's results JSON; a tracker's exception stops a run and propagates; a missing package is one line naming the
extra; a bad ``track`` names the field and its choices."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedmeta import tracking
from fedmeta.extras import MissingExtra
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


# --- reading a tracker's files back with the backends' own readers ---------------------------------------------------


def tensorboard_values(log_dir: Path) -> dict[int, dict[str, float]]:
    """Every scalar of the event files in ``log_dir``, step -> {tag: value}, read by TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert tag not in out.get(event.step, {}), f"{tag} logged twice at step {event.step}"
            out.setdefault(event.step, {})[tag] = event.value
    return out


def wandb_values(run_dir: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """The history rows (step -> {key: value}, W&B's own keys left out) and the config of the offline run in
    ``run_dir``, read from its .wandb file by wandb's own reader (``wandb leet inspect --json``)."""
    [log] = run_dir.glob("run-*.wandb")
    proc = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows: dict[int, dict[str, float]] = {}
    config: dict = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        if record["type"] == "history":
            item = record["history"]["item"]
            rows[int(record["history"]["step"]["num"])] = {k: float(v) for k, v in item.items() if not k.startswith("_")}
        elif record["type"] == "run":
            config = record["run"]["config"]["update"]
    return rows, config


def assert_same_values(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]], rel: float) -> None:
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        assert sorted(got[step]) == sorted(values), f"step {step}"
        for key, value in values.items():
            g = got[step][key]
            assert (math.isnan(g) and math.isnan(value)) or g == pytest.approx(value, rel=rel, abs=1e-30), f"{key} at step {step}"


def results_values(results: dict) -> dict[int, dict[str, float]]:
    """Every per-round value of a results JSON, read here without fedmeta.tracking's help: results[section][round][key]
    as section/key, results["round_seconds"][round] as round_seconds."""
    out: dict[int, dict[str, float]] = {}
    for section in ("train", "evaluate"):
        for r, metrics in results[section].items():
            out.setdefault(int(r), {}).update({f"{section}/{k}": v for k, v in metrics.items()})
    for r, seconds in results["round_seconds"].items():
        out.setdefault(int(r), {})["round_seconds"] = seconds
    return out


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, no network, nothing written outside ``tmp_path``; wandb's service process is stopped at the end."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb-home"),
                       "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_DISABLE_GIT": "true",
                       "WANDB_PROJECT": "fedmeta-test"}.items():
        monkeypatch.setenv(key, value)
    import wandb

    yield
    wandb.teardown()


# --- the simulation (Ray) --------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.subprocess  # wandb's service process
def test_tensorboard_and_wandb_hold_every_per_round_value_of_the_simulations_results(ray_runner, tmp_path, wandb_offline):
    # W&B through the setting (its run opened in the ServerApp's thread), TensorBoard as a tracker of this process
    cfg = sine_cfg(tmp_path, num_rounds=3, evaluate_every=2, track="wandb")
    own = tracking.open_tracker("tensorboard", "tuner-side", tmp_path / "tb")
    res = simulate(cfg, progress=False, trackers=[own])
    results = json.loads(Path(res["path"]).read_text())
    expected = results_values(results)
    assert sorted(expected) == [1, 2, 3] and "evaluate/loss-after" in expected[2] and "evaluate/loss-after" in expected[3]
    assert "train/train-loss" in expected[1] and "train/num-failures" in expected[1] and "round_seconds" in expected[1]
    assert_same_values(tensorboard_values(own.path), expected, rel=1e-6)  # float32 in the event file
    [run_dir] = (tmp_path / "tracking" / "wandb").glob("offline-run-*")  # <results-dir>/tracking by default
    rows, config = wandb_values(run_dir)
    assert_same_values(rows, expected, rel=0)
    assert config["config"] == results["config"] and config["git"] == results["provenance"]["git"]  # the provenance block


# --- the centralized runner (fast but for wandb's service process) ---------------------------------------------------


def centralized_expected(res: dict) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for k, loss in enumerate(res["train_loss"], start=1):
        out.setdefault(k, {})["train_loss"] = loss
    for k, loss in zip(res["iterations"], res["meta_loss"]):
        out.setdefault(k, {})["meta_loss"] = loss
    return out


def test_the_centralized_runners_tensorboard_file_holds_every_value_of_its_record(tmp_path, capsys):
    record = tmp_path / "run.json"
    assert centralized.main(["--task", "quadratic", "--iterations", "6", "--eval-every", "2", "--eval-tasks", "4",
                             "--tasks-per-iteration", "2", "--track", "tensorboard", "--tracking-dir", str(tmp_path / "tb"),
                             "--json", str(record)]) == 0
    res = json.loads(record.read_text())
    [log_dir] = (tmp_path / "tb").iterdir()
    assert log_dir.name.startswith("centralized-maml-quadratic-exact-seed0-")
    assert_same_values(tensorboard_values(log_dir), centralized_expected(res), rel=1e-6)


@pytest.mark.subprocess  # wandb's service process
def test_the_centralized_runners_wandb_offline_run_holds_every_value_and_the_provenance(tmp_path, wandb_offline):
    res = centralized.train(QUAD.replace(track="wandb", tracking_dir=str(tmp_path / "wb")))
    [run_dir] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    rows, config = wandb_values(run_dir)
    assert_same_values(rows, centralized_expected(res.to_dict()), rel=0)
    assert config["config"]["iterations"] == 6 and config["git"]["commit"] and config["versions"]["torch"]  # the provenance block


def test_non_finite_values_are_logged_as_they_are_and_non_numbers_are_refused(tmp_path):
    tb = tracking.open_tracker("tensorboard", "odd", tmp_path)
    tb.log(1, {"loss": math.nan, "up": math.inf, "flag": True})
    with pytest.raises(TypeError, match="tracked value 'name' must be a number, got 'x'"):
        tb.log(2, {"name": "x"})
    tb.close()
    got = tensorboard_values(tb.path)
    assert math.isnan(got[1]["loss"]) and got[1]["up"] == math.inf and got[1]["flag"] == 1.0 and 2 not in got


# --- bad input and missing packages -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, flag", [("tensorboard", "TensorBoard"), ("wandb", "Weights & Biases")])
def test_a_missing_package_is_one_line_naming_the_extra_before_any_work(monkeypatch, capsys, tmp_path, extra, flag):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(MissingExtra, match=rf"^--track {extra} needs {flag}: pip install 'fedmeta\[{extra}\]'$"):
        tracking.open_tracker(extra, "run", tmp_path)
    from fedmeta.simulations import run as sim_run

    assert sim_run.main(["--dataset", "sinewave", "--track", extra, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"fedmeta-sim: error: --track {extra} needs {flag}: pip install 'fedmeta[{extra}]'\n"
    assert centralized.main(["--task", "quadratic", "--track", extra]) == 2
    assert capsys.readouterr().err == f"fedmeta.centralized: error: --track {extra} needs {flag}: pip install 'fedmeta[{extra}]'\n"
    assert not list(tmp_path.iterdir())  # nothing ran


def test_a_bad_track_names_the_field_and_the_choices(capsys, tmp_path):
    from fedmeta.simulations import run as sim_run

    assert sim_run.main(["--dataset", "sinewave", "--track", "tensorbord", "--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("fedmeta-sim: error: track must be one of ['none', 'tensorboard', 'wandb'], got 'tensorbord'; "
                                       "did you mean 'tensorboard'?\n")
    with pytest.raises(ValueError, match=r"^track must be one of \['none', 'tensorboard', 'wandb'\], got 'bogus'$"):
        centralized.CentralizedConfig(track="bogus")
    with pytest.raises(ValueError, match=r"^track must be one of \['none', 'tensorboard', 'wandb'\], got 'wandbb'; did you mean 'wandb'\?$"):
        tracking.open_tracker("wandbb", "run", tmp_path)  # the track setting's check, before anything is written
    assert not list(tmp_path.iterdir())
    from fedmeta.dif_maml import DifMAMLConfig

    with pytest.raises(ValueError, match=r"^track must be one of"):
        DifMAMLConfig.from_mapping({"track": "bogus"})


# --- docs/tracking.md, run as written -------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.subprocess  # the command line of the page
def test_the_tracking_pages_examples_run_as_written(ray_runner, tmp_path, monkeypatch, capsys):
    from fakes import doc_snippet

    monkeypatch.chdir(tmp_path)
    proc = subprocess.run(["bash", "-e", "-c", doc_snippet("track-cli", "sh", page="docs/tracking.md")], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "PATH": f"{Path(sys.executable).parent}:"
                                                                                            f"{__import__('os').environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "results" / "per-fedavg-sinewave-n4-seed0.json").read_text())
    [log_dir] = (tmp_path / "results" / "tracking").glob("per-fedavg-sinewave-n4-seed0-*")
    assert_same_values(tensorboard_values(log_dir), results_values(results), rel=1e-6)

    exec(compile(doc_snippet("track-python", page="docs/tracking.md"), "docs/tracking.md:track-python", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "runs" / "per-fedavg-sinewave-n4-seed0.json").read_text())
    losses = [(int(r), m["loss-after"]) for r, m in sorted(results["evaluate"].items(), key=lambda kv: int(kv[0]))]
    lines = [f"round {r}: loss after fine-tuning {loss:.4f}" for r, loss in losses]
    own = [line for line in out.splitlines() if line.startswith(("round ", "tracker ", "[("))]  # (not simulate's progress lines)
    assert own == lines + ["tracker closed", f"{[(r, round(loss, 4)) for r, loss in losses]}"] and len(losses) == 3


def test_dif_maml_trackers_see_every_tested_iteration_of_its_record():
    from fedmeta.dif_maml import DifMAMLConfig, simulate as dif_simulate

    watcher = Recorder()
    cfg = DifMAMLConfig(num_agents=3, topology="ring", iterations=4, eval_every=2, eval_tasks=5, eval_steps=1)
    res = dif_simulate(cfg, trackers=[watcher]).to_dict()
    expected = {i: {"test_loss": loss, "disagreement": d, **{f"agent_test_loss/{k}": x for k, x in enumerate(agents)}}
                for i, loss, d, agents in zip(res["iterations"], res["test_loss"], res["disagreement"], res["agent_test_loss"])}
    assert sorted(expected) == [0, 2, 4] and watcher.rows == expected and watcher.closed == 1


def test_a_resumed_run_logs_its_restored_rounds_first_so_its_tracker_holds_every_round_of_its_results(tmp_path):
    from fakes import set_task_identity
    from test_checkpoint import LoopbackGrid  # the ServerApp's loop against ClientApps called in this process

    from fedmeta.simulations.apps import build_client_app, run_server

    set_task_identity()

    cfg = sine_cfg(tmp_path, num_rounds=2, evaluate_every=1, num_nodes=0, checkpoint=True)
    run_server(LoopbackGrid(build_client_app(cfg), cfg.num_supernodes, run_id=1), cfg)
    watcher = Recorder()
    resumed = cfg.replace(num_rounds=4, resume=True, track="tensorboard")
    results = run_server(LoopbackGrid(build_client_app(resumed), cfg.num_supernodes, run_id=2), resumed, trackers=[watcher])
    expected = results_values(json.loads(Path(results["path"]).read_text()))
    assert sorted(expected) == [1, 2, 3, 4] and results["resumed_from"] == 2
    assert watcher.rows == expected and watcher.closed == 1
    [log_dir] = (tmp_path / "tracking").iterdir()
    assert_same_values(tensorboard_values(log_dir), expected, rel=1e-6)


@pytest.mark.subprocess  # a fresh interpreter: what the base install imports
def test_the_backends_are_imported_only_when_a_tracker_opens(tmp_path):
    code = ("import sys, fedmeta.simulations.run, fedmeta.simulations.apps, fedmeta.centralized, fedmeta.dif_maml, fedmeta.tracking as t\n"
            "assert not {'tensorboard', 'wandb', 'torch.utils.tensorboard'} & set(sys.modules), sorted(sys.modules)\n"
            "t.open_tracker('none', 'run').log(1, {'x': 1.0})\n"
            "assert not {'tensorboard', 'wandb'} & set(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split("[")[0].split("=")[0].split(">")[0].strip() in ("tensorboard", "wandb")]
    assert project["optional-dependencies"]["tensorboard"] == ["tensorboard"] and project["optional-dependencies"]["wandb"] == ["wandb"]
