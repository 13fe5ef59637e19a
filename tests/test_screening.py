"""Screening of replies (issue 7): bad replies are left out of the average, logged and counted, and
never reach Flower's reply validation (Prepare / Execute / Assert with mocked replies)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from fakes import FakeGrid, GroupGrid, _task_identity, group_reply, reply, train_messages  # noqa: F401 (autouse fixture)

from fedmeta import config as C
from fedmeta.strategies import LocalMOML, PerFedAvg
from fedmeta.strategies.aggregation import average_arrays
from fedmeta.strategies.screening import norm_outliers, screen_arrays, screen_clients, update_norm

GOOD = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 9.0])]


def content(arrays: dict[str, np.ndarray] | None, metrics: dict | None, extra: dict | None = None) -> RecordDict:
    """A reply's content with the arrays exactly as given (no dtype cast)."""
    records: dict = {}
    if arrays is not None:
        records["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    records.update(extra or {})
    return RecordDict(records)


def pid_of(grid: FakeGrid, m: Message) -> int:
    return grid.node_to_pid[m.metadata.dst_node_id]


def good_replies(grid, msgs):
    return [reply(m, w, pid_of(grid, m), 10, 1.0) for m, w in zip(msgs, GOOD)]


def expected_average(replies: list[Message]) -> np.ndarray:
    return average_arrays([r.content["arrays"] for r in replies], [1.0] * len(replies))["w"].numpy()


def rejection_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fedmeta" and r.levelno == logging.WARNING and "rejected the" in r.getMessage()]


BAD_ARRAYS = {
    "nan": ({"w": np.array([np.nan, 1.0], np.float32)}, "1 NaN"),
    "inf": ({"w": np.array([np.inf, 1.0], np.float32)}, "1 Inf"),
    "shape": ({"w": np.zeros(3, np.float32)}, "shape (3,)"),
    "name": ({"v": np.zeros(2, np.float32)}, "missing ['w'], unexpected ['v']"),
    "extra-key": ({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, "unexpected ['b']"),
    "dtype": ({"w": np.zeros(2, np.float64)}, "dtype float64"),
    "huge-norm": ({"w": np.array([1e4, 1e4], np.float32)}, "update norm"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_a_bad_reply_is_excluded_logged_and_counted(case, caplog):
    # Prepare: 4 nodes, three good replies and one bad one
    grid = FakeGrid(4)
    strategy = PerFedAvg(num_clients=4, max_update_norm_ratio=10.0)
    msgs = train_messages(strategy, grid)
    good = good_replies(grid, msgs[:3])
    bad_arrays, reason = BAD_ARRAYS[case]
    bad_msg = msgs[3]
    bad = Message(content(bad_arrays, {C.NUM_EXAMPLES: 10, C.TRAIN_LOSS: 7.0, C.PARTITION_ID: pid_of(grid, bad_msg)}), reply_to=bad_msg)
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, [good[0], bad, good[1], good[2]])
    # Assert: the average is the good replies' average, bit for bit
    np.testing.assert_array_equal(arrays["w"].numpy(), expected_average(good))
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 5.0], rtol=1e-6)
    assert metrics[C.TRAIN_LOSS] == pytest.approx(1.0)  # the bad reply's loss 7.0 is not averaged either
    assert (metrics["num-rejected"], metrics["num-rejected-clients"], metrics["num-clients"]) == (1, 1, 3)
    assert (metrics["num-failures"], metrics["num-accepted"], metrics["kept-global-model"]) == (0, 3, 0)
    node = bad_msg.metadata.dst_node_id
    [warning] = rejection_warnings(caplog)
    assert f"node {node}" in warning and reason in warning
    [record] = strategy.rejections[1]
    assert record["node"] == node and record["clients"] == [pid_of(grid, bad_msg)] and reason in record["reason"]
    assert pid_of(grid, bad_msg) not in strategy.client_train[1]


def test_norm_screening_is_off_by_default():
    grid = FakeGrid(4)
    strategy = PerFedAvg(num_clients=4)
    msgs = train_messages(strategy, grid)
    huge = reply(msgs[3], np.array([1e4, 1e4]), pid_of(grid, msgs[3]), 10, 1.0)
    arrays, metrics = strategy.aggregate_train(1, good_replies(grid, msgs[:3]) + [huge])
    assert metrics["num-rejected"] == 0 and metrics["num-clients"] == 4
    np.testing.assert_allclose(arrays["w"].numpy(), [(9 + 1e4) / 4, (15 + 1e4) / 4])


def test_a_round_where_every_reply_is_bad_keeps_the_model_and_says_so(caplog):
    grid = FakeGrid(3)
    strategy = LocalMOML(num_clients=3)
    msgs = train_messages(strategy, grid)
    bad = [Message(content({"w": np.array([np.nan, 0.0], np.float32)}, {C.NUM_EXAMPLES: 1, C.PARTITION_ID: pid_of(grid, m)}), reply_to=m)
           for m in msgs[:2]]
    bad.append(Message(Error(code=2, reason="client failed"), reply_to=msgs[2]))
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, bad)
    assert arrays is None
    assert dict(metrics) == {"num-clients": 0, "num-failures": 1, "num-missing": 0, "num-accepted": 0, "num-rejected": 2,
                             "num-rejected-clients": 2, "kept-global-model": 1}
    assert len(rejection_warnings(caplog)) == 2
    assert any("round 1: 0 valid replies < min_valid_replies=1; keeping the previous global model" in r.getMessage()
               for r in caplog.records)
    assert 1 not in strategy.client_train


