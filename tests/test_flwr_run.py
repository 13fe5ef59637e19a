"""`flwr run .` against Flower's auto-started local simulation SuperLink (a real subprocess tree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fakes import flwr_run
from test_tracking import assert_same_values, results_values, tensorboard_values

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def test_flwr_run_with_the_app_declared_in_pyproject(ray_runner, tmp_path):
    results = tmp_path / "results"
    # Flower's default federation (2 SuperNodes) for 4 clients: num-nodes = -1 (pyproject's default) becomes
    # 2 multi-client nodes of 2 clients, with no flag
    proc = flwr_run(tmp_path, f'num-clients=4 clients-per-round=2 num-rounds=2 evaluate-every=2 results-dir="{results}" '
                              f'track="tensorboard"', None)
    res = json.loads((results / "local-moml-fashion-mnist-n4-seed0.json").read_text())
    # the ServerApp (another process) opened the tracker from its run config: every per-round value of the results
    [log_dir] = (results / "tracking").glob("local-moml-fashion-mnist-n4-seed0-*")
    assert_same_values(tensorboard_values(log_dir), results_values(res), rel=1e-6)
    assert res["config"]["num-nodes"] == 2 and all(len(ids) == 2 for ids in res["trained_partitions"].values())
    assert res["status"] == "ok" and sorted(res["train"], key=int) == ["1", "2"]
    assert res["final_round"] == 2 and len(res["clients"]) == 4
    assert "inputs checked: fashion-mnist" in proc.stdout and "local-moml round 2/2" in proc.stdout  # the ServerApp's own lines

    # The supported path (`flwr run`) and the in-process engine (`run_on_ray`, which uses the deprecated
    # run_simulation) run the same experiment: the same clients, metrics and final evaluation.
    from fedmeta.simulations.config import ExperimentConfig
    from fedmeta.simulations.deploy import app_config
    from fedmeta.simulations.run import simulate

    cfg = ExperimentConfig.from_mapping({**app_config(ROOT), "num-clients": 4, "clients-per-round": 2, "num-rounds": 2,
                                         "evaluate-every": 2, "results-dir": str(tmp_path / "in-process"), "num-nodes": 2})
    here = json.loads(json.dumps(simulate(cfg, progress=False), default=str))
    assert here["config"] == {**res["config"], "results-dir": str(tmp_path / "in-process"), "track": "none"}
    assert here["trained_partitions"] == res["trained_partitions"]
    assert here["client_train"].keys() == res["client_train"].keys()
    for section in ("train", "evaluate"):
        assert here[section].keys() == res[section].keys()
        for rnd, metrics in res[section].items():
            assert here[section][rnd].keys() == metrics.keys()
            for key, value in metrics.items():
                assert here[section][rnd][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (section, rnd, key)
    for client, metrics in res["clients"].items():
        assert here["clients"][client] == pytest.approx(metrics, rel=1e-6, abs=1e-9), client


def test_flwr_run_selects_dif_maml_and_relays_like_the_simulator(tmp_path):
    run_config = ("algorithm='dif-maml' num-rounds=2 seed=3 dif-maml.shots=5 dif-maml.optimizer='sgd' dif-maml.step-size=0.01 "
                  f"track='tensorboard' results-dir='{tmp_path / 'results'}'")
    proc = flwr_run(tmp_path, run_config, 6)
    out = proc.stdout
    [log_dir] = (tmp_path / "results" / "tracking").glob("dif-maml-ring-chords-K6-seed3-*")  # the relay's tracker
    logged = tensorboard_values(log_dir)
    assert sorted(logged) == [1, 2] and all(logged[r]["train/models-up"] == 6 and logged[r]["train/models-down"] == 24 for r in (1, 2))
    assert "dif-maml: 6 agents on ring-chords (9 edges, lambda_2 = 0.5000), 2 rounds, sgd mu = 0.01" in out
    assert "dif-maml round 1: 6 models up, 24 down" in out and "dif-maml round 2: 6 models up, 24 down" in out
    from fedmeta.dif_maml import DifMAMLConfig, disagreement, simulate

    sim = simulate(DifMAMLConfig(shots=5, optimizer="sgd", step_size=0.01, seed=3, iterations=2), record=False)
    relayed = float(out.split("disagreement of the relayed states ")[1].split()[0])
    assert relayed == pytest.approx(disagreement(sim.phi), rel=1e-4) and relayed > 0


def test_pyproject_app_config_lists_every_experiment_key_with_its_default():
    import tomllib

    from fedmeta.simulations.config import ExperimentConfig

    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    dif = app_config.pop("dif-maml")  # the Dif-MAML table: DifMAMLConfig fields at their defaults
    from fedmeta.dif_maml import DifMAMLConfig

    dif_defaults = {k.replace("_", "-"): v for k, v in DifMAMLConfig().to_dict().items()}
    assert set(dif) <= set(dif_defaults) and DifMAMLConfig.from_mapping(dif) == DifMAMLConfig()
    defaults = ExperimentConfig().to_dict()
    assert set(app_config) == set(defaults)
    demo = {"num-clients", "clients-per-round", "num-rounds", "evaluate-every"}  # a small flwr-run demo
    assert {k: v for k, v in app_config.items() if k not in demo} == {k: v for k, v in defaults.items() if k not in demo}
    ExperimentConfig.from_mapping(app_config)
