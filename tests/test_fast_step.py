"""The single-client fast path (fedmeta.meta's equations on fedmeta.fast.PLAIN_AUTOGRAD, plain autograd) against
the torch.func path (the same equations on meta.TORCH_FUNC, the default backend).

Same batches (the same draws from the same generator, in the same order), same numbers: 1e-6 in
float32 and 1e-10 in float64, for Per-FedAvg and LocalMOML (a fresh and a kept memory u), N in {1, 3},
exact and first-order; and ``MetaClient.train`` takes the fast path exactly where it covers the
setting, with the forced torch.func path's results. No Ray; a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeta import algorithms, fast, meta
from fedmeta.algorithms import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig
from fedmeta.algorithms.executor import local_round, resolve_step_impl
from fedmeta.clients import client as client_module
from fedmeta.clients.client import MetaClient, round_generator
from fedmeta.data import ClientData, sinewave_task
from fedmeta.meta import MetaBatches

PLAIN = fast.PLAIN_AUTOGRAD
from fedmeta.models import mlp, sine_mlp

TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]
NS = [1, 3]
ESTIMATORS = ["exact", "first_order"]


class Unrolled(nn.Module):
    """Not an nn.Sequential: the fast path's loss falls back to functional_call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


# name -> (model, criterion, x shape, number of classes or None for regression)
PROBLEMS = {
    "sine-mlp": (sine_mlp, nn.functional.mse_loss, (1,), None),
    "mlp-classifier": (lambda: mlp((12, 10, 8, 4)), nn.functional.cross_entropy, (12,), 4),
    "elu-mlp": (lambda: mlp((12, 9, 4), nn.ELU), nn.functional.cross_entropy, (12,), 4),
    "cnn": (_tiny_cnn, nn.functional.cross_entropy, (1, 8, 8), 4),
    "unrolled": (Unrolled, nn.functional.cross_entropy, (6,), 3),
}


def _problem(name: str, dtype: torch.dtype, seed: int = 0, n: int = 40):
    """(model, func-path loss, fast-path loss, w, x, y) with the model and data in ``dtype``."""
    make, criterion, shape, classes = PROBLEMS[name]
    torch.manual_seed(seed)
    model = make().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g) if classes else torch.sin(x) * 2
    return model, meta.make_loss(model, criterion), fast.make_loss(model, criterion), meta.params_of(model), x, y


def _recording_sampler(x, y, gen: torch.Generator, log: list):
    def sample(k: int):
        idx = torch.randperm(x.shape[0], generator=gen)[:k]
        log.append(idx)
        return x[idx], y[idx]

    return sample


def _assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and not a[k].requires_grad
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _meta_batches(sample, n: int, k: int) -> MetaBatches:
    return MetaBatches.draw(sample, n, k)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_the_fast_loss_equals_functional_call_bit_for_bit(name):
    model, f_func, f_fast, w, x, y = _problem(name, torch.float32)
    assert (fast.sequential_forward(model) is None) == (name == "unrolled")
    assert torch.equal(f_fast(w, x[:5], y[:5]), f_func(w, x[:5], y[:5]))


def test_a_hooked_model_is_run_through_functional_call():
    model = mlp((4, 5, 2))
    assert fast.sequential_forward(model) is not None
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    assert fast.sequential_forward(model) is None
    w, x = meta.params_of(model), torch.randn(3, 4)
    f = fast.make_loss(model, lambda out, y: out.sum())
    assert torch.equal(f(w, x, None), meta.make_loss(model, lambda out, y: out.sum())(w, x, None))
    handle.remove()
    tied = mlp((4, 4, 4))
    tied[3].weight = tied[1].weight  # one tensor under two names: named_parameters() lists it once
    assert fast.sequential_forward(tied) is None
    w, total = meta.params_of(tied), lambda out, y: out.sum()
    assert torch.equal(fast.make_loss(tied, total)(w, x, None), meta.make_loss(tied, total)(w, x, None))


