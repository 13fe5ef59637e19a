"""Strategies with mocked replies and hand-worked expectations (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fakes import FakeGrid, GroupGrid, _task_identity, group_reply, reply, train_messages  # noqa: F401 (autouse fixture)
from fedmeta import config as C
from fedmeta.strategies import LocalMOML, PerFedAvg
from fedmeta.strategies.aggregation import average_arrays, sample_partitions


def test_uniform_average_of_replies_is_the_papers_mean():
    grid = FakeGrid(3)
    strategy = PerFedAvg(num_clients=3, inner_lr=0.02, meta_lr=0.1)
    msgs = train_messages(strategy, grid)
    replies = [
        reply(msgs[0], np.array([1.0, 2.0]), 0, 10, 1.0),
        reply(msgs[1], np.array([3.0, 4.0]), 1, 30, 2.0),
        reply(msgs[2], np.array([5.0, 9.0]), 2, 60, 3.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 5.0])  # (1+3+5)/3, (2+4+9)/3
    assert metrics[C.TRAIN_LOSS] == pytest.approx(2.0)
    assert metrics["num-clients"] == 3 and metrics["num-failures"] == 0


def test_example_weighted_average_and_failures_are_skipped():
    grid = FakeGrid(3)
    strategy = PerFedAvg(num_clients=3, weighting="examples")
    msgs = train_messages(strategy, grid)
    replies = [
        reply(msgs[0], np.array([1.0, 2.0]), 0, 10, 1.0),
        reply(msgs[1], np.array([3.0, 4.0]), 1, 30, 2.0),
        Message(Error(code=2, reason="client failed"), reply_to=msgs[2]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [(10 * 1 + 30 * 3) / 40, (10 * 2 + 30 * 4) / 40])
    assert metrics[C.TRAIN_LOSS] == pytest.approx((10 * 1 + 30 * 2) / 40)
    assert metrics["num-failures"] == 1


def test_all_failed_round_keeps_the_model():
    grid = FakeGrid(2)
    strategy = LocalMOML(num_clients=2)
    msgs = train_messages(strategy, grid)
    arrays, metrics = strategy.aggregate_train(1, [Message(Error(code=2, reason="x"), reply_to=m) for m in msgs])
    assert arrays is None
    assert metrics["num-failures"] == 2 and metrics["kept-global-model"] == 1 and metrics["num-clients"] == 0


def test_train_config_carries_the_algorithm_keys_and_does_not_mutate_the_callers_record():
    grid = FakeGrid(4)
    strategy = LocalMOML(num_clients=4, clients_per_round=2, inner_lr=0.03, lr=0.2, momentum=0.7, local_steps=3, batch_size=6,
                         init_batch_size=8, meta_gradient="first_order", seed=5)
    user = ConfigRecord({"user-key": 3})
    msgs = list(strategy.configure_train(2, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), user, grid))
    cfg = msgs[0].content["config"]
    assert dict(user) == {"user-key": 3}
    assert cfg[C.ALGORITHM] == "local-moml" and cfg[C.SERVER_ROUND] == 2 and cfg[C.SEED] == 5 and cfg["user-key"] == 3
    assert (cfg[C.INNER_LR], cfg[C.LR], cfg[C.MOMENTUM], cfg[C.LOCAL_STEPS]) == (0.03, 0.2, 0.7, 3)
    assert (cfg[C.BATCH_SIZE], cfg[C.INIT_BATCH_SIZE], cfg[C.META_GRADIENT]) == (6, 8, "first_order")
    assert cfg[C.MEMORY_POLICY] == "reset"  # cross-device default
    assert LocalMOML(num_clients=4).hparams.memory_policy == "keep"  # cross-silo default
    assert LocalMOML(num_clients=4, clients_per_round=2, memory_policy="keep").hparams.memory_policy == "keep"


def test_cross_device_sends_exactly_b_messages_to_the_sampled_partitions():
    grid = FakeGrid(10)
    strategy = PerFedAvg(num_clients=10, clients_per_round=3, seed=11)
    pid_of = grid.node_to_pid
    for rnd in range(1, 6):
        msgs = train_messages(strategy, grid, rnd)
        pids = sorted(pid_of[m.metadata.dst_node_id] for m in msgs)
        assert len(msgs) == 3 and pids == sample_partitions(10, 3, 11, rnd)
    # the partition query is sent once, not every round
    assert len(grid.sent) == 1


def test_sampling_is_reproducible_by_partition_across_runs_with_different_node_ids():
    a = PerFedAvg(num_clients=20, clients_per_round=5, seed=3)
    b = PerFedAvg(num_clients=20, clients_per_round=5, seed=3)
    grid_a, grid_b = FakeGrid(20, offset=100), FakeGrid(20, offset=999_999)
    for rnd in range(1, 8):
        pa = sorted(grid_a.node_to_pid[m.metadata.dst_node_id] for m in train_messages(a, grid_a, rnd))
        pb = sorted(grid_b.node_to_pid[m.metadata.dst_node_id] for m in train_messages(b, grid_b, rnd))
        assert pa == pb
    draws = {tuple(sample_partitions(20, 5, 3, r)) for r in range(1, 30)}
    assert len(draws) > 20  # rounds differ
    assert sample_partitions(20, 5, 3, 1) != sample_partitions(20, 5, 4, 1)  # seeds differ
    assert sample_partitions(20, None, 3, 1) == list(range(20))


def test_evaluation_aggregates_mean_std_p10_over_clients_and_respects_evaluate_every():
    grid = FakeGrid(4)
    strategy = PerFedAvg(num_clients=4, evaluate_every=2)
    strategy.num_rounds = 5
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), grid)) == []
    msgs = list(strategy.configure_evaluate(2, arrays, ConfigRecord({}), grid))
    assert len(msgs) == 4
    assert msgs[0].content["config"][C.EVAL_STEPS] == 1 and msgs[0].content["config"][C.EVAL_SHOTS] == 0
    assert len(list(strategy.configure_evaluate(5, arrays, ConfigRecord({}), grid))) == 4  # last round
    accs = [0.5, 0.7, 0.9, 1.0]
    replies = []
    for m in msgs:
        pid = grid.node_to_pid[m.metadata.dst_node_id]
        rec = MetricRecord({C.NUM_EXAMPLES: 10, C.PARTITION_ID: pid, C.ACC_BEFORE: 0.1, C.ACC_AFTER: accs[pid],
                            C.LOSS_BEFORE: 2.0, C.LOSS_AFTER: 1.0})
        replies.append(Message(RecordDict({"metrics": rec}), reply_to=m))
    out = strategy.aggregate_evaluate(2, replies)
    assert out[C.ACC_AFTER] == pytest.approx(np.mean(accs))
    assert out[C.ACC_AFTER + "-std"] == pytest.approx(np.std(accs))
    assert out[C.ACC_AFTER + "-p10"] == pytest.approx(np.percentile(accs, 10))
    assert strategy.client_eval[2][3][C.ACC_AFTER] == 1.0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(inner_lr=-0.1), "inner_lr"),
        (dict(meta_lr=0.0), "meta_lr"),
        (dict(local_steps=0), "local_steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(meta_gradient="second"), "meta_gradient"),
        (dict(clients_per_round=0), "clients_per_round"),
        (dict(clients_per_round=11), "clients_per_round"),
        (dict(weighting="median"), "weighting"),
    ],
)
def test_per_fedavg_rejects_bad_hyperparameters_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PerFedAvg(num_clients=10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(momentum=0.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(lr=-1.0), "lr"),
        (dict(init_batch_size=0), "init_batch_size"),
        (dict(memory_policy="forget"), "memory_policy"),
        (dict(local_steps=2.5), "local_steps"),
    ],
)
def test_local_moml_rejects_bad_hyperparameters_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LocalMOML(num_clients=10, **kwargs)


def test_momentum_error_states_the_allowed_range():
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        LocalMOML(num_clients=10, momentum=0.0)


def test_partition_query_errors_are_clear():
    class BadGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            return [Message(RecordDict({"metrics": MetricRecord({C.PARTITION_ID: 0})}), reply_to=m) for m in messages]

    strategy = PerFedAvg(num_clients=2)
    with pytest.raises(RuntimeError, match="partition-id=0"):
        train_messages(strategy, BadGrid(2))


def test_waiting_for_nodes_times_out_with_a_message():
    class Empty(FakeGrid):
        def get_node_ids(self):
            return set()

    strategy = PerFedAvg(num_clients=3, node_wait_timeout=0.3)
    with pytest.raises(RuntimeError, match="0 connected nodes serve 0 of num_clients=3 clients"):
        train_messages(strategy, Empty(3))


def test_average_arrays_keeps_dtype_and_checks_input():
    recs = [ArrayRecord({"a": Array(np.array([1, 2], np.float32))}), ArrayRecord({"a": Array(np.array([2, 4], np.float32))})]
    out = average_arrays(recs, [1.0, 3.0])
    assert out["a"].numpy().dtype == np.float32
    np.testing.assert_allclose(out["a"].numpy(), [1.75, 3.5])
    with pytest.raises(ValueError):
        average_arrays(recs, [0.0, 0.0])


def test_grouped_sampling_takes_b_prime_from_each_group():
    from fedmeta.strategies.aggregation import sample_grouped

    groups = [list(range(0, 13)), list(range(13, 26)), list(range(26, 38)), list(range(38, 50))]  # np.array_split(50, 4)
    for rnd in range(1, 20):
        picks = sample_grouped(50, 4, 5, seed=1, server_round=rnd)
        assert len(picks) == 20 and len(set(picks)) == 20
        assert all(sum(p in g for p in picks) == 5 for g in groups)
    assert sample_grouped(50, 4, 1, 1, 3) == sample_grouped(50, 4, 1, 1, 3)
    with pytest.raises(ValueError, match="per_group"):
        sample_grouped(50, 4, 13, 1, 1)


def test_strategy_with_groups_and_new_clients_samples_only_training_partitions():
    grid = FakeGrid(10)
    strategy = LocalMOML(num_clients=10, new_clients=[2, 7], clients_per_round=2, sampling_groups=2, seed=0)
    assert strategy.hparams.memory_policy == "reset" and strategy.train_clients == (0, 1, 3, 4, 5, 6, 8, 9)
    for rnd in range(1, 10):
        pids = sorted(grid.node_to_pid[m.metadata.dst_node_id] for m in train_messages(strategy, grid, rnd))
        assert len(pids) == 4 and not {2, 7} & set(pids)
        assert sum(p in (0, 1, 3, 4) for p in pids) == 2  # two from each group of training clients
    with pytest.raises(ValueError, match="new_clients"):
        PerFedAvg(num_clients=3, new_clients=[0, 1, 2])
    with pytest.raises(ValueError, match="clients_per_round"):
        PerFedAvg(num_clients=10, new_clients=[0], clients_per_round=10)
    with pytest.raises(ValueError, match="B' per group"):
        PerFedAvg(num_clients=10, clients_per_round=6, sampling_groups=2)


@pytest.mark.parametrize(
    "strategy_cls, kwargs, name",
    [
        (PerFedAvg, dict(meta_gradient="ggs", num_directions=0), "num_directions"),
        (PerFedAvg, dict(meta_gradient="hessian_free", delta=0.0), "delta"),
        (PerFedAvg, dict(meta_gradient="ggs", delta=-1e-3), "delta"),
        (PerFedAvg, dict(inner_steps=0), "inner_steps"),
        (LocalMOML, dict(meta_gradient="zeroth_order", num_directions=2.5), "num_directions"),
        (LocalMOML, dict(inner_steps=-1), "inner_steps"),
        (LocalMOML, dict(meta_gradient="hessian"), "meta_gradient"),
    ],
)
def test_estimator_settings_are_validated_at_construction(strategy_cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        strategy_cls(num_clients=10, **kwargs)


@pytest.mark.parametrize("name", ["exact", "first_order", "hessian_free", "ggs", "zeroth_order", "fo_muml"])
def test_every_estimator_is_selectable_from_the_constructors_and_travels_in_the_config(name):
    for strategy_cls in (PerFedAvg, LocalMOML):
        strategy = strategy_cls(num_clients=10, inner_steps=3, meta_gradient=name, num_directions=4, delta=1e-2)
        wire = strategy.hparams.to_wire()
        assert (wire[C.META_GRADIENT], wire[C.INNER_STEPS], wire[C.NUM_DIRECTIONS], wire[C.DELTA]) == (name, 3, 4, 1e-2)
        assert type(strategy.hparams).from_wire(wire).estimator().name == name


# --- node replacement (a SuperNode that restarts gets a new node id) ----------------------------------


def _train_targets(strategy, grid, server_round):
    """partition -> node id of the train messages of ``server_round``."""
    return {grid.node_to_pid[m.metadata.dst_node_id]: m.metadata.dst_node_id for m in train_messages(strategy, grid, server_round)}


def test_a_restarted_node_takes_over_its_partition_and_only_it_is_queried():
    grid = FakeGrid(3)
    strategy = LocalMOML(num_clients=3)
    first = _train_targets(strategy, grid, 1)
    old = first[1]
    del grid.node_to_pid[old]  # SuperNode 1 stops (it deregisters) ...
    grid.node_to_pid[99] = 1  # ... and restarts under a new node id
    queried_before = len(grid.sent)
    second = _train_targets(strategy, grid, 2)
    assert second == {0: first[0], 1: 99, 2: first[2]}
    assert [m.metadata.dst_node_id for m in grid.sent[queried_before]] == [99]  # only the newcomer is asked


def test_a_crashed_node_still_listed_is_replaced_by_its_restarted_successor():
    # After a crash (SIGKILL) the SuperLink lists the dead node until its heartbeats are overdue; the
    # restarted node reports the same partition and takes it over.
    grid = FakeGrid(3)
    strategy = LocalMOML(num_clients=3)
    first = _train_targets(strategy, grid, 1)
    grid.node_to_pid[99] = 1  # the old node for partition 1 is still listed
    msgs = train_messages(strategy, grid, 2)
    targets = sorted(m.metadata.dst_node_id for m in msgs)
    assert targets == sorted([first[0], 99, first[2]]) and first[1] not in targets


def test_a_node_that_vanishes_before_its_query_is_answered_is_waited_for():
    class Flaky(FakeGrid):
        """On the first query the node of partition 2 leaves (the SuperLink answers for it with a
        node-unavailable error) and comes back as node 77."""

        left = False

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if self.left:
                return super().send_and_receive(messages)
            self.left = True
            old = next(n for n, p in self.node_to_pid.items() if p == 2)
            replies = super().send_and_receive([m for m in messages if m.metadata.dst_node_id != old])
            del self.node_to_pid[old]
            self.node_to_pid[77] = 2
            lost = next(m for m in messages if m.metadata.dst_node_id == old)
            return replies + [Message(Error(code=5, reason="Node Unavailable"), reply_to=lost)]

    grid = Flaky(3)
    strategy = LocalMOML(num_clients=3, node_wait_timeout=5)
    msgs = train_messages(strategy, grid)
    assert sorted(grid.node_to_pid[m.metadata.dst_node_id] for m in msgs) == [0, 1, 2]
    assert 77 in {m.metadata.dst_node_id for m in msgs}


def test_a_query_the_client_fails_still_raises():
    class Failing(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            return [Message(Error(code=2, reason="boom"), reply_to=m) for m in messages]

    strategy = LocalMOML(num_clients=2, node_wait_timeout=5)
    with pytest.raises(RuntimeError, match="did not report its partition-id: boom"):
        train_messages(strategy, Failing(2))


def test_memory_ids_are_kept_per_client_and_not_averaged():
    grid = FakeGrid(2)
    strategy = LocalMOML(num_clients=2)
    msgs = train_messages(strategy, grid)
    digests = {0: 2**59 + 1, 1: -1}
    replies = []
    for m, pid in zip(msgs, (grid.node_to_pid[m.metadata.dst_node_id] for m in msgs)):
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            "metrics": MetricRecord({C.NUM_EXAMPLES: 10, C.TRAIN_LOSS: 1.0, C.PARTITION_ID: pid,
                                     C.MEMORY_ROUND: 3 if pid == 0 else -1, C.MEMORY_DIGEST: digests[pid]}),
        })
        replies.append(Message(content, reply_to=m))
    _, metrics = strategy.aggregate_train(1, replies)
    assert C.MEMORY_DIGEST not in metrics and C.MEMORY_ROUND not in metrics
    assert strategy.client_train[1][0][C.MEMORY_DIGEST] == 2**59 + 1  # exact: not squeezed through a float
    assert isinstance(strategy.client_train[1][0][C.MEMORY_ROUND], int)


# --- multi-client nodes ------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_multi_client_nodes_sample_clients_and_average_over_clients(weighting):
    n, nodes, b = 10, 3, 4
    grid = GroupGrid(nodes, n)
    strategy = PerFedAvg(num_clients=n, num_nodes=nodes, clients_per_round=b, seed=5, weighting=weighting)
    msgs = train_messages(strategy, grid, server_round=2)
    picked = sorted(c for m in msgs for c in m.content["config"][C.CLIENT_IDS])
    assert picked == sample_partitions(n, b, 5, 2)  # sampling is over clients, not nodes
    for m in msgs:  # each message goes to the node that hosts its clients
        pid = grid.node_to_pid[m.metadata.dst_node_id]
        assert set(m.content["config"][C.CLIENT_IDS]) <= set(grid.blocks[pid])
        assert m.content["config"][C.WEIGHTING] == weighting
    models = {c: np.array([float(c), 2.0 * c + 1]) for c in range(n)}
    examples = {c: 10 + c for c in range(n)}
    arrays, metrics = strategy.aggregate_train(2, [group_reply(m, models, examples, weighting) for m in msgs])
    wts = np.array([examples[c] if weighting == "examples" else 1.0 for c in picked])
    expected = sum(wt * models[c] for wt, c in zip(wts, picked)) / wts.sum()
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert metrics["num-clients"] == b
    assert metrics[C.TRAIN_LOSS] == pytest.approx(float(np.dot(wts, picked) / wts.sum()))
    assert sorted(strategy.client_train[2]) == picked
    assert all(row[C.MEMORY_ROUND] == -1 for row in strategy.client_train[2].values())


def test_multi_client_evaluation_reports_every_client():
    n, nodes = 6, 2
    grid = GroupGrid(nodes, n)
    strategy = LocalMOML(num_clients=n, num_nodes=nodes)
    strategy.num_rounds = 1
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    msgs = list(strategy.configure_evaluate(1, arrays, ConfigRecord({}), grid))
    assert sorted(c for m in msgs for c in m.content["config"][C.CLIENT_IDS]) == list(range(n))
    replies = []
    for m in msgs:
        ids = list(m.content["config"][C.CLIENT_IDS])
        rec = MetricRecord({C.NUM_EXAMPLES: 3 * len(ids), C.PARTITION_ID: 0, C.CLIENT_IDS: ids,
                            C.PER_CLIENT + C.ACC_BEFORE: [0.1 * c for c in ids], C.PER_CLIENT + C.ACC_AFTER: [0.5] * len(ids),
                            C.PER_CLIENT + C.LOSS_BEFORE: [1.0] * len(ids), C.PER_CLIENT + C.LOSS_AFTER: [0.5] * len(ids)})
        replies.append(Message(RecordDict({"metrics": rec}), reply_to=m))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["num-clients"] == n
    assert metrics[C.ACC_BEFORE] == pytest.approx(np.mean([0.1 * c for c in range(n)]))
    assert sorted(strategy.client_eval[1]) == list(range(n))


def test_multi_client_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="num_nodes must be"):
        PerFedAvg(num_clients=4, num_nodes=5)

    class Overlapping(GroupGrid):
        def __init__(self):
            super().__init__(2, 6)
            self.blocks[1] = [2, 3, 4, 5]  # client 2 claimed by both nodes

    strategy = PerFedAvg(num_clients=6, num_nodes=2, node_wait_timeout=1)
    with pytest.raises(RuntimeError, match="another node serves"):
        train_messages(strategy, Overlapping())
    reply_rec = MetricRecord({C.CLIENT_IDS: [1, 2], C.PER_CLIENT + C.TRAIN_LOSS: [0.5]})
    with pytest.raises(ValueError, match="one value per client"):
        PerFedAvg.client_rows(reply_rec)
