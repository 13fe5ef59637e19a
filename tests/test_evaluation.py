"""Personalized evaluation: no leakage, both protocols, new-client adaptation, the FedAvg baselines."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import config as C
from fedmeta import meta, personalize
from fedmeta.clients import MetaClient, make_client_app
from fedmeta.algorithms import FedAvgConfig
from fedmeta.algorithms.executor import local_round
from fedmeta.config import EvalConfig
from fedmeta.data import ClientData
from fedmeta.models import mlp
from fedmeta.simulations.config import EVAL_PROTOCOLS, ExperimentConfig
from fedmeta.strategies.aggregation import holdout_partitions

# Reading a tensor's metadata is not reading its data.
_METADATA = {"shape", "device", "dtype", "is_floating_point", "size", "dim", "to"}


class Tripwire(torch.Tensor):
    """A tensor that fails any computation on its values while ``armed``."""

    armed = True
    touched: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if cls.armed and name not in _METADATA:
            cls.touched.append(name)
            raise AssertionError(f"the test split was read before scoring ({name})")
        return super().__torch_function__(func, types, args, kwargs or {})


def _trapped_data() -> ClientData:
    g = torch.Generator().manual_seed(0)
    return ClientData(
        x_train=torch.randn(30, 4, generator=g), y_train=torch.randint(0, 3, (30,), generator=g),
        x_test=torch.randn(12, 4, generator=g).as_subclass(Tripwire),
        y_test=torch.randint(0, 3, (12,), generator=g).as_subclass(Tripwire),
    )


@pytest.fixture
def armed(monkeypatch):
    """Arm the tripwire; disarm it only when ``personalize.score`` (the scoring step of
    :func:`~fedmeta.personalize.adapt_and_score`, after adaptation) is entered."""
    Tripwire.armed, Tripwire.touched = True, []
    scored = []
    real_score = personalize.score

    def score(*args, **kwargs):
        Tripwire.armed = False
        scored.append(True)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(personalize, "score", score)
    yield scored
    Tripwire.armed = False


def test_the_tripwire_catches_a_read_of_the_test_split(armed):
    data = _trapped_data()
    with pytest.raises(AssertionError, match="read before scoring"):
        data.x_test.sum()
    with pytest.raises(AssertionError):
        data.y_test == 1  # noqa: B015


@pytest.mark.parametrize("protocol", sorted(EVAL_PROTOCOLS))
def test_the_test_split_is_never_touched_before_scoring(armed, protocol):
    steps, shots = EVAL_PROTOCOLS[protocol]
    client = MetaClient(mlp((4, 8, 3)), torch.nn.functional.cross_entropy, _trapped_data(), torch.device("cpu"))
    out = client.evaluate(meta.params_of(mlp((4, 8, 3))), EvalConfig(inner_lr=0.1, eval_steps=steps, eval_shots=shots),
                          torch.Generator().manual_seed(1))
    assert armed and not Tripwire.touched
    assert 0.0 <= out[C.ACC_AFTER] <= 1.0


def test_the_evaluate_handler_does_not_touch_the_test_split_before_scoring(armed):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    app = make_client_app(lambda: mlp((4, 8, 3)), lambda pid: _trapped_data())
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in mlp((4, 8, 3)).state_dict().items()})
    cfg = ConfigRecord({**EvalConfig(eval_steps=10, eval_shots=5).to_wire(), C.SERVER_ROUND: 1})
    msg = Message(RecordDict({"arrays": arrays, "config": cfg}), dst_node_id=1, message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=1, node_config={C.PARTITION_ID: 0}, state=RecordDict(), run_config={})
    reply = app(msg, ctx)
    assert not reply.has_error() and armed and not Tripwire.touched
    assert reply.content["metrics"][C.NUM_EXAMPLES] == 12


def test_protocol_presets_override_steps_and_shots():
    assert ExperimentConfig(eval_protocol="5-shot-10-step").eval_setting == (10, 5)
    assert ExperimentConfig(eval_protocol="one-step", eval_steps=7).eval_setting == (1, 0)
    assert ExperimentConfig(eval_steps=3, eval_shots=2).eval_setting == (3, 2)
    kw = ExperimentConfig(eval_protocol="5-shot-10-step", num_nodes=0).strategy_kwargs()
    assert (kw["eval_steps"], kw["eval_shots"]) == (10, 5)
    with pytest.raises(ValueError, match="eval-protocol"):
        ExperimentConfig(eval_protocol="zero-shot")


def test_sgd_round_is_plain_sgd_on_a_quadratic():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def f(params, a_, b_):
        w = params["w"]
        return 0.5 * w @ a_ @ w - b_ @ w

    w0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    expected = w0
    for _ in range(3):
        expected = expected - 0.1 * (a @ expected - b)
    r = local_round("fedavg", f, {"w": w0}, lambda k: (a, b), FedAvgConfig(local_steps=3, batch_size=4, lr=0.1))
    got, stats = r.meta_model, r.stats
    torch.testing.assert_close(got["w"], expected, atol=1e-12, rtol=0)
    assert (stats.num_samples, stats.num_gradients, stats.num_hvps) == (12, 3, 0)


def test_holdout_partitions_are_seeded_and_distinct():
    h = holdout_partitions(20, 4, seed=3)
    assert h == holdout_partitions(20, 4, seed=3) and len(set(h)) == 4 and all(0 <= p < 20 for p in h)
    assert holdout_partitions(20, 4, seed=4) != h
    assert holdout_partitions(20, 0, seed=3) == []
    with pytest.raises(ValueError, match="num_new"):
        holdout_partitions(4, 4, seed=0)


@pytest.mark.ray
def test_new_clients_never_train_and_are_scored_by_adaptation(ray_runner, tmp_path):
    from fedmeta.simulations.run import simulate

    cfg = ExperimentConfig(algorithm="fedavg", num_clients=4, num_new_clients=2, clients_per_round=2, num_rounds=4,
                           evaluate_every=2, lr=0.05, results_dir=str(tmp_path))
    res = simulate(cfg)
    new = res["new_clients"]
    assert new == holdout_partitions(6, 2, cfg.seed) and len(new) == 2
    trained = {p for pids in res["trained_partitions"].values() for p in pids}
    assert trained and not trained & set(new)
    final = res["final"]
    assert final["num-clients"] == 4 and final["new-num-clients"] == 2
    assert 0.0 <= final[f"new-{C.ACC_AFTER}"] <= 1.0
    rows = list(csv.DictReader(open(tmp_path / "fedavg-fashion-mnist-n4-seed0.csv")))
    assert {(int(r["round"]), r["split"]) for r in rows} == {(2, "train-clients"), (2, "new-clients"), (4, "train-clients"), (4, "new-clients")}
    assert sorted(int(r["client"]) for r in rows if r["split"] == "new-clients" and r["round"] == "4") == new
    assert json.loads((tmp_path / "fedavg-fashion-mnist-n4-seed0.json").read_text())["new_clients"] == new


def test_experiment_config_checks_grouped_sampling_before_any_work():
    with pytest.raises(ValueError, match="clients-per-round"):
        ExperimentConfig(num_clients=50, sampling_groups=4, clients_per_round=13)
    with pytest.raises(ValueError, match="sampling-groups"):
        ExperimentConfig(num_clients=4, sampling_groups=5, clients_per_round=1)
    assert ExperimentConfig(num_clients=50, sampling_groups=4, clients_per_round=12, num_nodes=0).strategy_kwargs()["sampling_groups"] == 4
