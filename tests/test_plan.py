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
def test_auto_times_nothing_in_short_rounds_and_keeps_a_compiled_step_only_if_faster(problem, monkeypatch, caplog):
    hp = FedAvgConfig(local_steps=2, batch_size=5, lr=0.1)
    caplog.set_level(logging.INFO, logger="fedmeta")
    # Act: a short round (below the threshold) under auto, twice, and the same round vmapped
    first = _round(problem, "fedavg", hp, "auto")
    second = _round(problem, "fedavg", hp, "auto")
    vmapped = _round(problem, "fedavg", hp, "vmap")
    # Assert: vmap, nothing compiled, the numbers of vmap bit for bit; the vmapped step timed once, never compiled
    (only,) = plan._PLANS.values()
    assert only.impl == "vmap" and set(only.seconds) == {"vmap"} and not plan._COMPILED
    for k in first.meta_models:
        assert torch.equal(first.meta_models[k], second.meta_models[k]) and torch.equal(first.meta_models[k], vmapped.meta_models[k])
    assert [r.message for r in caplog.records if "running the clients' steps as" in r.message] == [
        f"fedavg: running the clients' steps as vmap (one step of the chunk: vmap {only.seconds['vmap'] * 1e3:.2f} ms; "
        f"not compiled: a round's vmapped steps take {only.seconds['vmap'] * 2:.2f} s < {plan.COMPILE_MIN_ROUND_SECONDS} s)"]
    # Act: every round long enough to compile; then a compiled step required to be 1e6 times faster
    plan.clear()
    monkeypatch.setattr(plan, "COMPILE_MIN_ROUND_SECONDS", 0.0)
    compiled = _round(problem, "fedavg", hp, "auto")
    (measured,) = plan._PLANS.values()
    plan.clear()
    monkeypatch.setattr(plan, "COMPILE_MIN_SPEEDUP", 1e6)
    _round(problem, "fedavg", hp, "auto")
    (refused,) = plan._PLANS.values()
    # Assert: compilation timed apart from its steps, kept where it is faster enough, else vmap
    assert set(measured.seconds) == {"vmap", "compile"} and measured.compile_seconds > measured.seconds["compile"]
    assert measured.impl == ("compile" if measured.seconds["compile"] * 1.5 <= measured.seconds["vmap"] else "vmap")
    assert _max_rel(compiled.meta_models, first.meta_models) < 1e-5
    assert refused.impl == "vmap" and set(refused.seconds) == {"vmap", "compile"}


def _matmuls(n: int):
    a = torch.randn(64, 64)
    return lambda: [a @ a for _ in range(n)]


def test_choose_keeps_a_much_faster_compiled_step_and_drops_one_that_fails(caplog):
    def broken():
        raise RuntimeError("backend='inductor' raised:\nno C++ compiler\nmore detail")

    # Act: a compiled step 20 times cheaper, one barely cheaper, and one that fails to compile
    fast = plan.choose("w1", _matmuls(200), _matmuls(10), 10**6, "test")
    close = plan.choose("w2", _matmuls(200), _matmuls(190), 10**6, "test")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmeta"):
        failed = plan.choose("w3", _matmuls(2), broken, 10**6, "test")
    # Assert
    assert fast.impl == "compile" and fast.seconds["compile"] < fast.seconds["vmap"]
    assert close.impl == "vmap" and set(close.seconds) == {"vmap", "compile"}
    assert failed.impl == "vmap" and "compile" not in failed.seconds
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "torch.compile of the test step failed (RuntimeError: no C++ compiler); running it uncompiled"]
    assert plan.choose("w1", None, None, 1, "test") is fast  # chosen once: kept


def test_compile_is_refused_for_an_estimator_drawn_per_client():
    with pytest.raises(ValueError, match="vectorize.*'compile' supports meta-gradient"):
        ExperimentConfig(algorithm="per-fedavg", vectorize="compile", meta_gradient="ggs")


@pytest.mark.subprocess  # compiles the step
def test_auto_stops_compiling_new_step_sizes_of_a_workload_after_a_few(problem, monkeypatch):
    """The step sizes are constants of the compiled graph: a schedule changing them every round must not recompile
    every round."""
    monkeypatch.setattr(plan, "COMPILE_MIN_ROUND_SECONDS", 0.0)
    monkeypatch.setattr(plan, "MAX_COMPILED_VARIANTS", 2)
    # Act: four rounds of one workload, each with another lr
    for lr in (0.1, 0.05, 0.025, 0.0125):
        _round(problem, "fedavg", FedAvgConfig(local_steps=2, batch_size=5, lr=lr), "auto")
    # Assert: two variants were offered compilation, the later two ran vmapped without timing it
    offered = [("compile" in p.seconds) for p in plan._PLANS.values()]
    assert offered == [True, True, False, False] and len(plan._COMPILED) == 2


def test_a_clientapp_rebuilding_its_group_every_round_is_measured_once(problem):
    """A ClientApp builds its model and loss for every message: the plan is keyed by what the loss computes."""
    from fedmeta.clients.client import ClientGroup

    _, _, datas = problem
    hp = FedAvgConfig(local_steps=2, batch_size=5, lr=0.1)

    def group():
        torch.manual_seed(0)
        return ClientGroup(mlp((16, 8, 3), nn.Tanh), nn.functional.cross_entropy, lambda c: datas[c], torch.device("cpu"))

    # Act: three rounds, each on a group of its own
    groups = [group() for _ in range(3)]
    for r, g in enumerate(groups, 1):
        g.train(meta.params_of(g.model), hp, [0, 1, 2], seed=0, server_round=r)
    # Assert: one workload, measured once
    assert len({g.workload for g in groups}) == 1 and len(plan._PLANS) == 1