def test_fewer_valid_replies_than_min_valid_replies_keeps_the_model(caplog):
    grid = FakeGrid(3)
    strategy = PerFedAvg(num_clients=3, min_valid_replies=3)
    msgs = train_messages(strategy, grid)
    replies = good_replies(grid, msgs[:2])
    replies.append(Message(content({"w": np.zeros(3, np.float32)}, {C.NUM_EXAMPLES: 1}), reply_to=msgs[2]))
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert (metrics["num-accepted"], metrics["num-rejected"], metrics["kept-global-model"], metrics["num-clients"]) == (2, 1, 1, 0)
    assert any("2 valid replies < min_valid_replies=3; keeping the previous global model" in r.getMessage() for r in caplog.records)
    # with all three good, the round aggregates
    arrays, metrics = strategy.aggregate_train(1, good_replies(grid, msgs))
    assert arrays is not None and metrics["kept-global-model"] == 0


def _two_array_records(m, pid):
    w = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    return Message(content({"w": np.zeros(2, np.float32)}, {C.NUM_EXAMPLES: 10, C.PARTITION_ID: pid}, {"more": w}), reply_to=m)


MALFORMED = {
    "two-array-records": (_two_array_records, "exactly one ArrayRecord, got 2"),
    "no-metric-record": (lambda m, pid: Message(content({"w": np.zeros(2, np.float32)}, None), reply_to=m),
                         "exactly one MetricRecord, got 0"),
    "no-array-record": (lambda m, pid: Message(content(None, {C.NUM_EXAMPLES: 10}), reply_to=m), "exactly one ArrayRecord, got 0"),
    "missing-num-examples": (lambda m, pid: Message(content({"w": np.zeros(2, np.float32)}, {C.PARTITION_ID: pid}), reply_to=m),
                             "no num-examples"),
    "negative-num-examples": (lambda m, pid: Message(content({"w": np.zeros(2, np.float32)}, {C.NUM_EXAMPLES: -3}), reply_to=m),
                              "num-examples must be finite numbers >= 0"),
    "wrong-partition": (lambda m, pid: reply(m, np.zeros(2), pid + 100, 10, 1.0), "partition-id=1"),
    "list-partition": (lambda m, pid: Message(content({"w": np.zeros(2, np.float32)}, {C.NUM_EXAMPLES: 10, C.PARTITION_ID: [pid]}),
                                              reply_to=m), "partition-id=["),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_replies_are_rejected_without_raising(case, caplog):
    grid = FakeGrid(3)
    strategy = PerFedAvg(num_clients=3, weighting="examples")
    msgs = train_messages(strategy, grid)
    good = good_replies(grid, msgs[:2])
    make, reason = MALFORMED[case]
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, good + [make(msgs[2], pid_of(grid, msgs[2]))])
    np.testing.assert_array_equal(arrays["w"].numpy(), expected_average(good))  # equal examples: the plain mean
    assert metrics["num-rejected"] == 1 and metrics["num-clients"] == 2
    [warning] = rejection_warnings(caplog)
    assert reason in warning and f"node {msgs[2].metadata.dst_node_id}" in warning


def test_replies_from_nodes_not_sent_this_round_and_second_replies_are_rejected():
    grid = FakeGrid(4)
    strategy = PerFedAvg(num_clients=4, clients_per_round=2, seed=1)
    msgs = train_messages(strategy, grid)
    sent_nodes = {m.metadata.dst_node_id for m in msgs}
    [idle] = [n for n in grid.node_to_pid if n not in sent_nodes][:1]
    never_sent = Message(RecordDict(), dst_node_id=idle, message_type="train")  # not one of the strategy's messages
    stray = reply(never_sent, np.zeros(2), grid.node_to_pid[idle], 10, 1.0)
    good = good_replies(grid, msgs)
    again = reply(msgs[0], np.array([100.0, 100.0]), pid_of(grid, msgs[0]), 10, 1.0)
    arrays, metrics = strategy.aggregate_train(1, good + [again, stray])
    np.testing.assert_array_equal(arrays["w"].numpy(), expected_average(good))
    assert metrics["num-rejected"] == 2 and metrics["num-rejected-clients"] == 1  # the stray node was sent no clients
    reasons = sorted(r["reason"] for r in strategy.rejections[1])
    assert "a second train reply" in reasons[0] and "not sent a train message in round 1" in reasons[1]


