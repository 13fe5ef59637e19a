"""Whole runs through Flower's simulation engine on Ray, with a few virtual clients."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedmeta import config as C
from fedmeta.clients.client import MetaClient, round_generator
from fedmeta.config import LocalMOMLConfig
from fedmeta.data import partitions
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.apps import initial_model
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.strategies import LocalMOML
from fedmeta.strategies.aggregation import average_arrays, sample_partitions

from fakes import check_provenance, simulate_strategy

pytestmark = pytest.mark.ray

N, B, ROUNDS, SEED = 6, 2, 8, 4
CFG = ExperimentConfig(num_clients=N, clients_per_round=B, num_rounds=ROUNDS, local_steps=2, inner_lr=0.05, lr=0.1,
                       momentum=0.5, seed=SEED, evaluate_every=0, num_nodes=0)


def replay(cfg: ExperimentConfig, hp: LocalMOMLConfig) -> dict[str, np.ndarray]:
    """The same run in one process: sampling, batches and memory handled by hand, no Flower."""
    parts = partitions(cfg.dataset, **cfg.data_kwargs())
    model = cfg.build_model()
    w = {k: v.detach() for k, v in initial_model(cfg).named_parameters()}
    memory: dict[int, dict] = {}
    for r in range(1, cfg.num_rounds + 1):
        outs = []
        for pid in sample_partitions(cfg.num_clients, cfg.clients_per_round, cfg.seed, r):
            client = MetaClient(model, torch.nn.functional.cross_entropy, parts[pid], torch.device("cpu"))
            res = client.train(w, hp, memory.get(pid), round_generator(cfg.seed, pid, r, 0))
            if hp.memory_policy == "keep":
                memory[pid] = res.personalized_model
            outs.append(ArrayRecord({k: v for k, v in res.meta_model.items()}))
        avg = average_arrays(outs, [1.0] * len(outs))
        w = {k: torch.from_numpy(avg[k].numpy().copy()) for k in w}
    return {k: v.numpy() for k, v in w.items()}


def last_participation_before(r: int, pid: int) -> int:
    for q in range(r - 1, 0, -1):
        if pid in sample_partitions(N, B, SEED, q):
            return q
    return -1


def assert_same_model(result, expected: dict[str, np.ndarray]) -> None:
    for k, v in expected.items():
        np.testing.assert_allclose(result.arrays[k].numpy(), v, rtol=1e-5, atol=1e-6)


def assert_different_model(result, other: dict[str, np.ndarray]) -> None:
    assert max(float(np.abs(result.arrays[k].numpy() - v).max()) for k, v in other.items()) > 1e-4


def test_keep_memory_persists_across_rounds_in_which_the_client_was_not_sampled(ray_runner):
    strategy = LocalMOML(**{**CFG.strategy_kwargs(), "memory_policy": "keep"})
    result = simulate_strategy(strategy, CFG)

    gaps = []
    for r, clients in strategy.client_train.items():
        assert sorted(clients) == sample_partitions(N, B, SEED, r)
        for pid, metrics in clients.items():
            prev = last_participation_before(r, pid)
            assert metrics[C.MEMORY_ROUND] == prev  # u is exactly the one written in its last participating round
            if prev > 0:
                gaps.append(r - prev)
    assert max(gaps) >= 2, "the schedule must include a client that skipped rounds"

    hp = strategy.hparams
    assert_same_model(result, replay(CFG, hp))
    assert_different_model(result, replay(CFG, hp.replace(memory_policy="reset")))


@pytest.mark.parametrize("meta_gradient", ["exact", "first_order"])
def test_multi_client_nodes_run_the_same_experiment_as_one_client_per_node(ray_runner, tmp_path, meta_gradient):
    """The run of the test above on 2 nodes hosting 3 clients each (batched, memory banks): the
    same memories and the same final model as the per-client replay."""
    cfg = CFG.replace(num_nodes=2, memory_dir=str(tmp_path), meta_gradient=meta_gradient)
    strategy = LocalMOML(**{**cfg.strategy_kwargs(), "memory_policy": "keep"})
    assert strategy.multi_client
    result = simulate_strategy(strategy, cfg)
    for r, clients in strategy.client_train.items():
        assert sorted(clients) == sample_partitions(N, B, SEED, r)
        assert all(m[C.MEMORY_ROUND] == last_participation_before(r, pid) for pid, m in clients.items())
    assert_same_model(result, replay(cfg, strategy.hparams))


def test_reset_memory_is_rebuilt_every_round(ray_runner):
    strategy = LocalMOML(**CFG.strategy_kwargs())  # cross-device default: reset
    assert strategy.hparams.memory_policy == "reset"
    result = simulate_strategy(strategy, CFG)
    assert all(m[C.MEMORY_ROUND] == -1 for clients in strategy.client_train.values() for m in clients.values())
    assert_same_model(result, replay(CFG, strategy.hparams))
    assert_different_model(result, replay(CFG, strategy.hparams.replace(memory_policy="keep")))


def test_default_experiment_smoke_run(ray_runner, tmp_path, capsys):
    code = sim_run.main([
        "--num-clients", "6", "--clients-per-round", "3", "--num-rounds", "3", "--evaluate-every", "3",
        "--results-dir", str(tmp_path),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "local-moml" in out and "per-fedavg" in out and "Personalized accuracy" in out
    # 2 runs x 3 rounds x 3 clients x H = 4 local steps
    assert re.search(r"^2 runs in [0-9.]+ s of wall time; 72 client meta-steps, [0-9.]+ client-steps/s; CPU: [0-9.]+ of \d+ cores busy on "
                     r"average \(\d+ %, the whole machine\)$", out, re.M), out
    for algo in ("local-moml", "per-fedavg"):
        res = json.loads((tmp_path / f"{algo}-fashion-mnist-n6-seed0.json").read_text())
        assert res["config"]["algorithm"] == algo
        check_provenance(res["provenance"], res["config"])
        assert sorted(res["train"], key=int) == ["1", "2", "3"]
        assert all(m["num-clients"] == 3 for m in res["train"].values())
        assert len(res["clients"]) == 6  # every client evaluated after the last round
        assert 0.0 <= res["final"][C.ACC_AFTER] <= 1.0
        assert res["final"][C.ACC_AFTER + "-std"] >= 0.0
        # the default layout: one multi-client node per actor slot (num-cpus = 1), every reply timed
        assert res["config"]["num-nodes"] == min(os.cpu_count() or 1, 6)
        assert sorted(res["handler_seconds"]["train"], key=int) == ["1", "2", "3"]
        assert res["phase_seconds"]["evaluate"] > 0 and res["phase_seconds"]["checkpoint"] > 0
    figures = json.loads((tmp_path / "usage-local-moml-fashion-mnist-n6-seed0.json").read_text())
    assert figures["runs"] == ["local-moml-fashion-mnist-n6-seed0.json", "per-fedavg-fashion-mnist-n6-seed0.json"]
    assert figures["client_steps"] == 72 and figures["wall_s"] > 0
    check_provenance(figures["provenance"], figures["provenance"]["config"])


def test_the_usage_line_counts_client_steps_over_wall_time_and_the_busy_cores(monkeypatch):
    rows = [{"config": {"local-steps": 4}, "train": {"1": {"num-clients": 10}, "2": {"num-clients": 9}}, "path": "r/a.json"},
            {"config": {"local-steps": 2}, "train": {"1": {"num-clients": 5}}, "path": "r/b.json"}]
    monkeypatch.setattr(sim_run, "busy_cpu_seconds", lambda: 115.0)
    monkeypatch.setattr(sim_run.os, "cpu_count", lambda: 2)
    figures = sim_run.usage(rows, 10.0, 100.0)
    assert figures == {"runs": ["a.json", "b.json"], "wall_s": 10.0, "client_steps": 86, "client_steps_per_s": 8.6, "busy_cores": 1.5,
                       "cores": 2}
    assert sim_run.usage_line(figures) == ("2 runs in 10.0 s of wall time; 86 client meta-steps, 8.6 client-steps/s; "
                                                     "CPU: 1.50 of 2 cores busy on average (75 %, the whole machine)")
    monkeypatch.setattr(sim_run, "busy_cpu_seconds", lambda: None)  # no /proc/stat
    assert sim_run.usage_line(sim_run.usage(rows[:1], 4.0, None)) == "1 run in 4.0 s of wall time; 76 client meta-steps, 19.0 client-steps/s"


def test_bad_cli_input_fails_before_any_work(capsys):
    assert sim_run.main(["--momentum", "1.5"]) == 2
    assert "momentum" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no silent prefix matching of flags
        sim_run.main(["--num-round", "3"])
    with pytest.raises(ValueError, match="did you mean 'num-rounds'"):
        ExperimentConfig.from_mapping({"num-round": 3})


def test_the_estimator_setting_reaches_the_clients_through_the_engine(ray_runner):
    """GGS with N=2 inner steps, set in the experiment config, is what the simulated clients run."""
    # delta=1e-2: the gradient difference divides float32 round-off (threads differ between Ray workers
    # and this process) by delta only 100x, so the replay can match to 1e-5
    cfg = CFG.replace(num_rounds=3, inner_steps=2, meta_gradient="ggs", num_directions=3, delta=1e-2)
    strategy = LocalMOML(**{**cfg.strategy_kwargs(), "memory_policy": "keep"})
    assert (strategy.hparams.meta_gradient, strategy.hparams.inner_steps, strategy.hparams.num_directions) == ("ggs", 2, 3)
    result = simulate_strategy(strategy, cfg)
    for clients in strategy.client_train.values():
        for m in clients.values():
            init = 2 if m[C.MEMORY_ROUND] == -1 else 0  # the memory's N-step start
            assert m[C.NUM_GRADIENTS] == init + cfg.local_steps * (2 + 1 + 2 * (3 + 1))
    assert_same_model(result, replay(cfg, strategy.hparams))
    assert_different_model(result, replay(cfg, strategy.hparams.replace(meta_gradient="exact")))


def test_thousand_clients_on_two_multi_client_nodes(ray_runner, tmp_path):
    """1,000 sinewave clients on 2 simulated SuperNodes, B=100 per round, LocalMOML keeping each
    client's memory in the nodes' memory banks: every round trains exactly the sampled clients,
    and a client that trains again starts from the memory of its last round."""
    cfg = ExperimentConfig(algorithm=C.LOCAL_MOML, dataset="sinewave", num_clients=1000, num_nodes=2, clients_per_round=100,
                           num_rounds=4, local_steps=2, inner_lr=0.01, lr=0.01, momentum=0.5, memory_policy="keep",
                           evaluate_every=4, seed=SEED, results_dir=str(tmp_path))
    res = sim_run.simulate(cfg)
    last_trained: dict[int, int] = {}
    for rnd in range(1, cfg.num_rounds + 1):
        rows = res["client_train"][rnd]
        assert sorted(rows) == sample_partitions(1000, 100, SEED, rnd)
        assert res["train"][rnd]["num-clients"] == 100 and res["train"][rnd]["num-failures"] == 0
        for pid, row in rows.items():
            assert row[C.MEMORY_ROUND] == last_trained.get(pid, -1), (rnd, pid)
            last_trained[pid] = rnd
    assert any(r >= 0 for rows in res["client_train"].values() for r in (row[C.MEMORY_ROUND] for row in rows.values()))
    assert res["final"]["num-clients"] == 1000 and np.isfinite(res["final"][C.LOSS_AFTER])
