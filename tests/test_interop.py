"""Plugging into Flower setups, without Ray (issue 15): the config helpers and the run-config fallback of
the ClientApp, identifiers outside the MetricRecord, ordinary clients under fedmeta strategies
(no query handler, Flower's metric names), num-examples screening under every weighting, the round
loop for any strategy, and client mods. The Ray runs are in test_flower_interop.py."""

from __future__ import annotations

import logging
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from fakes import ROOT, FakeGrid, _task_identity, doc_snippet, reply, train_messages  # noqa: F401 (autouse fixture)

from fedmeta import config as C
from fedmeta.algorithms import LocalMOMLConfig, PerFedAvgConfig
from fedmeta.clients import evaluate_config, make_client_app, train_config
from fedmeta.data import ClientData
from fedmeta.strategies import LocalMOML, PerFedAvg, TrainingStopped, start
from fedmeta.strategies.screening import reply_view



# --- client side ---------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _data(pid: int) -> ClientData:
    g = torch.Generator().manual_seed(pid)
    return ClientData(torch.rand(20, 1, 2, 2, generator=g), torch.randint(0, 3, (20,), generator=g),
                      torch.rand(10, 1, 2, 2, generator=g), torch.randint(0, 3, (10,), generator=g))


def _context(run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                   run_config=dict(run_config or {}))


def _message(message_type: str, config: dict) -> Message:
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in _model().state_dict().items()})
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=5, message_type=message_type)


def test_train_config_helper_carries_the_algorithm_and_round_trips():
    hp = LocalMOMLConfig(inner_lr=0.02, lr=0.1, local_steps=3, memory_policy="keep")
    rec = train_config(hp, seed=7, **{"user-key": 1})
    assert rec[C.ALGORITHM] == "local-moml" and rec[C.SEED] == 7 and rec["user-key"] == 1
    assert LocalMOMLConfig.from_wire(rec) == hp
    ev = evaluate_config(hp, eval_steps=3)
    assert (ev[C.INNER_LR], ev[C.EVAL_STEPS], ev[C.EVAL_SHOTS]) == (0.02, 3, 0)


def test_a_fedmeta_client_trains_from_the_helper_config_under_a_stock_strategy_message():
    app = make_client_app(_model, _data)
    cfg = {**train_config(PerFedAvgConfig(local_steps=2)), C.SERVER_ROUND: 1}  # what stock FedAvg sends
    out = app(_message(MessageType.TRAIN, cfg), _context())
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    assert set(out.content["metrics"]) == {C.NUM_EXAMPLES, C.NUM_SAMPLES, C.NUM_GRADIENTS, C.NUM_HVPS, C.NUM_LOSS_EVALS, C.TRAIN_LOSS}
    assert reply_view(out.content)[C.PARTITION_ID] == 1


def test_the_run_config_snippet_is_the_settings_of_a_message_without_any():
    table = tomllib.loads(doc_snippet("run-config", "toml", page="docs/flower.md"))["tool"]["flwr"]["app"]["config"]
    app = make_client_app(_model, _data)
    msg_cfg = {C.SERVER_ROUND: 1, C.SEED: 3}  # stock FedAvg with an empty train_config
    via_run_config = app(_message(MessageType.TRAIN, msg_cfg), _context(table))
    assert not via_run_config.has_error(), via_run_config.error.reason if via_run_config.has_error() else ""
    torch.manual_seed(0)
    explicit = {**table, **msg_cfg}
    same = app(_message(MessageType.TRAIN, explicit), _context())
    torch.manual_seed(0)
    again = app(_message(MessageType.TRAIN, msg_cfg), _context(table))
    for k in same.content["arrays"]:
        np.testing.assert_array_equal(same.content["arrays"][k].numpy(), again.content["arrays"][k].numpy())
    # message keys first: the message's local-steps wins over the run config's
    two = app(_message(MessageType.TRAIN, {**msg_cfg, C.LOCAL_STEPS: 1}), _context(table))
    assert two.content["metrics"][C.NUM_GRADIENTS] < via_run_config.content["metrics"][C.NUM_GRADIENTS]


