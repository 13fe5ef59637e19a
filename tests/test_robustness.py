"""Issue 7 through Flower's simulation engine: broken clients cost at most their own update, and
runs are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedmeta import config as C
from fedmeta.simulations.apps import build_client_app
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.strategies import LocalMOML, PerFedAvg
from test_simulation import simulate_strategy

pytestmark = pytest.mark.ray

CFG = ExperimentConfig(num_clients=4, clients_per_round=0, num_rounds=2, local_steps=2, inner_lr=0.05, lr=0.1, meta_lr=0.1,
                       momentum=0.5, seed=3, evaluate_every=0, partition="dirichlet", train_per_client=40, test_per_client=10)


def run(strategy, client_app: ClientApp, cfg: ExperimentConfig):
    """Run ``strategy`` in a ServerApp against ``client_app`` on Ray; return Flower's Result."""
    return simulate_strategy(strategy, cfg, client_app)


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


def test_a_raising_client_and_a_nan_client_cost_only_their_updates():
    strategy = PerFedAvg(**CFG.replace(algorithm=C.PER_FEDAVG).strategy_kwargs())
    result = run(strategy, broken_client_app(CFG), CFG)
    for rnd in (1, 2):
        m = result.train_metrics_clientapp[rnd]
        assert m["num-failures"] == 1  # client 1's error reply
        assert m["num-rejected"] == 1  # client 2's NaN model, screened out
        assert m["num-clients"] == 2  # clients 0 and 3 averaged
    assert all(np.isfinite(result.arrays[k].numpy()).all() for k in result.arrays)
    assert sorted(strategy.client_train[2]) == [0, 3]


@pytest.mark.parametrize("num_nodes", [0, 2], ids=["one-client-per-node", "multi-client-nodes"])
def test_same_config_and_seed_give_bit_identical_runs(tmp_path, num_nodes):
    cfg = CFG.replace(algorithm=C.LOCAL_MOML, num_nodes=num_nodes, memory_policy="keep", num_rounds=3, clients_per_round=2)
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
