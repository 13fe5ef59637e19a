"""An algorithm is one unit: the docs' "Add your own algorithm" (docs/your-algorithm.md) adds one (first-order Reptile) without touching any
fedmeta module; this file runs that code as written, through the client (loop and vmap), a multi-client node and a
Ray simulation.

Reptile (Nichol et al. 2018), one local step: ``k`` SGD steps from ``w`` on ``k`` fresh batches give
``phi``; then ``w <- w + epsilon (phi - w)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp

from fedmeta import algorithms, meta
from fedmeta.algorithms.executor import local_round, local_rounds
from fedmeta.clients import make_client_app
from fedmeta.clients.client import ClientGroup, MetaClient, round_generator
from fedmeta.data import sinewave_task
from fedmeta.models import sine_mlp

from fakes import doc_snippet


YOUR_ALGORITHM_PAGE = "docs/your-algorithm.md"
_README: dict = {"__name__": "readme_your_algorithm"}  # not importable: Ray pickles the classes by value
exec(compile(doc_snippet("your-algorithm", page=YOUR_ALGORITHM_PAGE), YOUR_ALGORITHM_PAGE, "exec", dont_inherit=True), _README)  # the docs' Reptile, run as written
algorithms.unregister("reptile")  # it registers itself; the fixture below registers it for this module's tests only
ReptileConfig, Reptile, ReptileStrategy = _README["ReptileConfig"], _README["Reptile"], _README["ReptileStrategy"]
REPTILE = Reptile()


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Registered for this module's tests only (other tests see the built-in algorithms)."""
    algorithms.register(REPTILE)
    yield
    algorithms.unregister(REPTILE.name)


def _by_hand(w, batches_per_step, hp, f):
    for batches in batches_per_step:
        phi = w
        for batch in batches:
            phi = {k: phi[k] - hp.inner_lr * g for k, g in torch.func.grad(f)(phi, *batch).items()}
        w = {k: w[k] + hp.meta_lr * (phi[k] - w[k]) for k in w}
    return w


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = sine_mlp()
    return model, meta.make_loss(model, torch.nn.functional.mse_loss), meta.params_of(model)


def test_the_registered_unit_runs_by_name_and_computes_its_equations(problem):
    _, f, w = problem
    hp = ReptileConfig()
    data = sinewave_task(1, 4, 0)
    g = torch.Generator().manual_seed(3)
    r = local_round("reptile", f, w, lambda k: data.sample(k, g), hp)
    g = torch.Generator().manual_seed(3)
    steps = [[data.sample(hp.batch_size, g) for _ in range(hp.inner_steps)] for _ in range(hp.local_steps)]
    expected = _by_hand(w, steps, hp, f)
    for k in w:
        torch.testing.assert_close(r.meta_model[k], expected[k], rtol=1e-6, atol=1e-7)
    assert (r.stats.num_samples, r.stats.num_gradients, r.state) == (20, 4, None)
    assert algorithms.get("reptile") is REPTILE and "reptile" in algorithms.REGISTRY


def test_the_clients_run_it_one_by_one_and_vmapped_alike(problem):
    model, f, w = problem
    hp = ReptileConfig(local_steps=3)
    data_fn = lambda c: sinewave_task(c, 6, 0)  # noqa: E731
    one = [MetaClient(model, torch.nn.functional.mse_loss, data_fn(c), torch.device("cpu")).train(w, hp, None, round_generator(0, c, 1, 0))
           for c in (0, 2, 5)]
    for vectorize in ("vmap", "loop"):
        group = ClientGroup(model, torch.nn.functional.mse_loss, data_fn, torch.device("cpu"), chunk_size=2, vectorize=vectorize)
        res = group.train(w, hp, [0, 2, 5], 0, 1)
        for i, r in enumerate(one):
            for k in w:
                torch.testing.assert_close(res.meta_models[k][i], r.meta_model[k], rtol=1e-5, atol=2e-6)
    assert float((res.meta_models["1.weight"][0] - res.meta_models["1.weight"][1]).abs().max()) > 1e-5


def test_an_unknown_algorithm_is_a_clear_error_never_a_fallback(problem):
    _, f, w = problem
    with pytest.raises(ValueError, match=r"algorithm must be one of \[.*'reptile'.*\], got 'reptile-typo'"):
        local_rounds("reptile-typo", f, w, [], [], ReptileConfig())
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register(type("Other", (Reptile,), {})())
    bad = type("Bad", (Reptile,), {"name": "test-bad"})
    with pytest.raises(ValueError, match="config must be a WireConfig whose `algorithm` is 'test-bad'"):
        algorithms.register(bad())


def _client_app() -> ClientApp:
    """fedmeta's ClientApp; ``register`` carries the unit to the Ray workers, which receive the app
    pickled and never run this module's ``register`` call."""
    return make_client_app(sine_mlp, lambda pid: sinewave_task(pid, 4, 0), torch.nn.functional.mse_loss, register=[REPTILE])


@pytest.mark.ray
def test_a_ray_simulation_trains_the_new_algorithm(ray_runner, problem):
    from test_simulation import simulate_strategy

    from fedmeta.simulations.apps import initial_model
    from fedmeta.simulations.config import ExperimentConfig

    cfg = ExperimentConfig(dataset="sinewave", num_clients=4, clients_per_round=0, num_rounds=3, evaluate_every=3, seed=0, num_nodes=0)
    hp = ReptileConfig(inner_lr=0.01, meta_lr=0.5)
    strategy = ReptileStrategy(num_clients=4, evaluate_every=3, **dataclasses.asdict(hp))
    result = simulate_strategy(strategy, cfg, _client_app())
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert all(m["num-clients"] == 4 and m["num-failures"] == 0 for m in result.train_metrics_clientapp.values())
    assert all(row["num-gradients"] == hp.inner_steps * hp.local_steps for row in strategy.client_train[3].values())
    w0 = {k: v.detach().numpy() for k, v in initial_model(cfg).named_parameters()}
    assert any(not np.allclose(result.arrays[k].numpy(), w0[k]) for k in w0)
    loss = result.evaluate_metrics_clientapp[3]
    assert np.isfinite(loss["loss-after"]) and loss["num-clients"] == 4
