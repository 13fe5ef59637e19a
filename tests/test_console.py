"""The console says each thing once and never waits in silence: fedmeta's partition query does not make Flower
log its no-query-handler error per node (and hides nothing else), a strategy waiting for nodes says what it has,
what it needs and the fix, and ``num_nodes=-1`` shares the clients among the federation's SuperNodes."""

from __future__ import annotations

import logging

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedmeta import config as C
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.strategies import PerFedAvg
from fedmeta.strategies.nodes import PartitionNodes, quiet_no_query_handler
from fakes import FakeGrid, GroupGrid, _task_identity, simulate_strategy, train_messages  # noqa: F401 (a fixture)

NO_HANDLER = "No query function registered with name 'default'"


def test_only_flowers_no_query_handler_records_are_dropped_while_the_query_is_out(caplog):
    flower = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"), quiet_no_query_handler():
        flower.error("Exception ClientAppException occurred. Message: %s", NO_HANDLER)
        try:
            raise ValueError(NO_HANDLER)
        except ValueError:
            flower.error("An exception was raised when processing a message by RayBackend")  # the generic line
            flower.exception("the traceback")
        try:
            raise FloatingPointError("diverged")
        except FloatingPointError:
            flower.error("An exception was raised when processing a message by RayBackend")
        flower.warning("another warning")
    flower.error(NO_HANDLER)  # the query is back: nothing is dropped
    assert [r.getMessage() for r in caplog.records] == [
        "An exception was raised when processing a message by RayBackend", "another warning", NO_HANDLER]


def test_a_strategy_short_of_nodes_says_so_every_few_seconds_and_fails_with_the_fix(caplog):
    assert PartitionNodes.__init__.__kwdefaults__["wait_log_every"] < 10  # the first line within 10 s
    strategy = PerFedAvg(num_clients=6, node_wait_timeout=0.5)
    strategy.nodes.wait_log_every = 0.05
    with caplog.at_level(logging.WARNING, logger="fedmeta"), pytest.raises(RuntimeError) as err:
        train_messages(strategy, FakeGrid(3))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for nodes")]
    assert len(lines) >= 2, lines
    fix = "Start 3 more SuperNodes, or pass num_nodes=-1 to the strategy"
    for text in (lines[0], str(err.value)):
        assert "3 connected nodes serve 0 of num_clients=6 clients; num_nodes=6 (None: one node per client) needs 6 nodes" in text
        assert fix in text
    assert str(err.value).startswith("gave up waiting for nodes after node_wait_timeout=0.5 s")


class FederationGrid(GroupGrid):
    """Multi-client nodes that report ``num-partitions`` (fedmeta's ClientApp on a federation of this many SuperNodes)."""

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in list(messages):
            [r] = super().send_and_receive([m], timeout)
            rec = MetricRecord({**dict(r.content["metrics"]), C.NUM_PARTITIONS: len(self.node_to_pid)})
            out.append(Message(RecordDict({"metrics": rec}), reply_to=m))
        return out


@pytest.mark.parametrize("grid, nodes", [(FederationGrid(3, 6), 3), (FakeGrid(6), 6)], ids=["3 SuperNodes", "no num-partitions"])
def test_num_nodes_minus_one_takes_the_federations_supernodes(grid, nodes, caplog):
    strategy = PerFedAvg(num_clients=6, num_nodes=-1)
    assert strategy.fingerprint()["num_nodes"] == -1
    with caplog.at_level(logging.INFO, logger="fedmeta"):
        messages = train_messages(strategy, grid)
    assert strategy.num_nodes == nodes and len(messages) == nodes and strategy.multi_client == (nodes < 6)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("num_nodes=-1")] == [
        f"num_nodes=-1: {nodes} nodes for num_clients=6 (node {min(grid.node_to_pid)} reports "
        + (f"{C.NUM_PARTITIONS}={nodes})" if nodes == 3 else f"no {C.NUM_PARTITIONS})")]
    assert strategy.fingerprint()["num_nodes"] == -1  # the setting: a resumed run may have another federation


def test_num_nodes_minus_one_waits_for_a_node_to_answer_and_says_so():
    class Silent(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            return []  # no reply within the timeout: the node is still starting

    strategy = PerFedAvg(num_clients=6, num_nodes=-1, node_wait_timeout=0.3)
    with pytest.raises(RuntimeError, match="3 connected nodes serve 0 of num_clients=6 clients; num_nodes=-1 needs one node to report"):
        train_messages(strategy, Silent(3))
    assert strategy.num_nodes == -1


@pytest.mark.ray
def test_six_clients_on_three_supernodes_train_with_num_nodes_minus_one(ray_runner):
    cfg = ExperimentConfig(algorithm="per-fedavg", dataset="sinewave", num_clients=6, clients_per_round=0, num_nodes=3,
                           num_rounds=2, evaluate_every=1, local_steps=1)
    strategy = PerFedAvg(**{**cfg.strategy_kwargs(), "num_nodes": -1})
    result = simulate_strategy(strategy, cfg)
    assert strategy.num_nodes == 3 and strategy.multi_client
    assert [sorted(strategy.client_train[r]) for r in (1, 2)] == [list(range(6))] * 2
    assert result.evaluate_metrics_clientapp[2]["num-clients"] == 6
