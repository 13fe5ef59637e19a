"""Multi-client nodes through the ClientApp: one node trains its clients together, and the result is
the per-client path's (each client alone on its own node) to float round-off; memories of clients
that do not run are preserved bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.strategies.screening import reply_view
from fedmeta import config as C
from fedmeta import meta
from fedmeta.clients import make_client_app
from fedmeta.clients.client import hosted_clients
from fedmeta.memory_bank import MemoryBank, bank_path
from fedmeta.stored_params import params_digest
from fedmeta.config import LocalMOMLConfig, PerFedAvgConfig
from fedmeta.data import ClientData
from fedmeta.models import mlp

N_CLIENTS, N_NODES = 6, 2


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _data(pid: int) -> ClientData:
    g = torch.Generator().manual_seed(1000 + pid)
    return ClientData(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g),
                      torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))


def _model():
    return mlp((4, 8, 3), torch.nn.Tanh)


def _w0() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return meta.params_of(_model())


def _message(kind: str, cfg: dict, w: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in w.items()}), "config": ConfigRecord(cfg)})
    return Message(content, dst_node_id=1, message_type=kind)


class Node:
    """A node hosting block ``pid`` of ``nodes`` (``nodes == N_CLIENTS``: one client per node)."""

    def __init__(self, app, pid: int, nodes: int, tmp_path=None):
        cfg = {C.PARTITION_ID: pid, "num-partitions": nodes}
        if tmp_path is not None:
            cfg[C.MEMORY_DIR] = str(tmp_path)
        self.app, self.context = app, Context(run_id=5, node_id=11 + pid, node_config=cfg, state=RecordDict(), run_config={})

    def __call__(self, msg: Message) -> Message:
        out = self.app(msg, self.context)
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        return out


def _hp_config(algorithm: str, estimator: str, server_round: int, policy: str = "keep") -> dict:
    if algorithm == C.PER_FEDAVG:
        hp = PerFedAvgConfig(inner_lr=0.05, meta_lr=0.1, local_steps=3, batch_size=5, inner_steps=2, meta_gradient=estimator)
    else:
        hp = LocalMOMLConfig(inner_lr=0.05, lr=0.1, momentum=0.5, local_steps=3, batch_size=5, init_batch_size=4,
                             inner_steps=2, meta_gradient=estimator, memory_policy=policy)
    return {**hp.to_wire(), C.ALGORITHM: algorithm, C.SEED: 4, C.SERVER_ROUND: server_round}


@pytest.mark.parametrize("algorithm", [C.PER_FEDAVG, C.LOCAL_MOML])
@pytest.mark.parametrize("estimator", ["exact", "first_order"])
@pytest.mark.parametrize("sampled", [[0, 1, 2], [1, 2]], ids=["cross-silo", "cross-device"])
def test_group_node_equals_one_client_per_node_over_rounds(tmp_path, algorithm, estimator, sampled):
    """Node 0 hosts clients 0, 1, 2; the others run alone on their own nodes. Over three rounds (so
    LocalMOML's kept memory matters) the group's average equals the average of the single nodes."""
    app = make_client_app(_model, _data, chunk_size=2)
    group = Node(app, 0, N_NODES, tmp_path / "bank")
    singles = {c: Node(app, c, N_CLIENTS) for c in range(N_CLIENTS)}
    w = _w0()
    for rnd in (1, 2, 3):
        cfg = _hp_config(algorithm, estimator, rnd)
        reply = group(_message(MessageType.TRAIN, {**cfg, C.CLIENT_IDS: sampled, C.NUM_CLIENTS: N_CLIENTS}, w))
        metrics = reply_view(reply.content)
        assert list(metrics[C.CLIENT_IDS]) == sampled
        memory_rounds = list(metrics[C.PER_CLIENT + C.MEMORY_ROUND])
        ref = [singles[c](_message(MessageType.TRAIN, cfg, w)) for c in sampled]
        mean = {k: np.mean([r.content["arrays"][k].numpy() for r in ref], axis=0) for k in w}
        got = {k: reply.content["arrays"][k].numpy() for k in w}
        for k in w:
            np.testing.assert_allclose(got[k], mean[k], atol=3e-6, rtol=0)
        assert memory_rounds == [int(reply_view(r.content)[C.MEMORY_ROUND]) for r in ref]
        losses = list(metrics[C.PER_CLIENT + C.TRAIN_LOSS])
        assert losses == pytest.approx([float(reply_view(r.content)[C.TRAIN_LOSS]) for r in ref], abs=1e-5)
        w = {k: torch.from_numpy(v.copy()) for k, v in got.items()}
    if algorithm == C.LOCAL_MOML:
        assert memory_rounds == [2] * len(sampled)  # round 3 started from the memories of round 2


def test_memory_of_clients_that_do_not_run_is_preserved_exactly(tmp_path):
    app = make_client_app(_model, _data)
    node = Node(app, 0, N_NODES, tmp_path)
    hosted = hosted_clients(0, N_NODES, N_CLIENTS)
    w = _w0()
    node(_message(MessageType.TRAIN, {**_hp_config(C.LOCAL_MOML, "exact", 1), C.CLIENT_IDS: hosted, C.NUM_CLIENTS: N_CLIENTS}, w))
    spec = {k: (tuple(v.shape), v.dtype) for k, v in w.items()}
    bank = MemoryBank(bank_path(tmp_path, "run-5", 0, N_NODES), hosted, spec)
    before, rounds = bank.load(hosted, torch.device("cpu"))
    assert rounds == [1, 1, 1]
    node(_message(MessageType.TRAIN, {**_hp_config(C.LOCAL_MOML, "exact", 2), C.CLIENT_IDS: [1], C.NUM_CLIENTS: N_CLIENTS}, w))
    after, rounds = bank.load(hosted, torch.device("cpu"))
    assert rounds == [1, 2, 1]
    for i in (0, 2):  # not sampled in round 2: bit-identical
        assert params_digest({k: v[i] for k, v in after.items()}) == params_digest({k: v[i] for k, v in before.items()})
    assert not torch.equal(after["1.weight"][1], before["1.weight"][1])


def test_group_evaluation_reports_each_client_like_its_own_node():
    app = make_client_app(_model, _data)
    w = _w0()
    cfg = {C.EVAL_STEPS: 2, C.EVAL_SHOTS: 5, C.INNER_LR: 0.1, C.SEED: 1, C.SERVER_ROUND: 4}
    reply = Node(app, 1, N_NODES)(_message(MessageType.EVALUATE, {**cfg, C.CLIENT_IDS: [3, 4, 5], C.NUM_CLIENTS: N_CLIENTS}, w))
    m = reply_view(reply.content)
    for i, c in enumerate([3, 4, 5]):
        alone = reply_view(Node(app, c, N_CLIENTS)(_message(MessageType.EVALUATE, cfg, w)).content)
        for key in (C.ACC_BEFORE, C.ACC_AFTER, C.LOSS_BEFORE, C.LOSS_AFTER):
            assert m[C.PER_CLIENT + key][i] == pytest.approx(alone[key], abs=1e-6)


def _ragged(pid: int) -> ClientData:
    """Clients of two sizes (as the Fallah split's two kinds), so a node's clients fall in two shape groups."""
    n_train, n_test = (30, 10) if pid % 2 else (17, 7)
    g = torch.Generator().manual_seed(2000 + pid)
    return ClientData(torch.randn(n_train, 4, generator=g), torch.randint(0, 3, (n_train,), generator=g),
                      torch.randn(n_test, 4, generator=g), torch.randint(0, 3, (n_test,), generator=g))


@pytest.mark.parametrize("shots", [0, 5], ids=["whole-train-split", "5-shot"])
def test_batched_evaluation_equals_each_client_alone_and_runs_one_vmapped_call_per_shape(shots, monkeypatch):
    """ClientGroup.evaluate vmaps the clients whose support and test sets share shapes (one call per shape
    group, no padding) and gives every client the scores MetaClient.evaluate gives it alone."""
    from fedmeta.clients.client import ClientGroup, MetaClient, round_generator
    from fedmeta.config import EvalConfig

    ev = EvalConfig(inner_lr=0.1, eval_steps=3, eval_shots=shots)
    w, ids = _w0(), [0, 1, 2, 3, 5]
    group = ClientGroup(_model(), torch.nn.functional.cross_entropy, _ragged, torch.device("cpu"))
    calls = []
    vmapped = ClientGroup._vmapped_scores
    def counted(self, *args):  # each call of the vmapped function is one batched call
        fn = vmapped(self, *args)
        return lambda *batch: calls.append(1) or fn(*batch)

    monkeypatch.setattr(ClientGroup, "_vmapped_scores", counted)
    rows = group.evaluate(w, ev, ids, seed=7, server_round=3)
    assert len(calls) == 2  # two sizes of clients: two shape groups, whatever the support draw
    for c, row in zip(ids, rows):
        alone = MetaClient(_model(), torch.nn.functional.cross_entropy, _ragged(c), torch.device("cpu")).evaluate(
            w, ev, round_generator(7, c, 3, 1))
        assert set(row) == set(alone)
        for key in alone:
            assert row[key] == pytest.approx(alone[key], abs=1e-6), (c, key)
    looped = ClientGroup(_model(), torch.nn.functional.cross_entropy, _ragged, torch.device("cpu"), vectorize="loop")
    assert looped.evaluate(w, ev, ids, seed=7, server_round=3) == [
        MetaClient(_model(), torch.nn.functional.cross_entropy, _ragged(c), torch.device("cpu")).evaluate(
            w, ev, round_generator(7, c, 3, 1)) for c in ids]
    assert len(calls) == 2  # the loop made no vmapped call


def test_batched_evaluation_of_a_regression_task_has_no_accuracy():
    from fedmeta.clients.client import ClientGroup, MetaClient, round_generator
    from fedmeta.config import EvalConfig

    def sine(pid: int) -> ClientData:
        g = torch.Generator().manual_seed(pid)
        x, xt = torch.rand(20, 1, generator=g), torch.rand(8, 1, generator=g)
        return ClientData(x, torch.sin(x), xt, torch.sin(xt))

    model = lambda: mlp((1, 8, 1), torch.nn.Tanh)  # noqa: E731
    torch.manual_seed(0)
    w = meta.params_of(model())
    ev = EvalConfig(inner_lr=0.05, eval_steps=2, eval_shots=5)
    rows = ClientGroup(model(), torch.nn.functional.mse_loss, sine, torch.device("cpu")).evaluate(w, ev, [0, 1, 2], 1, 1)
    for c, row in zip([0, 1, 2], rows):
        alone = MetaClient(model(), torch.nn.functional.mse_loss, sine(c), torch.device("cpu")).evaluate(w, ev, round_generator(1, c, 1, 1))
        assert set(row) == set(alone) == {C.LOSS_BEFORE, C.LOSS_AFTER}
        assert row == pytest.approx(alone, abs=1e-6)


def test_a_node_refuses_clients_it_does_not_host():
    app = make_client_app(_model, _data)
    node = Node(app, 0, N_NODES)
    cfg = {**_hp_config(C.PER_FEDAVG, "exact", 1), C.CLIENT_IDS: [2, 3], C.NUM_CLIENTS: N_CLIENTS}
    with pytest.raises(ValueError, match=r"client-ids must be distinct clients of this node \(0\.\.2\), got \[2, 3\]"):
        app(_message(MessageType.TRAIN, cfg, _w0()), node.context)


def test_hosted_clients_blocks_and_errors():
    assert [hosted_clients(i, 3, 10) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert hosted_clients(4, 10, 10) == [4]
    with pytest.raises(ValueError, match=r"num-partitions \(nodes\) must be in \[1, num-clients=3\]"):
        hosted_clients(0, 4, 3)


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_a_diverging_client_is_left_out_and_keeps_its_memory(tmp_path, vectorize):
    """Client 1's data holds an infinity: its training turns NaN (divergence guard). The node
    leaves it out of the average and of the memory bank and reports it; clients 0 and 2 are
    averaged as if it had not been sampled."""

    def data(pid: int) -> ClientData:
        d = _data(pid)
        if pid == 1:
            d.x_train[:] = float("inf")
        return d

    app = make_client_app(_model, data, vectorize=vectorize)
    node = Node(app, 0, N_NODES, tmp_path)
    w = _w0()
    cfg = {**_hp_config(C.LOCAL_MOML, "exact", 1), C.CLIENT_IDS: [0, 1, 2], C.NUM_CLIENTS: N_CLIENTS}
    reply = node(_message(MessageType.TRAIN, cfg, w))
    m = reply_view(reply.content)
    assert list(m[C.CLIENT_IDS]) == [0, 2] and m[C.NUM_DIVERGED] == 1
    assert all(np.isfinite(reply.content["arrays"][k].numpy()).all() for k in w)
    alone = make_client_app(_model, data)
    ref = [Node(alone, c, N_CLIENTS)(_message(MessageType.TRAIN, _hp_config(C.LOCAL_MOML, "exact", 1), w)) for c in (0, 2)]
    for k in w:
        mean = np.mean([r.content["arrays"][k].numpy() for r in ref], axis=0)
        np.testing.assert_allclose(reply.content["arrays"][k].numpy(), mean, atol=3e-6, rtol=0)
    spec = {k: (tuple(v.shape), v.dtype) for k, v in w.items()}
    _, rounds = MemoryBank(bank_path(tmp_path, "run-5", 0, N_NODES), hosted_clients(0, N_NODES, N_CLIENTS), spec).load([0, 1, 2], torch.device("cpu"))
    assert rounds == [1, -1, 1]  # client 1's memory was not written with NaN
    with pytest.raises(FloatingPointError, match="every client"):
        node(_message(MessageType.TRAIN, {**cfg, C.CLIENT_IDS: [1]}, w))
