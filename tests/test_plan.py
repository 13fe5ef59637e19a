"""How a node runs its clients' steps (fedmeta.algorithms.plan): the compiled vmapped step computes what the
vmapped step does, and ``auto`` keeps the fastest candidate it measured, once per workload."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedmeta import meta
from fedmeta.algorithms import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig, plan
from fedmeta.algorithms.executor import local_rounds
from fedmeta.data import ClientData
from fedmeta.models import mlp
from fedmeta.simulations.config import ExperimentConfig

C = 5


@pytest.fixture(autouse=True)
def fresh_plans():
    plan.clear()
    yield
    plan.clear()


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = mlp((16, 8, 3), nn.Tanh)
    g = torch.Generator().manual_seed(0)
    datas = [ClientData(torch.rand(20, 1, 4, 4, generator=g), torch.randint(0, 3, (20,), generator=g),
                        torch.rand(3, 1, 4, 4, generator=g), torch.randint(0, 3, (3,), generator=g)) for _ in range(C)]
    return meta.make_loss(model, nn.functional.cross_entropy), meta.params_of(model), datas


def _round(problem, algorithm, hp, vectorize, states=None, has_state=None):
    f, w, datas = problem
    gens = [torch.Generator().manual_seed(100 + i) for i in range(C)]
    samplers = [lambda k, d=d, g=g: d.sample(k, g) for d, g in zip(datas, gens)]
    return local_rounds(algorithm, f, w, samplers, gens, hp, states=states, has_state=has_state, vectorize=vectorize)


def _max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.subprocess  # Inductor runs the C++ compiler
@pytest.mark.parametrize("algorithm, hp", [
    ("per-fedavg", PerFedAvgConfig(local_steps=3, batch_size=5, inner_lr=0.05, meta_lr=0.1, meta_gradient="first_order")),
    ("local-moml", LocalMOMLConfig(local_steps=3, batch_size=5, inner_lr=0.05, lr=0.1, momentum=0.5, meta_gradient="exact")),
])
def test_compiled_step_equals_the_vmapped_step(problem, algorithm, hp):
    # Act: one round vmapped and one compiled, from the same draws; the stateful one twice (fresh and kept memory)
    ref = _round(problem, algorithm, hp, "vmap")
    got = _round(problem, algorithm, hp, "compile")
    # Assert: models (and LocalMOML's memories) agree to float32 round-off, and the compiled step was built once
    assert _max_rel(got.meta_models, ref.meta_models) < 1e-5
    assert [s.last_loss for s in got.stats] == pytest.approx([s.last_loss for s in ref.stats], rel=1e-5)
    if ref.states is not None:
        assert _max_rel(got.states, ref.states) < 1e-5
        has = [True, False, True, True, False]
        again_ref = _round(problem, algorithm, hp, "vmap", ref.states, has)
        again = _round(problem, algorithm, hp, "compile", ref.states, has)
        assert _max_rel(again.meta_models, again_ref.meta_models) < 1e-5
    assert len(plan._COMPILED) == 1


@pytest.mark.subprocess  # compiles the step
def test_auto_measures_once_per_workload_and_compiles_only_long_rounds(problem, monkeypatch, caplog):
    hp = FedAvgConfig(local_steps=2, batch_size=5, lr=0.1)
    caplog.set_level(logging.INFO, logger="fedmeta")
    # Act: a short round (below the threshold) under auto, twice
    first = _round(problem, "fedavg", hp, "auto")
    chosen = plan._PLANS.copy()
    second = _round(problem, "fedavg", hp, "auto")
    # Assert: one measurement of vmap and loop, no compilation, and the same choice and numbers the second time
    (only,) = chosen.values()
    assert set(only.seconds) == {"vmap", "loop"} and only.impl in ("vmap", "loop") and only.compile_seconds is None
    assert plan._PLANS == chosen and not plan._COMPILED
    assert all(torch.equal(first.meta_models[k], second.meta_models[k]) for k in first.meta_models)
    assert sum("running the clients' steps as" in r.message for r in caplog.records) == 1
    # Act: the same workload with every round long enough to compile
    plan.clear()
    monkeypatch.setattr(plan, "COMPILE_MIN_ROUND_SECONDS", 0.0)
    compiled = _round(problem, "fedavg", hp, "auto")
    (measured,) = plan._PLANS.values()
    # Assert: compile was measured (its first call, the compilation, timed apart) and the fastest one kept
    assert set(measured.seconds) == {"vmap", "loop", "compile"} and measured.compile_seconds > 0
    assert measured.impl == min(measured.seconds, key=measured.seconds.get)
    assert _max_rel(compiled.meta_models, first.meta_models) < 1e-5


def _matmuls(n: int):
    a = torch.randn(64, 64)
    return lambda: [a @ a for _ in range(n)]


def test_choose_keeps_the_fastest_and_drops_a_compile_that_fails(caplog):
    def broken():
        raise RuntimeError("no C++ compiler\nmore detail")

    # Act: three candidates of very different cost; then a compile that fails
    fastest = plan.choose("w1", {"vmap": _matmuls(200), "loop": _matmuls(2), "compile": _matmuls(50)}, 10**6, "test")
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        fallback = plan.choose("w2", {"vmap": _matmuls(2), "loop": _matmuls(200), "compile": broken}, 10**6, "test")
    # Assert
    assert fastest.impl == "loop" and fastest.seconds["loop"] < fastest.seconds["compile"] < fastest.seconds["vmap"]
    assert fallback.impl == "vmap" and "compile" not in fallback.seconds
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the test step failed (RuntimeError: no C++ compiler); running it uncompiled"]
    assert plan.choose("w1", {}, 1, "test") is fastest  # measured once: kept


def test_compile_is_refused_for_an_estimator_drawn_per_client():
    with pytest.raises(ValueError, match="vectorize.*'compile' supports meta-gradient"):
        ExperimentConfig(algorithm="per-fedavg", vectorize="compile", meta_gradient="ggs")