def test_a_message_with_no_settings_anywhere_is_refused_in_one_line():
    app = make_client_app(_model, _data)
    with pytest.raises(ValueError, match=r"^no fedmeta training settings: .*train_config") as err:
        app(_message(MessageType.TRAIN, {C.SERVER_ROUND: 1}), _context())
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"run config 'algorithm': .*maml\+\+"):
        app(_message(MessageType.TRAIN, {C.SERVER_ROUND: 1}), _context({C.ALGORITHM: "maml++"}))


def test_evaluate_takes_missing_settings_from_the_run_config():
    app = make_client_app(_model, _data)
    out = app(_message(MessageType.EVALUATE, {C.SERVER_ROUND: 2}), _context({C.EVAL_STEPS: 0}))
    m = out.content["metrics"]
    assert m[C.LOSS_BEFORE] == m[C.LOSS_AFTER]  # zero fine-tuning steps, from the run config


def test_train_mods_wrap_only_the_train_handler():
    seen = []

    def spy(msg, ctx, call_next):
        seen.append(msg.metadata.message_type)
        return call_next(msg, ctx)

    app = make_client_app(_model, _data, mods=[spy], train_mods=[fixedclipping_mod])
    cfg = {**train_config(PerFedAvgConfig(local_steps=2, meta_lr=1.0)), C.SERVER_ROUND: 1, "clipping_norm": 1e-3}
    sent = _message(MessageType.TRAIN, cfg)
    out = app(sent, _context())
    assert not out.has_error(), out.error.reason if out.has_error() else ""
    delta = [out.content["arrays"][k].numpy() - sent.content["arrays"][k].numpy() for k in sent.content["arrays"]]
    norm = math.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
    assert 0 < norm <= 1e-3 * (1 + 1e-5)  # clipped by the mod
    ev = app(_message(MessageType.EVALUATE, {C.SERVER_ROUND: 1}), _context())  # no clipping_norm: the mod is not on evaluate
    assert not ev.has_error()
    assert seen == [MessageType.TRAIN, MessageType.EVALUATE]


# --- server side ---------------------------------------------------------------------------------


