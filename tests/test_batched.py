"""Batched (vmapped) execution of many clients equals running them one by one (fedmeta.batched)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeta import batched, meta
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


@pytest.mark.parametrize("estimator", ["exact", "first_order", "hessian_free", "fo_muml", "ggs"])
@pytest.mark.parametrize("chunk_size", [3, 100])
def test_per_fedavg_batched_equals_per_client(problem, estimator, chunk_size):
    f, w, datas = problem
    est = meta.meta_gradient(estimator, num_directions=2)
    kw = dict(local_steps=3, batch_size=5, inner_lr=0.05, meta_lr=0.1, estimator=est, inner_steps=2)
    gens, dgens, samplers = _streams(datas)
    models, stats = batched.per_fedavg_rounds(f, w, samplers, gens, direction_gens=dgens, chunk_size=chunk_size, **kw)
    gens, dgens, samplers = _streams(datas)
    ref = [meta.per_fedavg_round(f, w, samplers[i], gen=dgens[i], **kw) for i in range(C)]
    assert _max_diff(models, [r[0] for r in ref]) <= TOL[estimator]
    for s, (_, r) in zip(stats, ref):
        assert (s.num_samples, s.num_gradients, s.num_hvps, s.num_loss_evals) == (r.num_samples, r.num_gradients, r.num_hvps, r.num_loss_evals)
        assert s.last_loss == pytest.approx(r.last_loss, abs=1e-4)
    # the clients really differ (not one model copied C times)
    assert float((models["1.weight"][0] - models["1.weight"][1]).abs().max()) > 1e-4


@pytest.mark.parametrize("estimator", ["exact", "first_order"])
def test_local_moml_batched_equals_per_client_with_mixed_memory(problem, estimator):
    f, w, datas = problem
    est = meta.meta_gradient(estimator)
    kw = dict(local_steps=3, batch_size=5, init_batch_size=4, inner_lr=0.05, lr=0.1, momentum=0.5, estimator=est, inner_steps=2)
    has = [i % 3 != 0 for i in range(C)]  # some clients start from a kept memory, the others reset (line 5)
    u = batched.stack([{k: v + 0.01 * (i + 1) for k, v in w.items()} for i in range(C)])
    gens, _, samplers = _streams(datas)
    models, memories, stats = batched.local_moml_rounds(f, w, u, has, samplers, gens, chunk_size=4, **kw)
    gens, _, samplers = _streams(datas)
    ref = [meta.local_moml_round(f, w, {k: v[i] for k, v in u.items()} if has[i] else None, samplers[i], **kw) for i in range(C)]
    assert _max_diff(models, [r[0] for r in ref]) <= 2e-6
    assert _max_diff(memories, [r[1] for r in ref]) <= 2e-6
    for s, r in zip(stats, ref):
        assert (s.num_samples, s.num_gradients, s.num_hvps) == (r[2].num_samples, r[2].num_gradients, r[2].num_hvps)


def test_loop_mode_and_ragged_clients_fall_back_exactly(problem):
    """``vectorize='loop'`` is the per-client path bit for bit; clients with fewer samples than the
    batch size draw smaller batches, which cannot stack, and the chunk is replayed as a loop."""
    f, w, _ = problem
    datas = _clients()[:3] + [_clients(num_train=3)[0]]  # the last client has 3 < K samples
    kw = dict(local_steps=2, batch_size=5, inner_lr=0.05, meta_lr=0.1)
    for vectorize in ("loop", "auto"):
        gens, _, samplers = _streams(datas)
        models, _ = batched.per_fedavg_rounds(f, w, samplers, gens, vectorize=vectorize, **kw)
        gens, _, samplers = _streams(datas)
        ref = [meta.per_fedavg_round(f, w, s, **kw)[0] for s in samplers]
        assert _max_diff(models, ref) == 0.0, vectorize


def test_vmap_mode_refuses_stochastic_estimators(problem):
    f, w, datas = problem
    gens, dgens, samplers = _streams(datas)
    with pytest.raises(ValueError, match="vectorize='vmap'.*ggs"):
        batched.per_fedavg_rounds(f, w, samplers, gens, direction_gens=dgens, local_steps=1, batch_size=5, inner_lr=0.1,
                                  meta_lr=0.1, estimator=meta.meta_gradient("ggs"), vectorize="vmap")


def test_auto_falls_back_when_vmap_fails(problem, caplog):
    """A loss that vmap cannot batch (``.item()`` inside) runs as a loop, with the same draws."""
    f, w, datas = problem

    def picky(params, x, y):
        loss = f(params, x, y)
        _ = loss.item()  # data-dependent Python control flow: not vmappable
        return loss

    kw = dict(local_steps=2, batch_size=5, inner_lr=0.05, meta_lr=0.1, estimator=meta.FIRST_ORDER)
    gens, _, samplers = _streams(datas)
    with caplog.at_level("WARNING", logger="fedmeta"):
        models, _ = batched.per_fedavg_rounds(picky, w, samplers, gens, chunk_size=3, **kw)
    assert "vmap failed" in caplog.text
    gens, _, samplers = _streams(datas)
    ref = [meta.per_fedavg_round(f, w, s, **kw)[0] for s in samplers]
    assert _max_diff(models, ref) == 0.0
    gens, _, samplers = _streams(datas)
    with pytest.raises(RuntimeError):
        batched.per_fedavg_rounds(picky, w, samplers, gens, vectorize="vmap", **kw)


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
