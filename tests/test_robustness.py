"""Issue 7 through Flower's simulation engine: broken clients cost at most their own update, runs
are deterministic, and a killed simulation resumes to the model it would have reached."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmeta import config as C
from fedmeta.simulations.apps import build_client_app
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.strategies import LocalMOML, PerFedAvg
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError
from fakes import simulate_strategy

pytestmark = pytest.mark.ray

CFG = ExperimentConfig(num_clients=4, clients_per_round=0, num_rounds=2, local_steps=2, inner_lr=0.05, lr=0.1, meta_lr=0.1,
                       momentum=0.5, seed=3, evaluate_every=0, partition="dirichlet", train_per_client=40, test_per_client=10,
                       num_nodes=0)


def run(strategy, client_app: ClientApp, cfg: ExperimentConfig, **start_kwargs):
    """Run ``strategy`` in a ServerApp against ``client_app`` on Ray; return Flower's Result."""
    return simulate_strategy(strategy, cfg, client_app, **start_kwargs)


def broken_client_app(cfg: ExperimentConfig) -> ClientApp:
    """The fedmeta ClientApp, except that partition 1 raises and partition 2 replies with NaN."""
    inner = build_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config[C.PARTITION_ID])
        if pid == 1:
            raise RuntimeError("simulated crash of client 1")
        reply = inner(msg, context)
        if pid == 2:
            arrays = reply.content["arrays"]
            poisoned = {k: np.full_like(arrays[k].numpy(), np.nan) for k in arrays}
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in poisoned.items()})
        return reply

    app.query()(lambda msg, context: inner(msg, context))
    app.evaluate()(lambda msg, context: inner(msg, context))
    return app


def test_a_raising_client_and_a_nan_client_cost_only_their_updates(ray_runner):
    strategy = PerFedAvg(**CFG.replace(algorithm=C.PER_FEDAVG).strategy_kwargs())
    result = run(strategy, broken_client_app(CFG), CFG)
    for rnd in (1, 2):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-failures"] == 1  # client 1's error reply
        assert m["num-rejected"] == 1  # client 2's NaN model, screened out
        assert m["num-clients"] == 2  # clients 0 and 3 averaged
    assert all(np.isfinite(result.arrays[k].numpy()).all() for k in result.arrays)
    assert sorted(strategy.client_train[2]) == [0, 3]


def test_a_client_that_hangs_past_the_round_timeout_is_counted_missing_and_the_run_goes_on(ray_runner, tmp_path):
    """Flower's own round timeout: client 1 hangs through round 2; the round averages the other 3,
    says ``num-missing`` 1, and round 3 has all 4 again (its late round-2 reply is never used).

    No wall-clock bet: client 1 waits for a file the test writes only once round 2 has been aggregated
    (so it always misses the round, however slow the machine), and the round timeout is three times the
    first round of the same config measured just before on this machine (so a loaded machine slows the
    good clients and the timeout alike)."""
    cfg = CFG.replace(algorithm=C.PER_FEDAVG, num_rounds=3)
    probe = PerFedAvg(**cfg.strategy_kwargs())
    run(probe, build_client_app(cfg), cfg.replace(num_rounds=1))
    # the probe's round 1 starts the actors and loads the data, as the run's round 1 will: three times it covers
    # that round and the good clients of round 2 on this machine, at its current load
    timeout = max(10.0, 3 * max(probe.round_seconds.values()))

    release = tmp_path / "round-2-aggregated"
    inner = build_client_app(cfg)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config[C.PARTITION_ID]) == 1 and int(msg.content["config"][C.SERVER_ROUND]) == 2:
            hang_guard = time.monotonic() + 600
            while not release.exists() and time.monotonic() < hang_guard:  # another process's event: a file
                time.sleep(0.05)
        return inner(msg, context)

    app.query()(lambda msg, context: inner(msg, context))
    app.evaluate()(lambda msg, context: inner(msg, context))
    strategy = PerFedAvg(**cfg.strategy_kwargs())
    aggregate = strategy.aggregate_train

    def aggregate_and_release(server_round, replies):
        out = aggregate(server_round, replies)
        if server_round == 2:
            release.touch()
        return out

    strategy.aggregate_train = aggregate_and_release
    result = run(strategy, app, cfg, timeout=timeout)
    counts = {r: (m["num-clients"], m["num-missing"], m["num-failures"]) for r, m in result.train_metrics_clientapp.items()}
    assert counts == {1: (4, 0, 0), 2: (3, 1, 0), 3: (4, 0, 0)}
    assert sorted(strategy.client_train[2]) == [0, 2, 3]