class NoQueryGrid(FakeGrid):
    """Nodes whose ClientApp has no query handler: Flower answers with its no-handler error."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        return [Message(Error(code=2, reason="<class 'ValueError'>:<'No query function registered with name 'default''>"),
                        reply_to=m) for m in messages]


def test_nodes_without_a_query_handler_are_numbered_by_node_id_with_one_warning(caplog):
    grid = NoQueryGrid(4)
    strategy = PerFedAvg(num_clients=4, clients_per_round=2, seed=3, node_wait_timeout=5)
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        for rnd in (1, 2, 3):
            msgs = train_messages(strategy, grid, server_round=rnd)
            assert [m.metadata.dst_node_id for m in msgs] == [sorted(grid.node_to_pid)[p] for p in strategy.sample(rnd)]
    [warning] = [r.getMessage() for r in caplog.records if "partition-keyed sampling is off" in r.getMessage()]
    assert "No query function registered" in warning
    assert len(grid.sent) == 1  # queried once


@pytest.mark.parametrize("bad", [-5, float("nan"), float("inf")])
@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_num_examples_is_screened_under_every_weighting(bad, weighting, caplog):
    grid = FakeGrid(3)
    strategy = PerFedAvg(num_clients=3, weighting=weighting)
    msgs = train_messages(strategy, grid)
    pids = [grid.node_to_pid[m.metadata.dst_node_id] for m in msgs]
    good = [reply(msgs[0], np.array([1.0, 2.0]), pids[0], 10, 1.0), reply(msgs[1], np.array([3.0, 6.0]), pids[1], 10, 2.0)]
    poisoned = reply(msgs[2], np.array([100.0, 100.0]), pids[2], 10, 3.0)
    poisoned.content["metrics"][C.NUM_EXAMPLES] = bad
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        arrays, metrics = strategy.aggregate_train(1, good + [poisoned])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 4.0])  # the valid replies' average only
    assert metrics["num-rejected"] == 1 and metrics[C.NUM_EXAMPLES] == 10 and math.isfinite(metrics[C.NUM_EXAMPLES])
    assert any("num-examples must be finite numbers >= 0" in r.getMessage() for r in caplog.records)


def _eval_messages(strategy, grid, rnd=1):
    strategy.num_rounds = rnd
    return list(strategy.configure_evaluate(rnd, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord(), grid))


def test_evaluate_replies_with_flowers_metric_names_are_summarised_and_unusable_ones_rejected(caplog):
    grid = FakeGrid(4)
    strategy = LocalMOML(num_clients=4, evaluate_every=1)
    msgs = _eval_messages(strategy, grid)
    quick = [Message(RecordDict({"metrics": MetricRecord({"eval_loss": 1.0 + i, "eval_acc": 0.5 + 0.1 * i, C.NUM_EXAMPLES: 10})}),
                     reply_to=m) for i, m in enumerate(msgs[:2])]
    no_score = Message(RecordDict({"metrics": MetricRecord({C.NUM_EXAMPLES: 10})}), reply_to=msgs[2])
    nan_score = Message(RecordDict({"metrics": MetricRecord({"eval_acc": float("nan"), C.NUM_EXAMPLES: 10})}), reply_to=msgs[3])
    with caplog.at_level(logging.INFO, logger="fedmeta"):
        metrics = strategy.aggregate_evaluate(1, quick + [no_score, nan_score])
    assert metrics["eval_acc"] == pytest.approx(0.55) and metrics["eval_loss"] == pytest.approx(1.5)
    assert metrics["num-clients"] == 2 and metrics["num-rejected"] == 2
    reasons = [r["reason"] for r in strategy.rejections[1]]
    assert any("no evaluation metric" in r for r in reasons) and any("eval_acc must be finite" in r for r in reasons)
    assert any("round 1/1: evaluation eval_loss 1.5000, eval_acc 0.5500, 2 clients" in r.getMessage() for r in caplog.records)


def test_replies_put_identifiers_where_stock_aggregation_does_not_average_them():
    """What stock FedAvg makes of fedmeta replies: quantities averaged, no partition-id or digest."""
    app = make_client_app(_model, _data)
    replies = []
    for pid in (0, 1, 2):
        ctx = Context(run_id=1, node_id=pid, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(), run_config={})
        cfg = {**train_config(LocalMOMLConfig(local_steps=1, memory_policy="keep")), C.SERVER_ROUND: 1}
        replies.append(app(_message(MessageType.TRAIN, cfg), ctx))
    _, metrics = FlowerFedAvg().aggregate_train(1, replies)
    assert C.TRAIN_LOSS in metrics
    assert not {C.PARTITION_ID, C.MEMORY_ROUND, C.MEMORY_DIGEST, C.CLIENT_IDS} & set(metrics)


def test_the_round_loop_runs_any_strategy_and_stops_when_nothing_trains(caplog):
    class ErrorGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            self.sent.append(messages)
            why = "ValueError: no fedmeta training settings: the train message's config has no 'algorithm'"
            return [Message(Error(code=2, reason=why), reply_to=m) for m in messages]

    grid = ErrorGrid(3)
    strategy = FlowerFedAvg(min_available_nodes=0, min_train_nodes=0, min_evaluate_nodes=0)
    # stock FedAvg samples through grid.get_node_ids(), which the fake grid has
    with caplog.at_level(logging.INFO, logger="fedmeta"), pytest.raises(TrainingStopped) as stop:
        start(strategy, grid, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), num_rounds=20, max_failed_rounds=2)
    assert stop.value.last_round == 2
    assert "no valid train reply in 2 consecutive rounds" in str(stop.value) and "first: ValueError: no fedmeta training settings" in str(stop.value)
    assert [r.getMessage() for r in caplog.records].count(
        "round 1: new client error (train, node %d): ValueError: no fedmeta training settings: the train message's config has no 'algorithm'"
        % grid.sent[0][0].metadata.dst_node_id) == 1


def test_every_code_block_of_the_interop_section_is_a_snippet_that_a_test_executes():
    text = (ROOT / "docs" / "flower.md").read_text()
    section = text[text.index("## Mixing fedmeta and Flower"):]
    blocks = re.findall(r"(<!-- snippet: ([\w-]+) -->\n)?```(\w+)\n", section)
    names = [name for marker, name, _ in blocks if marker]
    assert len(names) == len(blocks) and len(names) >= 6, blocks  # no unmarked (untested) block
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*interop.py"))
    assert all(f'"{name}"' in tests for name in names), [n for n in names if f'"{n}"' not in tests]
