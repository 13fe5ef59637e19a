"""The client: memory store, device choice, personalized evaluation without leakage, reply contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.strategies.screening import reply_view
from fedmeta import config as C
from fedmeta import meta, personalize
from fedmeta.clients import ContextMemory, MetaClient, make_client_app, select_device
from fedmeta.config import EvalConfig
from fedmeta.data import ClientData
from fedmeta.models import mlp


def _context(pid: int = 0) -> Context:
    return Context(run_id=1, node_id=11, node_config={C.PARTITION_ID: pid, "num-partitions": 2}, state=RecordDict(), run_config={})


def _data(seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(
        x_train=torch.randn(40, 4, generator=g), y_train=torch.randint(0, 3, (40,), generator=g),
        x_test=torch.randn(20, 4, generator=g), y_test=torch.randint(0, 3, (20,), generator=g),
    )


def _model():
    return mlp((4, 8, 3))


def test_context_memory_is_a_noop_on_first_round_and_round_trips_exactly():
    ctx, store = _context(), ContextMemory()
    assert store.load(ctx, torch.device("cpu")) is None and store.written_in_round(ctx) is None
    u = {"a": torch.randn(3, 2), "b": torch.randn(5)}
    store.save(ctx, u, server_round=7)
    back = store.load(ctx, torch.device("cpu"))
    assert all(torch.equal(back[k], u[k]) for k in u) and store.written_in_round(ctx) == 7
    store.clear(ctx)
    assert store.load(ctx, torch.device("cpu")) is None


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_personalized_evaluation_adapts_on_train_only_and_scores_on_test(monkeypatch):
    data = _data()
    client = MetaClient(_model(), torch.nn.functional.cross_entropy, data, torch.device("cpu"))
    w = meta.params_of(_model())
    seen = []
    real = personalize.adapt_and_score

    def spy(f, params, support, query, *args, **kwargs):
        seen.append(support)
        assert query[0] is client.data.x_test and query[1] is client.data.y_test
        return real(f, params, support, query, *args, **kwargs)

    monkeypatch.setattr(personalize, "adapt_and_score", spy)
    client.evaluate(w, EvalConfig(inner_lr=0.1, eval_steps=2, eval_shots=0), torch.Generator().manual_seed(0))
    assert seen[-1][0] is client.data.x_train and seen[-1][1] is client.data.y_train
    client.evaluate(w, EvalConfig(inner_lr=0.1, eval_steps=10, eval_shots=5), torch.Generator().manual_seed(0))
    xs = seen[-1][0]
    assert xs.shape[0] == 5
    assert all(any(torch.equal(x, t) for t in data.x_train) for x in xs)
    assert not any(any(torch.equal(x, t) for t in data.x_test) for x in xs)


def test_evaluation_scores_the_fine_tuned_model_on_the_test_split():
    data = _data()
    client = MetaClient(_model(), torch.nn.functional.cross_entropy, data, torch.device("cpu"))
    w = meta.params_of(_model())
    out = client.evaluate(w, EvalConfig(inner_lr=0.5, eval_steps=3, eval_shots=0), torch.Generator())
    adapted = w
    for _ in range(3):
        adapted = meta.adapt(client.loss, adapted, (data.x_train, data.y_train), 0.5)

    def scores(params):
        logits = torch.func.functional_call(client.model, params, (data.x_test,))
        return float(torch.nn.functional.cross_entropy(logits, data.y_test)), float((logits.argmax(-1) == data.y_test).float().mean())

    (loss_after, acc_after), (loss_before, acc_before) = scores(adapted), scores(w)
    assert out[C.ACC_AFTER] == pytest.approx(acc_after) and out[C.LOSS_AFTER] == pytest.approx(loss_after)
    assert out[C.LOSS_BEFORE] == pytest.approx(loss_before) and out[C.ACC_BEFORE] == pytest.approx(acc_before)


def _train_message(cfg: dict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in _model().state_dict().items()})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)}), dst_node_id=11, message_type=MessageType.TRAIN)


def test_train_handler_reply_contract_and_memory():
    app = make_client_app(_model, lambda pid: _data(pid))
    ctx = _context()
    cfg = {C.ALGORITHM: "local-moml", C.SERVER_ROUND: 3, C.SEED: 1, **C.LocalMOMLConfig(local_steps=2, memory_policy="keep").to_wire()}
    reply = app(_train_message(cfg), ctx)
    assert not reply.has_error()
    m = reply_view(reply.content)
    assert m[C.NUM_EXAMPLES] == 40 and m[C.NUM_SAMPLES] == 5 + 2 * 3 * 5 and m[C.NUM_GRADIENTS] == 1 + 2 * 2 and m[C.NUM_HVPS] == 2
    assert m[C.MEMORY_ROUND] == -1 and m[C.PARTITION_ID] == 0
    # identifiers travel in client-info, where no strategy averages them; the MetricRecord holds quantities
    ids = (C.PARTITION_ID, C.MEMORY_ROUND, C.MEMORY_DIGEST)
    assert set(ids) <= set(reply.content[C.CLIENT_INFO]) and not set(ids) & set(reply.content["metrics"])
    assert set(reply.content["arrays"]) == set(_model().state_dict())
    assert ContextMemory().written_in_round(ctx) == 3
    cfg[C.SERVER_ROUND] = 5
    assert reply_view(app(_train_message(cfg), ctx).content)[C.MEMORY_ROUND] == 3


def test_train_handler_rejects_bad_config_before_work():
    app = make_client_app(_model, lambda pid: _data(pid))
    cfg = {C.ALGORITHM: "local-moml", C.SERVER_ROUND: 1, **C.LocalMOMLConfig().to_wire(), C.MOMENTUM: 2.0}
    with pytest.raises(ValueError, match="momentum"):
        app(_train_message(cfg), _context())
    with pytest.raises(ValueError, match="algorithm"):
        app(_train_message({C.ALGORITHM: "fedsgd", C.SERVER_ROUND: 1}), _context())


def test_received_arrays_must_match_the_model():
    client = MetaClient(_model(), torch.nn.functional.cross_entropy, _data(), torch.device("cpu"))
    good = {k: v.detach() for k, v in _model().state_dict().items()}
    with pytest.raises(ValueError, match="do not match"):
        client.params_from({**good, "extra": torch.zeros(1)})
    bad = dict(good)
    bad[next(iter(good))] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        client.params_from(bad)


def test_a_diverged_client_raises_instead_of_returning_a_poisoned_model():
    app = make_client_app(_model, lambda pid: _data(pid))
    ctx = _context()
    ok = {C.ALGORITHM: "local-moml", C.SERVER_ROUND: 1, **C.LocalMOMLConfig(memory_policy="keep").to_wire()}
    app(_train_message(ok), ctx)
    kept = ContextMemory().load(ctx, torch.device("cpu"))
    diverging = {**ok, C.SERVER_ROUND: 2, C.LR: 1e30, C.INNER_LR: 1e30, C.LOCAL_STEPS: 5}
    with pytest.raises(FloatingPointError, match="diverged"):
        app(_train_message(diverging), ctx)
    after = ContextMemory().load(ctx, torch.device("cpu"))
    assert all(torch.equal(after[k], kept[k]) for k in kept) and ContextMemory().written_in_round(ctx) == 1


@pytest.mark.parametrize(
    "name, grads_per_step, hvps_per_step, losses_per_step",
    [  # N = 2 inner steps, U = 3 directions; per meta-step: N inner gradients + 1 outer + N corrections
        ("exact", 3, 2, 0),
        ("first_order", 3, 0, 0),
        ("hessian_free", 3 + 2 * 2, 0, 0),
        ("ggs", 3 + 2 * (3 + 1), 0, 0),
        ("zeroth_order", 3, 0, 2 * (2 * 3 + 1)),
        ("fo_muml", 3, 0, 0),
    ],
)
def test_train_handler_runs_every_estimator_and_reports_its_work(name, grads_per_step, hvps_per_step, losses_per_step):
    app = make_client_app(_model, lambda pid: _data(pid))
    est = dict(inner_steps=2, meta_gradient=name, num_directions=3)
    for hp, init in ((C.PerFedAvgConfig(local_steps=2, **est), (0, 0)), (C.LocalMOMLConfig(local_steps=2, memory_policy="reset", **est), (5 * 2, 2))):
        cfg = {C.ALGORITHM: hp.algorithm, C.SERVER_ROUND: 1, C.SEED: 3, **hp.to_wire()}
        torch.manual_seed(0)  # _train_message draws a fresh model: the same one both times
        reply = app(_train_message(cfg), _context())
        assert not reply.has_error()
        m = reply_view(reply.content)
        assert m[C.NUM_SAMPLES] == init[0] + 2 * (2 * 2 + 1) * 5
        assert (m[C.NUM_GRADIENTS], m[C.NUM_HVPS], m[C.NUM_LOSS_EVALS]) == (
            init[1] + 2 * grads_per_step, 2 * hvps_per_step, 2 * losses_per_step)
        torch.manual_seed(0)
        again = app(_train_message(cfg), _context())  # same seed, round and partition: same model (directions too)
        for k in reply.content["arrays"]:
            np.testing.assert_array_equal(reply.content["arrays"][k].numpy(), again.content["arrays"][k].numpy())


def test_switching_estimators_does_not_change_the_batches(monkeypatch):
    """The random directions come from their own generator: exact and ggs see the same S, T, D batches."""
    client = MetaClient(_model(), torch.nn.functional.cross_entropy, _data(), torch.device("cpu"))
    w = meta.params_of(_model())
    original = type(client.data).sample
    seen: dict[str, list] = {}
    for name in ("exact", "ggs"):
        draws = seen.setdefault(name, [])
        monkeypatch.setattr(type(client.data), "sample", lambda self, k, g, _d=draws: _d.append(original(self, k, g)) or _d[-1])
        hp = C.PerFedAvgConfig(local_steps=2, inner_steps=2, meta_gradient=name)
        client.train(w, hp, None, torch.Generator().manual_seed(9))
    assert len(seen["exact"]) == len(seen["ggs"]) == 2 * 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen["exact"], seen["ggs"]))