# --------------------------------------------------------------------------- one step


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("estimator", ESTIMATORS + ["fo_muml"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_one_step_equals_the_torch_func_step(name, estimator, n, dtype):
    model, f_func, f_fast, w, x, y = _problem(name, dtype)
    log: list = []
    sample = _recording_sampler(x, y, torch.Generator().manual_seed(5), log)
    mb = _meta_batches(sample, n, 5)
    est = meta.meta_gradient(estimator)
    tol = TOL[dtype]
    g_fast, wn_fast = meta.maml_gradient(f_fast, w, mb, 0.05, est, ad=PLAIN)
    g_func, wn_func = meta.maml_gradient(f_func, w, mb, 0.05, est)
    _assert_close(g_fast, g_func, tol)
    _assert_close(wn_fast, wn_func, tol)
    # LocalMOML from a fresh memory (Algorithm 3 line 5, on both backends) and from a kept one
    s0 = [sample(4) for _ in range(n)]
    u0 = meta.local_moml_init_memory(f_func, w, s0, 0.05, est)
    _assert_close(meta.local_moml_init_memory(f_fast, w, s0, 0.05, est, ad=PLAIN), u0, tol)
    u_kept = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=dtype) for k, v in w.items()}
    for u in (u0, u_kept):
        got = meta.local_moml_step(f_fast, w, u, mb, 0.05, 0.1, 0.3, est, ad=PLAIN)
        want = meta.local_moml_step(f_func, w, u, mb, 0.05, 0.1, 0.3, est)
        _assert_close(got[0], want[0], tol)
        _assert_close(got[1], want[1], tol)
    # the exact meta-gradient is not the first-order one here (the Hessian term is exercised)
    if estimator == "exact":
        fo, _ = meta.maml_gradient(f_fast, w, mb, 0.05, meta.FIRST_ORDER, ad=PLAIN)
        assert max(float((fo[k] - g_fast[k]).abs().max()) for k in w) > 100 * tol


def test_hvp_matches_torch_func_and_handles_parameters_the_gradient_does_not_depend_on():
    _, f_func, f_fast, w, x, y = _problem("mlp-classifier", torch.float64)
    v = {k: torch.randn_like(t) for k, t in w.items()}
    _assert_close(fast.hvp(f_fast, w, v, (x, y)), meta.hvp(f_func, w, v, (x, y)), 1e-10)
    # f(w) = <b, w> + |c|^2: grad f wrt w is constant (no graph), H = diag(0, 2)
    lin = {"w": torch.randn(3, dtype=torch.float64), "c": torch.randn(2, dtype=torch.float64)}
    f = lambda p, bb, _: p["w"] @ bb + (p["c"] ** 2).sum()  # noqa: E731
    vv = {"w": torch.ones(3, dtype=torch.float64), "c": torch.ones(2, dtype=torch.float64)}
    hv = fast.hvp(f, lin, vv, (torch.arange(3.0, dtype=torch.float64), None))
    assert torch.equal(hv["w"], torch.zeros(3, dtype=torch.float64)) and torch.equal(hv["c"], 2 * vv["c"])
    g = fast.gradient(lambda p, *_: (p["c"] ** 2).sum(), lin, (None, None))  # "w" unused: zero gradient
    assert torch.equal(g["w"], torch.zeros(3, dtype=torch.float64))


def test_uncovered_estimators_are_refused_clearly():
    """The plain-autograd backend runs only the estimators of fast.ESTIMATORS: the executor's selection (the one
    place that decides) refuses the others with a clear error when asked to run them there."""
    _, _, f_fast, w, x, y = _problem("sine-mlp", torch.float32)
    for name in ("hessian_free", "ggs", "zeroth_order"):
        assert fast.refusal(meta.meta_gradient(name)) is not None
        for hp in (PerFedAvgConfig(meta_gradient=name, local_steps=1), LocalMOMLConfig(meta_gradient=name, local_steps=1)):
            with pytest.raises(ValueError, match="fast path computes meta_gradient in"):
                resolve_step_impl(hp.algorithm, hp, "fast")
            log: list = []
            with pytest.raises(ValueError, match="fast path computes meta_gradient in"):
                local_round(hp.algorithm, f_fast, w, _recording_sampler(x, y, torch.Generator().manual_seed(0), log), hp,
                            gen=torch.Generator().manual_seed(1), step_impl="fast")
            assert log == []  # refused before any draw or step
    assert all(fast.refusal(meta.meta_gradient(name)) is None for name in fast.ESTIMATORS)