def test_replies_without_partition_id_are_attributed_to_the_partition_sent():
    grid = FakeGrid(2)
    strategy = PerFedAvg(num_clients=2)
    msgs = train_messages(strategy, grid)
    replies = [Message(content({"w": w.astype(np.float32)}, {C.NUM_EXAMPLES: 5, C.TRAIN_LOSS: 1.0}), reply_to=m) for m, w in zip(msgs, GOOD)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-rejected"] == 0 and sorted(strategy.client_train[1]) == [0, 1]


# --- multi-client nodes ------------------------------------------------------------------------


def _group_setup():
    n, nodes = 10, 3
    grid = GroupGrid(nodes, n)
    strategy = PerFedAvg(num_clients=n, num_nodes=nodes, clients_per_round=6, seed=5)
    msgs = train_messages(strategy, grid, server_round=1)
    models = {c: np.array([float(c), 2.0 * c + 1]) for c in range(n)}
    examples = {c: 10 + c for c in range(n)}
    return grid, strategy, msgs, models, examples


def _with_client_ids(to: Message, r: Message, ids: list[int], aligned: bool = True) -> Message:
    """Reply ``r`` to ``to`` with ``client-ids`` replaced by ``ids`` (per-client lists resized)."""
    rec = dict(r.content["metrics"])
    size = len(ids) if aligned else len(ids) + 1
    rec.update({C.CLIENT_IDS: ids, **{k: [rec[k][0]] * size for k in rec if k.startswith(C.PER_CLIENT)}})
    return Message(RecordDict({"arrays": r.content["arrays"], "metrics": MetricRecord(rec)}), reply_to=to)


@pytest.mark.parametrize("claim", ["unsampled-own-client", "other-nodes-client", "duplicate", "misaligned", "no-client-ids"])
def test_a_multi_client_reply_naming_clients_the_node_was_not_sent_is_rejected(claim, caplog):
    grid, strategy, msgs, models, examples = _group_setup()
    # a node with a served client that was not sampled this round
    target = next(m for m in msgs if set(grid.blocks[pid_of(grid, m)]) - set(m.content["config"][C.CLIENT_IDS]))
    sent = list(target.content["config"][C.CLIENT_IDS])
    own_unsampled = min(set(grid.blocks[pid_of(grid, target)]) - set(sent))
    foreign = grid.blocks[(pid_of(grid, target) + 1) % 3][0]
    others = [group_reply(m, models, examples, "uniform") for m in msgs if m is not target]
    honest = group_reply(target, models, examples, "uniform")
    if claim == "unsampled-own-client":
        bad, reason = _with_client_ids(target, honest, sent[:-1] + [own_unsampled]), "not sampled for the node this round"
    elif claim == "other-nodes-client":
        bad, reason = _with_client_ids(target, honest, sent[:-1] + [foreign]), "that the node does not serve"
    elif claim == "duplicate":
        bad, reason = _with_client_ids(target, honest, [sent[0]] * len(sent)), "name a client twice"
    elif claim == "misaligned":
        bad, reason = _with_client_ids(target, honest, sent, aligned=False), "do not have one value per client"
    else:
        rec = {k: v for k, v in dict(honest.content["metrics"]).items() if k != C.CLIENT_IDS and not k.startswith(C.PER_CLIENT)}
        bad = Message(RecordDict({"arrays": honest.content["arrays"], "metrics": MetricRecord(rec)}), reply_to=target)
        reason = "no client-ids"
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, others + [bad])
    kept = [c for m in msgs if m is not target for c in m.content["config"][C.CLIENT_IDS]]
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean([models[c] for c in kept], axis=0), rtol=1e-6)
    assert metrics["num-rejected"] == 1 and metrics["num-rejected-clients"] == len(sent) and metrics["num-clients"] == len(kept)
    [warning] = rejection_warnings(caplog)
    assert reason in warning and f"node {target.metadata.dst_node_id}" in warning


