"""Dif-MAML's graphs and its vmapped simulator (dif-maml.txt Algorithm 1, Assumption 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import check_provenance
from fedmeta import graph as G
from fedmeta.dif_maml import (
    DifMAMLConfig, DifResult, agent_batches, agent_gradient, agent_round, combine, disagreement, init_optimizer_state,
    initial_model, loss_fn, main, simulate,
)

SMALL = dict(shots=4, eval_tasks=8, eval_query=10, eval_every=2, eval_steps=2)


def _agent(w, k):
    return {n: v[k] for n, v in w.items()}


def _close(a, b, tol=1e-6):
    return all(torch.allclose(a[n], b[n], atol=tol, rtol=0) for n in a)


# --- graphs and combination matrices


def test_metropolis_on_a_ring_of_six_is_one_third_everywhere_with_lambda_two_thirds():
    g = G.ring(6)
    a = G.metropolis(g)
    support = np.eye(6, dtype=bool) | np.roll(np.eye(6, dtype=bool), 1, axis=1) | np.roll(np.eye(6, dtype=bool), -1, axis=1)
    assert np.allclose(a[support], 1 / 3) and (a[~support] == 0).all()
    assert G.check_combination(a, g) == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 6, 9])
def test_metropolis_on_the_complete_graph_is_the_uniform_average(k):
    g = G.complete(k)
    a = G.metropolis(g)
    assert np.allclose(a, np.full((k, k), 1 / k)) and np.allclose(G.combination(g, "uniform"), a)
    assert G.check_combination(a, g) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 12), p=st.floats(0.2, 1.0), seed=st.integers(0, 10_000))
def test_random_connected_graphs_give_doubly_stochastic_primitive_matrices(k, p, seed):
    g = G.erdos_renyi(k, p, seed)
    assert g.connected
    a = G.metropolis(g)
    assert np.allclose(a.sum(0), 1) and np.allclose(a.sum(1), 1) and (a >= 0).all() and np.allclose(a, a.T)
    lam = G.check_combination(a, g)
    assert 0 <= lam < 1 and lam == pytest.approx(G.lambda_2(a))


def test_ring_chords_is_the_documented_stand_in():
    g = G.ring_chords(6)
    assert len(g.edges) == 9 and all(g.degree(k) == 4 for k in range(6))
    assert G.check_combination(G.metropolis(g), g) < 2 / 3  # mixes faster than the ring


def test_a_disconnected_graph_is_rejected_naming_its_components():
    g = G.from_edges(6, [(0, 1), (1, 2), (3, 4)])
    with pytest.raises(ValueError, match=r"graph must be connected .* 3 components: \{0, 1, 2\}; \{3, 4\}; \{5\}"):
        G.check_combination(G.metropolis(g), g)
    with pytest.raises(ValueError, match=r"2 components: \{0, 1\}; \{2, 3\}"):
        DifMAMLConfig(topology="edges", edges=((0, 1), (2, 3)), num_agents=4).combination_matrix()


def test_matrices_that_break_assumption_6_are_rejected():
    g = G.ring(4)
    a = G.metropolis(g)
    row_only = a.copy()
    row_only[:, 0], row_only[:, 1] = [0.5, 0.5, 0, 0], [0.25, 0.25, 0.5, 0]  # columns still sum to 1
    row_only[:, 3] = [0.25, 0, 0.25, 0.5]
    assert np.allclose(row_only.sum(0), 1) and not np.allclose(row_only.sum(1), 1)
    with pytest.raises(ValueError, match="doubly stochastic"):
        G.check_combination(row_only, g)
    with pytest.raises(ValueError, match="columns that sum to 1"):
        G.check_combination(a * 0.9, g)
    off = np.full((4, 4), 0.25)  # the complete graph's weights on a ring
    with pytest.raises(ValueError, match=r"zero off the graph's edges .* agents 0 and 2 are not linked"):
        G.check_combination(off, g)
    neg = a.copy()
    neg[0, 0], neg[1, 0] = -0.1, a[1, 0] + 0.1 + a[0, 0]
    with pytest.raises(ValueError, match="non-negative"):
        G.check_combination(neg, g)
    bipartite = np.array([[0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0]])
    with pytest.raises(ValueError, match="primitive"):
        G.check_combination(bipartite, g)
    with pytest.raises(ValueError, match="combination must be 'metropolis' unless the topology is complete"):
        G.combination(g, "uniform")


@pytest.mark.parametrize("field, value, message", [
    ("topology", "rign", "did you mean 'ring'"),
    ("optimizer", "rmsprop", "optimizer must be one of"),
    ("step_size", 0.0, r"step_size \(mu\) must be a finite number > 0"),
    ("num_agents", 0, r"num_agents \(K\) must be an integer >= 1"),
    ("amplitude", (5.0, 0.1), "amplitude must be an interval"),
])
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        DifMAMLConfig(**{field: value})


def test_erdos_renyi_that_cannot_connect_says_so():
    with pytest.raises(ValueError, match="edge_prob must make a connected graph likely"):
        G.erdos_renyi(30, 0.01, 0, max_draws=20)


# --- the algorithm against what it must equal


def test_complete_graph_uniform_weights_is_centralized_maml_on_the_pooled_tasks():
    cfg = DifMAMLConfig(topology="complete", combination="uniform", optimizer="sgd", step_size=0.005, iterations=4, **SMALL)
    run = simulate(cfg, record=False)
    f, est, w = loss_fn(cfg), cfg.estimator(), initial_model(cfg)
    for i in range(1, 5):  # one model, the average of the K agents' eq. (4) gradients: MAML with B = K tasks pooled
        grads = [agent_gradient(f, w, agent_batches(cfg, k, i), cfg.inner_lr, est) for k in range(6)]
        w = {n: w[n] - cfg.step_size * torch.stack([g[n] for g in grads]).mean(0) for n in w}
    assert all(_close(_agent(run.w, k), w) for k in range(6))
    # one model: every agent combines the same K models with the same weights, equal up to the order in which the
    # CPU's matrix kernels sum each row (bit-equal on some CPUs, a float32 ulp apart on AVX-512 ones)
    assert all(((v[k] - v[0]).abs() <= 2 * torch.finfo(v.dtype).eps * v[0].abs().clamp(min=1)).all() for v in run.w.values() for k in range(6))
    assert disagreement(run.w) < 1e-12  # (the mean of 6 equal float32 rows rounds)


def test_no_edges_is_k_independent_maml_runs():
    cfg = DifMAMLConfig(topology="none", optimizer="adam", iterations=4, **SMALL)
    run = simulate(cfg, record=False)
    for k in range(6):
        w = initial_model(cfg)
        state = init_optimizer_state(w, cfg)
        for i in range(1, 5):
            w, state = agent_round(cfg, k, i, w, state)
        assert _close(_agent(run.w, k), w)
    assert disagreement(run.w) > 0


@pytest.mark.parametrize("topology", ["ring", "ring-chords", "erdos-renyi"])
def test_the_centroid_follows_w_c_minus_mu_over_k_sum_of_gradients(topology):
    cfg = DifMAMLConfig(topology=topology, optimizer="sgd", step_size=0.01, iterations=3, graph_seed=3, **SMALL)
    before, after = simulate(cfg, record=False), simulate(cfg.replace(iterations=4), record=False)
    f, est = loss_fn(cfg), cfg.estimator()
    grads = [agent_gradient(f, _agent(before.w, k), agent_batches(cfg, k, 4), cfg.inner_lr, est) for k in range(6)]
    predicted = {n: before.w[n].mean(0) - cfg.step_size / 6 * sum(g[n] for g in grads) for n in before.w}
    assert _close({n: v.mean(0) for n, v in after.w.items()}, predicted)
    assert disagreement(after.w) > 0


def test_one_agents_round_by_hand_matches_the_simulator():
    cfg = DifMAMLConfig(topology="ring", iterations=2, **SMALL)
    one, two = simulate(cfg.replace(iterations=1), record=False), simulate(cfg, record=False)
    g, a, _ = cfg.combination_matrix()
    k = 2
    hood = [k, *g.neighbours(k)]
    w = combine([_agent(one.phi, l) for l in hood], [a[l, k] for l in hood])  # eq. (6b) as agent k computes it
    assert _close(w, _agent(one.w, k))
    # Adam's moments after round 1 of agent k, from its own first gradient
    state = init_optimizer_state(initial_model(cfg), cfg)
    _, state = agent_round(cfg, k, 1, initial_model(cfg), state)
    phi, _ = agent_round(cfg, k, 2, w, state)
    assert _close(phi, _agent(two.phi, k))


def test_batches_are_a_pure_function_of_seed_agent_and_iteration():
    cfg = DifMAMLConfig(**SMALL)
    a, b = agent_batches(cfg, 3, 7), agent_batches(cfg, 3, 7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(agent_batches(cfg, 3, 8)[0], a[0]) and not torch.equal(agent_batches(cfg, 4, 7)[0], a[0])
    amp = (agent_batches(cfg, 5, 1)[1].abs().max())
    assert float(amp) <= cfg.family(5).amplitude[1] + 1e-6 and cfg.family(5).amplitude == pytest.approx((0.1 + 5 * 4.9 / 6, 5.0))


@pytest.mark.parametrize("estimator", ["first_order", "ggs"])
def test_other_estimators_run(estimator):
    run = simulate(DifMAMLConfig(meta_gradient=estimator, iterations=2, **SMALL))
    assert len(run.test_loss) == 2 and np.isfinite(run.test_loss).all()


def test_a_run_records_tests_disagreement_and_message_counts(tmp_path):
    cfg = DifMAMLConfig(topology="ring", iterations=4, **SMALL)
    run = simulate(cfg)
    assert run.iterations == (0, 2, 4) and len(run.agent_test_loss[0]) == 6 and len(run.adaptation_curve) == 3
    assert run.disagreement[0] < 1e-10 < run.disagreement[-1]
    assert run.messages_up == 6 * 4 and run.messages_down == (6 + 2 * 6) * 4
    again = DifResult.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again.test_loss == run.test_loss and again.config == cfg
    assert main(["--iterations", "2", "--shots", "4", "--eval-tasks", "4", "--eval-every", "1", "--topology", "ring",
                 "--json", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["messages_down"] == 2 * 18
    check_provenance(record["provenance"], record["config"])


def test_the_command_line_refuses_a_bad_topology(capsys):
    assert main(["--topology", "edges", "--edges", "[[0, 1], [2, 3]]", "--num-agents", "4"]) == 2
    assert "graph must be connected" in capsys.readouterr().err


def test_the_fig2_reproduction_runs_every_curve_and_writes_its_verdicts(tmp_path):
    from fedmeta.simulations.reproduce_dif import DifBudget, dif_configs, dif_fig2, plot_dif

    budget = DifBudget(iterations=4, eval_every=2, eval_tasks=4, seeds=(0, 1))
    cfgs = dif_configs(budget)
    assert {c.topology for cs in cfgs.values() for c in cs} == {"ring-chords", "complete", "none", "ring", "erdos-renyi"}
    assert [c.seed for c in cfgs["Adam: Dif-MAML (ring-chords)"]] == [0, 1] and [c.step_size for c in cfgs["SGD mu=0.0025: Dif-MAML (ring-chords)"]] == [0.0025] * 2
    text, runs = dif_fig2(budget, lambda cs: [simulate(c.replace(shots=4, eval_query=10, eval_steps=10)) for c in cs])
    assert text.count("\n| Adam: ") == 5 and text.count("\n| SGD mu=") == 4 and "ratio per seed" in text
    assert "Theorem 1 (SGD, ring-chords, seeds [0, 1]): steady-state disagreement" in text and "Figure 2c" in text
    assert "| 6 / 24 |" in text and "| 6 / 36 |" in text and "| 6 / 6 |" in text  # K up, K + 2|E| down
    assert [p.name for p in plot_dif(runs, tmp_path)] == ["adam_curves.png", "sgd_curves.png"]
