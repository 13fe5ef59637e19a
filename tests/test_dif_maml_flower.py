"""Dif-MAML on Flower: the relay strategy with mocked replies (Prepare / Execute / Assert, weights worked
out by hand), the agent's ClientApp against ``agent_round`` + ``combine`` by hand, and one run through
Flower's Ray simulation engine that must equal the vmapped simulator."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from fakes import FakeGrid, set_task_identity
from fedmeta import config as C
from fedmeta import graph as G
from fedmeta.clients import make_dif_maml_client_app
from fedmeta.clients.dif_maml import parse_config
from fedmeta.dif_maml import DifMAMLConfig, agent_round, combine, init_optimizer_state, initial_model, simulate
from fedmeta.strategies import DifMAML
from fedmeta.strategies.dif_maml import relay_weights, wire_config

RING6 = DifMAMLConfig(num_agents=6, topology="ring", shots=5, optimizer="adam", iterations=3)
# K = 4, edges 0-1, 0-2, 1-2, 2-3: degrees (self counted) n = 3, 3, 4, 2, so Metropolis gives
# a_01 = 1/3, a_02 = a_12 = a_23 = 1/4 and the diagonal 5/12, 5/12, 1/4, 3/4.
KITE = DifMAMLConfig(num_agents=4, topology="edges", edges=((0, 1), (0, 2), (1, 2), (2, 3)), shots=5, iterations=3)


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def w0_record(cfg: DifMAMLConfig) -> ArrayRecord:
    return ArrayRecord({k: v.clone() for k, v in initial_model(cfg).items()})


def shifted(record: ArrayRecord, by: float) -> ArrayRecord:
    return ArrayRecord({k: Array(a.numpy() + np.float32(by)) for k, a in record.items()})


def reply(to: Message, arrays: ArrayRecord, agent: int) -> Message:
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({C.NUM_EXAMPLES: 10}),
                          C.CLIENT_INFO: ConfigRecord({C.PARTITION_ID: agent})})
    return Message(content, reply_to=to)


def by_agent(messages) -> dict[int, Message]:
    return {int(m.content.config_records["config"][C.AGENT]): m for m in messages}


def sent_weights(m: Message) -> dict[int, float]:
    cfg = m.content.config_records["config"]
    return dict(zip(cfg[C.NEIGHBOURHOOD], cfg[C.COMBINATION_WEIGHTS]))


# --- the relay strategy -----------------------------------------------------------------------


def test_ring_of_six_messages_carry_exactly_the_neighbours_and_their_weights():
    grid, strategy = FakeGrid(6), DifMAML(RING6)
    w0 = w0_record(RING6)
    msgs = by_agent(strategy.configure_train(1, w0, ConfigRecord({"user-key": 3}), grid))
    assert sorted(msgs) == list(range(6))
    for k, m in msgs.items():
        nbrs = sorted({(k - 1) % 6, k, (k + 1) % 6})
        assert m.metadata.dst_node_id == grid.pid_to_node[k]
        assert sorted(m.content.array_records) == [f"phi-{l}" for l in nbrs]
        assert sent_weights(m) == pytest.approx({l: 1 / 3 for l in nbrs})  # Metropolis on a ring: n = 3 everywhere
        cfg = m.content.config_records["config"]
        assert cfg[C.SERVER_ROUND] == 1 and cfg["user-key"] == 3 and cfg[C.ALGORITHM] == "dif-maml"
        assert parse_config(cfg) == RING6  # the whole DifMAMLConfig travels
        for rec in m.content.array_records.values():  # round 1: every stored phi is w_0
            assert all(np.array_equal(rec[n].numpy(), w0[n].numpy()) for n in w0)
    assert strategy.models_sent[1] == 6 + 2 * 6


def test_metropolis_weights_of_an_irregular_graph_are_column_k_of_a():
    msgs = by_agent(DifMAML(KITE).configure_train(1, w0_record(KITE), ConfigRecord(), FakeGrid(4)))
    assert sent_weights(msgs[0]) == pytest.approx({0: 5 / 12, 1: 1 / 3, 2: 1 / 4})
    assert sent_weights(msgs[1]) == pytest.approx({0: 1 / 3, 1: 5 / 12, 2: 1 / 4})
    assert sent_weights(msgs[2]) == pytest.approx({0: 1 / 4, 1: 1 / 4, 2: 1 / 4, 3: 1 / 4})
    assert sent_weights(msgs[3]) == pytest.approx({2: 1 / 4, 3: 3 / 4})


def test_replies_are_stored_not_averaged_and_relayed_next_round_with_the_message_counts():
    grid, strategy = FakeGrid(6), DifMAML(RING6)
    w0 = w0_record(RING6)
    msgs = by_agent(strategy.configure_train(1, w0, ConfigRecord(), grid))
    stacked, metrics = strategy.aggregate_train(1, [reply(msgs[k], shifted(w0, k), k) for k in range(6)])
    assert metrics[C.MODELS_UP] == 6 and metrics[C.MODELS_DOWN] == 6 + 2 * 6
    assert metrics["num-accepted"] == 6 and metrics["num-rejected"] == 0 and metrics["num-failures"] == 0
    for name in w0:
        assert stacked[name].numpy().shape == (6, *w0[name].numpy().shape)
        for k in range(6):  # every agent's own phi, bit for bit: no averaging
            np.testing.assert_array_equal(stacked[name].numpy()[k], w0[name].numpy() + np.float32(k))
    again = by_agent(strategy.configure_train(2, stacked, ConfigRecord(), grid))
    for k, m in again.items():
        for key, rec in m.content.array_records.items():
            l = int(key.removeprefix("phi-"))
            np.testing.assert_array_equal(rec["1.weight"].numpy(), w0["1.weight"].numpy() + np.float32(l))
    assert strategy.models_sent[2] == 18


def test_nan_malformed_and_error_replies_are_excluded_and_neighbours_renormalise():
    grid, strategy = FakeGrid(6), DifMAML(RING6)
    w0 = w0_record(RING6)
    msgs = by_agent(strategy.configure_train(1, w0, ConfigRecord(), grid))
    nan = shifted(w0, 0.5)
    nan["1.bias"] = Array(np.full_like(w0["1.bias"].numpy(), np.nan))
    wrong_shape = ArrayRecord({**{k: v for k, v in w0.items()}, "1.bias": Array(np.zeros(3, np.float32))})
    replies = [reply(msgs[k], shifted(w0, k), k) for k in (1, 3, 5)]
    replies += [reply(msgs[2], nan, 2), reply(msgs[4], wrong_shape, 4),
                Message(Error(code=2, reason="boom"), reply_to=msgs[0])]
    _, metrics = strategy.aggregate_train(1, replies)
    assert (metrics["num-accepted"], metrics["num-rejected"], metrics["num-failures"], metrics[C.MODELS_UP]) == (3, 2, 1, 5)
    assert {r["agent"] for r in strategy.rejections[1]} == {2, 4}
    assert "NaN" in next(r["reason"] for r in strategy.rejections[1] if r["agent"] == 2)
    # Excluded agents keep their previous phi (w_0) in the store.
    for k in (0, 2, 4):
        assert np.array_equal(strategy.phi[k]["1.weight"].numpy(), w0["1.weight"].numpy())
    nxt = by_agent(strategy.configure_train(2, w0, ConfigRecord(), grid))
    # Fresh: 1, 3, 5. Each agent keeps itself; excluded neighbours drop out, the rest renormalise.
    assert sent_weights(nxt[0]) == pytest.approx({0: 1 / 3, 1: 1 / 3, 5: 1 / 3})  # own stale state + two fresh neighbours
    assert sent_weights(nxt[1]) == pytest.approx({1: 1.0})  # both neighbours (0, 2) excluded
    assert sent_weights(nxt[3]) == pytest.approx({3: 1.0})
    assert sent_weights(nxt[2]) == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert strategy.models_sent[2] == 3 + 1 + 3 + 1 + 3 + 1
    # Everyone answers round 2: full neighbourhoods again in round 3.
    _, m2 = strategy.aggregate_train(2, [reply(m, shifted(w0, 2 + k), k) for k, m in nxt.items()])
    assert m2[C.MODELS_DOWN] == 12 and m2["num-accepted"] == 6
    strategy.configure_train(3, w0, ConfigRecord(), grid)
    assert strategy.models_sent[3] == 18


def test_renormalised_weights_on_an_irregular_graph():
    grid, strategy = FakeGrid(4), DifMAML(KITE)
    w0 = w0_record(KITE)
    msgs = by_agent(strategy.configure_train(1, w0, ConfigRecord(), grid))
    strategy.aggregate_train(1, [reply(msgs[k], shifted(w0, k), k) for k in (0, 2, 3)])  # agent 1 missing
    nxt = by_agent(strategy.configure_train(2, w0, ConfigRecord(), grid))
    # Agent 0 without 1: (5/12, 1/4) / (2/3) = (5/8, 3/8); agent 2 without 1: (1/4, 1/4, 1/4) / (3/4).
    assert sent_weights(nxt[0]) == pytest.approx({0: 5 / 8, 2: 3 / 8})
    assert sent_weights(nxt[2]) == pytest.approx({0: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    assert sent_weights(nxt[1]) == pytest.approx({0: 1 / 3, 1: 5 / 12, 2: 1 / 4})  # the missing agent: its full column


def test_relay_weights_fall_back_to_the_own_state_when_every_weight_left_is_zero():
    a = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])  # a_00 = 0
    assert relay_weights(a, (0, 1, 2), 0, fresh={1, 2}) == ([0, 1, 2], [0.0, 0.5, 0.5])
    assert relay_weights(a, (0, 1, 2), 0, fresh=set()) == ([0], [1.0])


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda a: a * 0.9, "columns that sum to 1"),
        (lambda a: a - np.diag(np.eye(6)[0]), "non-negative"),  # a_00 = 1/3 - 1
        (lambda a: np.roll(a, 3, axis=0), "combination matrix A"),  # mass on pairs that are not edges
        (lambda a: a[:5, :5], "6 x 6"),
    ],
    ids=["column-sums", "negative", "off-graph", "shape"],
)
def test_a_bad_combination_matrix_is_rejected_before_round_1(bad, match):
    _, a, _ = RING6.combination_matrix()
    with pytest.raises(ValueError, match=match):
        DifMAML(RING6, combination_matrix=bad(a))


def test_bad_graph_settings_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match="combination"):
        DifMAML(RING6.replace(combination="uniform"))  # uniform needs the complete graph
    with pytest.raises(ValueError, match="config"):
        DifMAML({"num_agents": 6})


# --- the agent's ClientApp --------------------------------------------------------------------


def _context(pid: int, state: RecordDict) -> Context:
    return Context(run_id=1, node_id=11, node_config={C.PARTITION_ID: pid, "num-partitions": 6}, state=state, run_config={})


def _train_message(cfg: DifMAMLConfig, agent: int, server_round: int, phis: dict[int, dict], weights: dict[int, float]) -> Message:
    ids = sorted(phis)
    config = ConfigRecord({**wire_config(cfg), C.AGENT: agent, C.SERVER_ROUND: server_round,
                           C.NEIGHBOURHOOD: ids, C.COMBINATION_WEIGHTS: [weights[l] for l in ids]})
    arrays = {f"phi-{l}": ArrayRecord({k: v.clone() for k, v in phis[l].items()}) for l in ids}
    return Message(RecordDict({**arrays, "config": config}), dst_node_id=11, message_type=MessageType.TRAIN)


def test_client_app_equals_combine_and_agent_round_by_hand_over_three_rounds():
    cfg, agent = RING6, 1
    w0 = initial_model(cfg)
    gen = torch.Generator().manual_seed(7)
    state = RecordDict()  # context.state: the only thing that survives between rounds
    own, opt = dict(w0), init_optimizer_state(w0, cfg)
    for r in (1, 2, 3):
        nbrs = {l: {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in w0.items()} for l in (0, 2)}
        phis = {**nbrs, agent: own}
        weights = {0: 0.3, 1: 0.5, 2: 0.2}
        app = make_dif_maml_client_app()  # a new ClientApp every round, as in a deployment
        out = app(_train_message(cfg, agent, r, phis, weights), _context(agent, state))
        assert not out.has_error(), out.error.reason if out.has_error() else ""
        expected, opt = agent_round(cfg, agent, r, combine([phis[l] for l in (0, 1, 2)], [0.3, 0.5, 0.2]), opt)
        got = out.content["arrays"].to_torch_state_dict()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)
        assert out.content["metrics"][C.NUM_EXAMPLES] == 2 * cfg.shots
        assert out.content[C.CLIENT_INFO][C.PARTITION_ID] == agent
        own = {k: v.clone() for k, v in got.items()}
    # The Adam moments came from context.state: without them round 3 would differ.
    fresh, _ = agent_round(cfg, agent, 3, combine([phis[l] for l in (0, 1, 2)], [0.3, 0.5, 0.2]), init_optimizer_state(w0, cfg))
    assert any((fresh[k] - expected[k]).abs().max() > 1e-6 for k in expected)


def test_client_app_refuses_a_message_for_another_agent():
    w0 = initial_model(RING6)
    msg = _train_message(RING6, 2, 1, {2: w0}, {2: 1.0})
    with pytest.raises(ValueError, match="agent=2 but this node is partition-id=1"):  # an error reply in a real run
        make_dif_maml_client_app()(msg, _context(1, RecordDict()))


# --- one run on Flower's Ray simulation engine ------------------------------------------------


@pytest.mark.ray
def test_ring_of_six_on_ray_equals_the_simulator_with_its_message_counts(ray_runner):
    from fedmeta.simulations.dif_maml_app import build_server_app
    from fedmeta.simulations.engine import run_on_ray

    logging.getLogger("flwr").setLevel(logging.ERROR)
    cfg, rounds = RING6, 3
    box, rows = {}, {}

    class Rows:  # an in-process tracker: every round's values
        def log(self, step, values):
            rows[step] = dict(values)

        def close(self):
            rows["closed"] = True

    run_on_ray(build_server_app(cfg, rounds, sink=lambda s, r: box.update(strategy=s, result=r), trackers=[Rows()]),
               make_dif_maml_client_app(), num_supernodes=cfg.num_agents)
    result = box["result"]
    assert rows.pop("closed") and rows == {r: {**{f"train/{k}": float(v) for k, v in result.train_metrics_clientapp[r].items()},
                                                "round_seconds": box["strategy"].round_seconds[r]} for r in range(1, rounds + 1)}
    ref = simulate(cfg.replace(iterations=rounds), record=False)
    edges = len(G.ring(6).edges)
    for r in range(1, rounds + 1):
        m = result.train_metrics_clientapp[r]
        assert (m[C.MODELS_UP], m[C.MODELS_DOWN], m["num-accepted"]) == (6, 6 + 2 * edges, 6) == (6, 18, 6)
    assert sum(result.train_metrics_clientapp[r][C.MODELS_DOWN] for r in range(1, rounds + 1)) == ref.messages_down
    assert sum(result.train_metrics_clientapp[r][C.MODELS_UP] for r in range(1, rounds + 1)) == ref.messages_up
    for name, stacked in ref.phi.items():
        got = torch.from_numpy(result.arrays[name].numpy())
        torch.testing.assert_close(got, stacked, atol=1e-6, rtol=0)
    w0 = initial_model(cfg)
    for k in range(6):  # the agents did move (3 Adam steps of mu = 1e-3), so the comparison is not vacuous
        assert max(float((ref.phi[n][k] - w0[n]).abs().max()) for n in w0) > 2e-3