@pytest.mark.parametrize("num_nodes", [0, 2], ids=["one-client-per-node", "multi-client-nodes"])
def test_same_config_and_seed_give_bit_identical_runs(ray_runner, tmp_path, num_nodes):
    cfg = CFG.replace(algorithm=C.LOCAL_MOML, num_nodes=num_nodes, memory_policy="keep", num_rounds=3, clients_per_round=2,
                      evaluate_every=2)
    results = []
    for i in range(2):
        run_cfg = cfg.replace(memory_dir=str(tmp_path / f"memory-{i}")) if num_nodes else cfg
        strategy = LocalMOML(**run_cfg.strategy_kwargs())
        results.append((run(strategy, build_client_app(run_cfg), run_cfg), strategy))
    (a, sa), (b, sb) = results
    for k in a.arrays:
        assert np.array_equal(a.arrays[k].numpy(), b.arrays[k].numpy()), k
    assert {r: dict(m) for r, m in a.train_metrics_clientapp.items()} == {r: dict(m) for r, m in b.train_metrics_clientapp.items()}
    assert sa.client_train == sb.client_train
    assert {r: dict(m) for r, m in a.evaluate_metrics_clientapp.items()} == {r: dict(m) for r, m in b.evaluate_metrics_clientapp.items()}
    assert sorted(a.evaluate_metrics_clientapp) == [2, 3] and sa.client_eval == sb.client_eval


# --- kill and resume a real simulation process ------------------------------------------------------

ROUNDS = 12

SIM = ["-m", "fedmeta.simulations.run", "--algorithms", C.LOCAL_MOML, "--dataset", "sinewave", "--num-clients", "6",
       "--clients-per-round", "3", "--memory-policy", "keep", "--num-rounds", str(ROUNDS), "--evaluate-every", "4",
       "--local-steps", "2", "--seed", "3"]


def _simulation(results: Path, log: Path, *extra: str, own_ray: bool = True) -> subprocess.Popen:
    """``fedmeta-sim`` in its own session, starting its own Ray (its Ray daemons and actors share its process group),
    or with ``own_ray=False`` attached to the session's Ray (``RAY_ADDRESS``)."""
    env = {**{k: v for k, v in os.environ.items() if own_ray is False or k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, *SIM, "--results-dir", str(results), *extra], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=results.parent, env=env, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _group_gone(pgid: int, timeout: float = 60) -> bool:
    """Whether every process of group ``pgid`` has exited (SIGKILLed members take a moment to be reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)  # also any Ray process left behind
    assert rc == 0, log.read_text()[-3000:]


def _checkpoint_round(path: Path) -> int:
    try:
        return CheckpointDir(path).load().round
    except CheckpointError:
        return -1


@pytest.mark.parametrize("num_nodes", ["0", "2"], ids=["one-client-per-node", "multi-client-nodes"])
def test_a_simulation_killed_after_round_k_resumes_to_the_uninterrupted_model(ray_runner, tmp_path, num_nodes, capsys):
    """SIGKILL to the whole simulation (driver, Ray daemons, actors) once round 3 is checkpointed, then
    ``--resume`` (on the session's Ray): same final model, bit for bit, and the same per-client records as a run never killed (the same
    command, run in this process on the session's Ray)."""
    from fedmeta.simulations import run as sim_run

    stem = f"{C.LOCAL_MOML}-sinewave-n6-seed3"
    ref_dir, run_dir = tmp_path / "ref" / "results", tmp_path / "run" / "results"
    for d in (ref_dir, run_dir):
        d.parent.mkdir()
    log = tmp_path / "log.txt"
    assert sim_run.main([*SIM[2:], "--results-dir", str(ref_dir), "--num-nodes", num_nodes]) == 0, capsys.readouterr()

    ckpt = run_dir / "checkpoints" / stem
    proc = _simulation(run_dir, log, "--num-nodes", num_nodes)
    try:
        deadline = time.monotonic() + 600
        while _checkpoint_round(ckpt) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        killed_at = _checkpoint_round(ckpt)
    finally:
        _kill_group(proc)
    assert 3 <= killed_at < ROUNDS, f"checkpoint round {killed_at} when killed\n{log.read_text()[-3000:]}"
    assert _group_gone(proc.pid), "processes of the killed simulation are still running"  # Ray's daemons and actors too
    assert not (run_dir / f"{stem}.json").exists()

    _finish(_simulation(run_dir, log, "--num-nodes", num_nodes, "--resume", own_ray=False), log)  # any Ray will do
    ref, resumed = CheckpointDir(ref_dir / "checkpoints" / stem).load(), CheckpointDir(ckpt).load()
    assert resumed.round == ROUNDS
    for k in ref.arrays:
        np.testing.assert_array_equal(resumed.arrays[k].numpy(), ref.arrays[k].numpy(), err_msg=k)
    a, b = (json.loads((d / f"{stem}.json").read_text()) for d in (ref_dir, run_dir))
    assert b["resumed_from"] >= killed_at and a["resumed_from"] is None
    for key in ("train", "evaluate", "client_train", "clients", "final"):
        assert b[key] == a[key], key
    assert max(m[C.MEMORY_ROUND] for m in b["client_train"][str(ROUNDS)].values()) > 0  # memories were carried
