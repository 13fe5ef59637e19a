"""Batched (vmapped) execution of many clients equals running them one by one (fedmeta.algorithms.executor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeta import batched, meta
from fedmeta.algorithms import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig
from fedmeta.algorithms.executor import local_round, local_rounds
from fedmeta.data import ClientData
from fedmeta.models import mlp

C = 7
TOL = {"exact": 2e-6, "first_order": 2e-6, "fo_muml": 2e-6, "hessian_free": 1e-4, "ggs": 0.0, "zeroth_order": 0.0}


def _clients(num_train=20):
    g = torch.Generator().manual_seed(0)
    return [
        ClientData(torch.rand(num_train, 1, 4, 4, generator=g), torch.randint(0, 3, (num_train,), generator=g),
                   torch.rand(3, 1, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g))
        for _ in range(C)
    ]


def _streams(datas):
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(datas))]
    dgens = [torch.Generator().manual_seed(200 + i) for i in range(len(datas))]
    return gens, dgens, [lambda k, d=d, g=g: d.sample(k, g) for d, g in zip(datas, gens)]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = mlp((16, 8, 3), nn.Tanh)
    return meta.make_loss(model, nn.functional.cross_entropy), meta.params_of(model), _clients()


def _max_diff(stacked, dicts):
    return max(float((stacked[k][i] - d[k]).abs().max()) for i, d in enumerate(dicts) for k in d)


def _loop(algo, f, w, datas, hp, states=None, has=None, dgens=None):
    """The clients one by one through the single-client executor, with fresh streams."""
    gens, dg, samplers = _streams(datas)
    dg = dg if dgens else [None] * len(datas)
    return [local_round(algo, f, w, samplers[i], hp, state={k: v[i] for k, v in states.items()} if has and has[i] else None,
                        gen=dg[i]) for i in range(len(datas))]


@pytest.mark.parametrize("estimator", ["exact", "first_order", "hessian_free", "fo_muml", "ggs"])
@pytest.mark.parametrize("chunk_size", [3, 100])
def test_per_fedavg_batched_equals_per_client(problem, estimator, chunk_size):
    f, w, datas = problem
    hp = PerFedAvgConfig(local_steps=3, batch_size=5, inner_lr=0.05, meta_lr=0.1, meta_gradient=estimator, num_directions=2,
                         inner_steps=2)
    gens, dgens, samplers = _streams(datas)
    out = local_rounds("per-fedavg", f, w, samplers, gens, hp, direction_gens=dgens, chunk_size=chunk_size)
    ref = _loop("per-fedavg", f, w, datas, hp, dgens=True)
    assert _max_diff(out.meta_models, [r.meta_model for r in ref]) <= TOL[estimator]
    for s, r in zip(out.stats, ref):
        r = r.stats
        assert (s.num_samples, s.num_gradients, s.num_hvps, s.num_loss_evals) == (r.num_samples, r.num_gradients, r.num_hvps, r.num_loss_evals)
        assert s.last_loss == pytest.approx(r.last_loss, abs=1e-4)
    # the clients really differ (not one model copied C times)
    assert float((out.meta_models["1.weight"][0] - out.meta_models["1.weight"][1]).abs().max()) > 1e-4


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_local_moml_batched_equals_per_client_with_mixed_memory(problem, estimator):
    f, w, datas = problem
    hp = LocalMOMLConfig(local_steps=3, batch_size=5, init_batch_size=4, inner_lr=0.05, lr=0.1, momentum=0.5, meta_gradient=estimator,
                         inner_steps=2, memory_policy="keep")
    has = [i % 3 != 0 for i in range(C)]  # some clients start from a kept memory, the others reset (line 5)
    u = batched.stack([{k: v + 0.01 * (i + 1) for k, v in w.items()} for i in range(C)])
    gens, _, samplers = _streams(datas)
    out = local_rounds("local-moml", f, w, samplers, gens, hp, states=u, has_state=has, chunk_size=4)
    ref = _loop("local-moml", f, w, datas, hp, states=u, has=has)
    assert _max_diff(out.meta_models, [r.meta_model for r in ref]) <= 2e-6
    assert _max_diff(out.states, [r.state for r in ref]) <= 2e-6
    for s, r in zip(out.stats, ref):
        assert (s.num_samples, s.num_gradients, s.num_hvps) == (r.stats.num_samples, r.stats.num_gradients, r.stats.num_hvps)


def test_fedavg_runs_vectorized_and_equals_per_client(problem):
    f, w, datas = problem
    hp = FedAvgConfig(local_steps=4, batch_size=5, lr=0.1)
    gens, _, samplers = _streams(datas)
    out = local_rounds("fedavg", f, w, samplers, gens, hp, chunk_size=3, vectorize="vmap")  # "vmap": no silent loop
    ref = _loop("fedavg", f, w, datas, hp)
    assert _max_diff(out.meta_models, [r.meta_model for r in ref]) <= 2e-6
    assert [s.last_loss for s in out.stats] == pytest.approx([r.stats.last_loss for r in ref], abs=1e-5)
    assert out.states is None


def test_loop_mode_and_ragged_clients_fall_back_exactly(problem):
    """``vectorize='loop'`` is the per-client path bit for bit; clients with fewer samples than the
    batch size draw smaller batches, which cannot stack, and the chunk is replayed as a loop."""
    f, w, _ = problem
    datas = _clients()[:3] + [_clients(num_train=3)[0]]  # the last client has 3 < K samples
    hp = PerFedAvgConfig(local_steps=2, batch_size=5, inner_lr=0.05, meta_lr=0.1)
    for vectorize in ("loop", "auto"):
        gens, _, samplers = _streams(datas)
        out = local_rounds("per-fedavg", f, w, samplers, gens, hp, vectorize=vectorize)
        ref = _loop("per-fedavg", f, w, datas, hp)
        assert _max_diff(out.meta_models, [r.meta_model for r in ref]) == 0.0, vectorize


def test_vmap_mode_refuses_stochastic_estimators(problem):
    f, w, datas = problem
    gens, dgens, samplers = _streams(datas)
    hp = PerFedAvgConfig(local_steps=1, batch_size=5, inner_lr=0.1, meta_lr=0.1, meta_gradient="ggs")
    with pytest.raises(ValueError, match="vectorize='vmap'.*ggs"):
        local_rounds("per-fedavg", f, w, samplers, gens, hp, direction_gens=dgens, vectorize="vmap")


def test_auto_falls_back_when_vmap_fails(problem, caplog):
    """A loss that vmap cannot batch (``.item()`` inside) runs as a loop, with the same draws."""
    f, w, datas = problem

    def picky(params, x, y):
        loss = f(params, x, y)
        _ = loss.item()  # data-dependent Python control flow: not vmappable
        return loss

    hp = PerFedAvgConfig(local_steps=2, batch_size=5, inner_lr=0.05, meta_lr=0.1, meta_gradient="first_order")
    gens, _, samplers = _streams(datas)
    with caplog.at_level("WARNING", logger="fedmeta"):
        out = local_rounds("per-fedavg", picky, w, samplers, gens, hp, chunk_size=3)
    assert "vmap failed" in caplog.text
    ref = _loop("per-fedavg", f, w, datas, hp)
    assert _max_diff(out.meta_models, [r.meta_model for r in ref]) == 0.0
    gens, _, samplers = _streams(datas)
    with pytest.raises(RuntimeError):
        local_rounds("per-fedavg", picky, w, samplers, gens, hp, vectorize="vmap")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="vectorize must be one of"):
        batched.check_vectorize("gpu", 10)
    with pytest.raises(ValueError, match="chunk_size .* >= 1"):
        batched.check_vectorize("auto", 0)


def test_weighted_mean_is_the_average_over_clients():
    stacked = {"a": torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])}
    assert torch.allclose(batched.weighted_mean(stacked, [1, 1, 1])["a"], torch.tensor([3.0, 3.0]))
    assert torch.allclose(batched.weighted_mean(stacked, [1, 0, 3])["a"], torch.tensor([4.0, 1.25]))


def test_nonfinite_rows_finds_nan_and_inf_clients():
    stacked = {"a": torch.zeros(4, 3), "b": torch.ones(4, 2, 2)}
    assert batched.nonfinite_rows(stacked) == []
    stacked["a"][1, 2] = float("nan")
    stacked["b"][3, 0, 1] = float("-inf")
    assert batched.nonfinite_rows(stacked) == [1, 3]