def test_a_multi_client_reply_for_a_subset_of_its_clients_is_averaged_by_its_clients():
    # A node leaves diverged clients out of its reply: still valid, weighted by the clients it names.
    _, strategy, msgs, models, examples = _group_setup()
    target = next(m for m in msgs if len(m.content["config"][C.CLIENT_IDS]) > 1)
    kept_ids = list(target.content["config"][C.CLIENT_IDS])[1:]
    bad_cfg = RecordDict({"config": ConfigRecord({C.CLIENT_IDS: kept_ids})})
    subset = group_reply(Message(bad_cfg, dst_node_id=target.metadata.dst_node_id, message_type="train"), models, examples, "uniform")
    subset = Message(subset.content, reply_to=target)
    replies = [group_reply(m, models, examples, "uniform") for m in msgs if m is not target] + [subset]
    arrays, metrics = strategy.aggregate_train(1, replies)
    clients = [c for m in msgs if m is not target for c in m.content["config"][C.CLIENT_IDS]] + kept_ids
    assert metrics["num-rejected"] == 0 and metrics["num-clients"] == len(clients)
    np.testing.assert_allclose(arrays["w"].numpy(), np.mean([models[c] for c in clients], axis=0), rtol=1e-6)


# --- evaluation ----------------------------------------------------------------------------------


def test_malformed_evaluate_replies_are_skipped_and_counted():
    grid = FakeGrid(4)
    strategy = PerFedAvg(num_clients=4)
    strategy.num_rounds = 1
    msgs = list(strategy.configure_evaluate(1, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}), grid))

    def scores(pid, acc=0.5):
        return {C.NUM_EXAMPLES: 10, C.PARTITION_ID: pid, C.ACC_BEFORE: 0.1, C.ACC_AFTER: acc, C.LOSS_BEFORE: 2.0, C.LOSS_AFTER: 1.0}

    p = [pid_of(grid, m) for m in msgs]
    replies = [
        Message(RecordDict({"metrics": MetricRecord(scores(p[0], 0.75))}), reply_to=msgs[0]),
        Message(RecordDict({"a": MetricRecord(scores(p[1])), "b": MetricRecord(scores(p[1]))}), reply_to=msgs[1]),
        Message(RecordDict({"metrics": MetricRecord(scores(p[2] + 1))}), reply_to=msgs[2]),
        Message(RecordDict({"metrics": MetricRecord({**scores(p[3]), C.ACC_AFTER: [0.5, 0.5]})}), reply_to=msgs[3]),
    ]
    out = strategy.aggregate_evaluate(1, replies)
    assert out["num-clients"] == 1 and out["num-rejected"] == 3 and out[C.ACC_AFTER] == pytest.approx(0.75)
    assert [r["stage"] for r in strategy.rejections[1]] == ["evaluate"] * 3


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_update_norm_ratio=1.0), r"max_update_norm_ratio must be None \(off\) or a finite number > 1, got 1.0"),
        (dict(max_update_norm_ratio=0.5), "max_update_norm_ratio"),
        (dict(max_update_norm_ratio=float("inf")), "max_update_norm_ratio"),
        (dict(max_update_norm_ratio="10"), "max_update_norm_ratio"),
        (dict(min_valid_replies=0), r"min_valid_replies must be an integer in \[1, 4\].*got 0"),
        (dict(min_valid_replies=2.0), "min_valid_replies"),
        (dict(min_valid_replies=5), "min_valid_replies"),
        (dict(clients_per_round=2, min_valid_replies=3), r"min_valid_replies must be an integer in \[1, 2\]"),
    ],
)
def test_screening_settings_are_validated_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerFedAvg(num_clients=4, **kwargs)


# --- the pure functions ------------------------------------------------------------------------


def test_norm_outliers_compare_with_the_median():
    assert norm_outliers([1.0, 2.0, 3.0, 100.0], 10) == [3]  # median 2.5, bound 25
    assert norm_outliers([1.0, 2.0, 3.0, 24.0], 10) == []
    assert norm_outliers([5.0, 100.0], 10) == []  # median 52.5: two replies cannot outvote each other
    assert norm_outliers([0.0, 0.0, 1e-3], 10) == [2]
    assert norm_outliers([], 10) == []


def test_update_norm_and_unreadable_arrays():
    ref = ArrayRecord({"a": Array(np.zeros(1, np.float32)), "b": Array(np.ones(2, np.float32))})
    rec = ArrayRecord({"a": Array(np.array([3.0], np.float32)), "b": Array(np.array([1.0, 5.0], np.float32))})
    assert update_norm(rec, ref) == pytest.approx(5.0)
    corrupt = ArrayRecord({"a": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"xyz"), "b": ref["b"]})
    assert "cannot be read" in screen_arrays(corrupt, ref)
    assert screen_arrays(rec, ref) is None


def test_screen_clients_single_client_replies():
    assert screen_clients(MetricRecord({C.PARTITION_ID: 3}), [3], expect_ids=False) is None
    assert screen_clients(MetricRecord({C.NUM_EXAMPLES: 1}), [3], expect_ids=False) is None
    assert "partition-id=4" in screen_clients(MetricRecord({C.PARTITION_ID: 4}), [3], expect_ids=False)
    assert "non-empty list" in screen_clients(MetricRecord({C.CLIENT_IDS: []}), [3], expect_ids=True)