# --------------------------------------------------------------------------- a local round


def _round_configs(n: int, estimator: str):
    est = dict(inner_steps=n, meta_gradient=estimator)
    return {
        "per-fedavg": PerFedAvgConfig(inner_lr=0.05, meta_lr=0.05, local_steps=3, batch_size=5, **est),
        "local-moml-keep": LocalMOMLConfig(inner_lr=0.05, lr=0.05, momentum=0.4, local_steps=3, batch_size=5, init_batch_size=4,
                                           memory_policy="keep", **est),
        "local-moml-reset": LocalMOMLConfig(inner_lr=0.05, lr=0.05, momentum=0.4, local_steps=2, batch_size=5, init_batch_size=4,
                                            memory_policy="reset", **est),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name", ["sine-mlp", "mlp-classifier"])
def test_a_local_round_equals_the_torch_func_round_with_the_same_draws(name, estimator, n, dtype):
    _, f_func, f_fast, w, x, y = _problem(name, dtype)
    tol = TOL[dtype]
    u_kept = {k: v + 0.01 for k, v in w.items()}
    for label, hp in _round_configs(n, estimator).items():
        for u in ((None, u_kept) if label == "local-moml-keep" else (None,)):
            runs = {}
            for impl, f in (("fast", f_fast), ("func", f_func)):
                log: list = []
                gen = torch.Generator().manual_seed(7)
                r = local_round(hp.algorithm, f, w, _recording_sampler(x, y, gen, log), hp, state=u, step_impl=impl)
                runs[impl] = (r, log, gen.get_state())
            (r_fast, log_fast, end_fast), (r_func, log_func, end_func) = runs["fast"], runs["func"]
            assert len(log_fast) == len(log_func) and all(torch.equal(a, b) for a, b in zip(log_fast, log_func))
            assert torch.equal(end_fast, end_func)
            _assert_close(r_fast.meta_model, r_func.meta_model, tol)
            assert (r_fast.state is None) == (r_func.state is None) == (label == "per-fedavg")
            if r_fast.state is not None:
                _assert_close(r_fast.state, r_func.state, tol)
            assert r_fast.stats == r_func.stats or abs(r_fast.stats.last_loss - r_func.stats.last_loss) < tol
            assert max(float((r_fast.meta_model[k] - w[k]).abs().max()) for k in w) > 1e-4  # it did move


@pytest.mark.parametrize("hp", [FedAvgConfig(lr=0.05, local_steps=4, batch_size=5),
                                PerFedAvgConfig(inner_lr=0.05, meta_lr=0.05, local_steps=3, batch_size=5, meta_gradient="exact"),
                                LocalMOMLConfig(inner_lr=0.05, lr=0.05, momentum=0.4, local_steps=3, batch_size=5, init_batch_size=4,
                                                memory_policy="keep")], ids=lambda hp: hp.algorithm)
def test_the_fast_round_updates_its_own_copy_in_place_and_leaves_the_callers_tensors_alone(hp):
    """The fast steps update the round's model in place (fast.descend_): the meta-model and kept state the
    caller passed must not change, and the float32 MLP round equals the torch.func round bit for bit."""
    _, f_func, f_fast, w, x, y = _problem("mlp-classifier", torch.float32)
    u = {k: v + 0.01 for k, v in w.items()} if hp.algorithm == "local-moml" else None
    w_before = {k: v.clone() for k, v in w.items()}
    u_before = None if u is None else {k: v.clone() for k, v in u.items()}
    runs = {impl: local_round(hp.algorithm, f, w, _recording_sampler(x, y, torch.Generator().manual_seed(3), []), hp, state=u,
                              step_impl=impl) for impl, f in (("fast", f_fast), ("func", f_func))}
    assert all(torch.equal(w[k], w_before[k]) for k in w)
    assert u is None or all(torch.equal(u[k], u_before[k]) for k in u)
    assert all(torch.equal(runs["fast"].meta_model[k], runs["func"].meta_model[k]) for k in w)
    assert max(float((runs["fast"].meta_model[k] - w[k]).abs().max()) for k in w) > 1e-4  # it did move


def test_step_impl_is_resolved_per_algorithm_and_estimator():
    assert resolve_step_impl("per-fedavg", PerFedAvgConfig(meta_gradient="exact")) == "fast"
    assert resolve_step_impl("local-moml", LocalMOMLConfig(meta_gradient="first_order", inner_steps=3)) == "fast"
    assert resolve_step_impl("local-moml", LocalMOMLConfig(meta_gradient="fo_muml")) == "fast"
    assert resolve_step_impl("per-fedavg", PerFedAvgConfig(meta_gradient="exact"), "func") == "func"
    assert resolve_step_impl("fedavg", FedAvgConfig()) == "fast"
    for hp in (PerFedAvgConfig(meta_gradient="hessian_free"), LocalMOMLConfig(meta_gradient="ggs")):
        assert resolve_step_impl(hp.algorithm, hp) == "func"
        with pytest.raises(ValueError):
            resolve_step_impl(hp.algorithm, hp, "fast")
    with pytest.raises(ValueError, match="step_impl must be one of"):
        resolve_step_impl("per-fedavg", PerFedAvgConfig(), "vmap")


def test_an_algorithm_without_a_fast_step_keeps_the_torch_func_path():
    class Plain(algorithms.PerFedAvg):
        fast_step = algorithms.Algorithm.fast_step  # a user's unit that never wrote one

    assert Plain().fast_refusal(PerFedAvgConfig()) is not None
    assert resolve_step_impl(Plain(), PerFedAvgConfig()) == "func"


# --------------------------------------------------------------------------- MetaClient picks the path


def _classifier_data(seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(x_train=torch.randn(40, 1, 4, 4, generator=g), y_train=torch.randint(0, 3, (40,), generator=g),
                      x_test=torch.randn(20, 1, 4, 4, generator=g), y_test=torch.randint(0, 3, (20,), generator=g))


CLIENTS = {
    "sine": (sine_mlp, nn.functional.mse_loss, lambda: sinewave_task(3, 6, 0)),
    "classifier": (lambda: mlp((16, 10, 3)), nn.functional.cross_entropy, _classifier_data),
}
COVERED = {
    "per-fedavg-exact": PerFedAvgConfig(inner_lr=0.05, meta_lr=0.02, local_steps=3),
    "per-fedavg-fo-n3": PerFedAvgConfig(inner_lr=0.05, meta_lr=0.02, local_steps=2, inner_steps=3, meta_gradient="first_order"),
    "local-moml-exact-n3": LocalMOMLConfig(inner_lr=0.05, lr=0.02, local_steps=2, inner_steps=3),
    "local-moml-fo": LocalMOMLConfig(inner_lr=0.05, lr=0.02, local_steps=3, meta_gradient="first_order"),
    "local-moml-fo-muml": LocalMOMLConfig(inner_lr=0.05, lr=0.02, local_steps=2, inner_steps=2, meta_gradient="fo_muml"),
    "fedavg": FedAvgConfig(lr=0.02, local_steps=3),
}
NOT_COVERED = {
    "per-fedavg-hessian-free": PerFedAvgConfig(inner_lr=0.05, meta_lr=0.02, local_steps=2, meta_gradient="hessian_free",
                                               delta=1e-3),
    "local-moml-ggs": LocalMOMLConfig(inner_lr=0.05, lr=0.02, local_steps=2, meta_gradient="ggs", num_directions=2, delta=1e-3),
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of the fast path's steps and memory resets (meta's equations on the plain-autograd backend, and
    fast.descend_), and of the torch.func path's (the same equations on the default backend)."""
    counts = {"fast": 0, "func": 0}

    def counting(module, name, key=None):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key or ("fast" if kwargs.get("ad") is PLAIN else "func")] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(fast, "descend_", "fast")  # every fast step ends in descend_ or local_moml_step / _init_memory on PLAIN
    for name in ("maml_gradient", "per_fedavg_step", "local_moml_step", "local_moml_init_memory", "adapt"):
        counting(meta, name)
    return counts


def _train_twice(client: MetaClient, hp, w):
    """Two rounds (the second from the first's kept memory, if any)."""
    first = client.train(w, hp, None, round_generator(4, 1, 1, 0))
    u = first.personalized_model if getattr(hp, "memory_policy", "") == "keep" else None
    return first, client.train(first.meta_model, hp, u, round_generator(4, 1, 2, 0))


@pytest.mark.parametrize("case", list(COVERED) + list(NOT_COVERED))
@pytest.mark.parametrize("problem", list(CLIENTS))
def test_meta_client_takes_the_fast_path_where_covered_with_the_forced_torch_func_results(problem, case, calls):
    make, criterion, data = CLIENTS[problem]
    hp = {**COVERED, **NOT_COVERED}[case]
    torch.manual_seed(1)
    model = make()
    w = meta.params_of(model)
    auto = MetaClient(model, criterion, data(), torch.device("cpu"))
    forced = MetaClient(model, criterion, data(), torch.device("cpu"), step_impl="func")
    expected = "fast" if case in COVERED else "func"
    assert auto.step_impl_for(hp) == expected and forced.step_impl_for(hp) == "func"

    got = _train_twice(auto, hp, w)
    assert calls["fast"] > 0 if expected == "fast" else calls["fast"] == 0
    assert calls["func"] == 0 if expected == "fast" else calls["func"] > 0
    calls.update(fast=0, func=0)
    want = _train_twice(forced, hp, w)
    assert calls["fast"] == 0 and calls["func"] > 0

    for a, b in zip(got, want):
        assert a.stats.num_samples == b.stats.num_samples and a.stats.num_gradients == b.stats.num_gradients
        assert a.stats.num_hvps == b.stats.num_hvps
        if expected == "func":  # the very same code: identical
            assert a.stats == b.stats
            assert all(torch.equal(a.meta_model[k], b.meta_model[k]) for k in w)
            assert all(torch.equal(a.personalized_model[k], b.personalized_model[k]) for k in (a.personalized_model or {}))
        else:
            _assert_close(a.meta_model, b.meta_model, 1e-6)
            if a.personalized_model is not None:
                _assert_close(a.personalized_model, b.personalized_model, 1e-6)
            assert abs(a.stats.last_loss - b.stats.last_loss) <= 1e-6
        assert (a.personalized_model is None) == (b.personalized_model is None)


def test_the_module_switch_and_the_constructor_force_a_path(monkeypatch):
    make, criterion, data = CLIENTS["sine"]
    hp = COVERED["per-fedavg-exact"]
    client = MetaClient(make(), criterion, data(), torch.device("cpu"))
    assert client.step_impl_for(hp) == "fast"
    monkeypatch.setattr(client_module, "STEP_IMPL", "func")
    assert client.step_impl_for(hp) == "func"
    assert MetaClient(make(), criterion, data(), torch.device("cpu"), step_impl="auto").step_impl_for(hp) == "fast"
    strict = MetaClient(make(), criterion, data(), torch.device("cpu"), step_impl="fast")
    with pytest.raises(ValueError, match="fast path computes meta_gradient in"):
        strict.train(meta.params_of(make()), NOT_COVERED["per-fedavg-hessian-free"], None, round_generator(0, 0, 1, 0))
    with pytest.raises(ValueError, match="step_impl must be one of"):
        MetaClient(make(), criterion, data(), torch.device("cpu"), step_impl="autograd")
