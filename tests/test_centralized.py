"""The centralized runner against independent computations: autograd through the unrolled loop, FO-MuML's loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad

from fakes import check_provenance
from fedmeta import centralized as c
from fedmeta import centralized_iteration as ci
from fedmeta import tasks as T
from fedmeta import meta

MF = c.CentralizedConfig(task="matrix-factorization", iterations=1, eval_every=1, eval_tasks=8, tasks_per_iteration=4)
SINE = c.CentralizedConfig(task="sine", inner_lr=0.01, meta_lr=1e-3, outer_optimizer="adam", tasks_per_iteration=3, batch_size=5,
                           test_batch_size=5, iterations=1, eval_every=1, eval_tasks=8)


def first_batches(cfg: c.CentralizedConfig) -> tuple[meta.Params, ci.TaskBatches]:
    """The initial model and the first iteration's batches of ``cfg``'s run, drawn again from its seed."""
    streams = ci.Streams.from_seed(cfg.seed)
    w0 = cfg.family.init_params(streams.init)
    return w0, ci.draw_task_batches(cfg.family, cfg.tasks_per_iteration, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size, streams.tasks)


def test_meta_loss_decreases_on_matrix_factorization_with_exact_maml():
    res = c.train(MF.replace(meta_gradient="exact", iterations=60, eval_every=20, eval_tasks=100, meta_lr=0.01))
    assert res.iterations == (0, 20, 40, 60)
    assert res.diverged_at is None
    assert res.meta_loss[-1] < 0.6 * res.meta_loss[0]
    assert all(b < a for a, b in zip(res.meta_loss, res.meta_loss[1:]))


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_one_exact_iteration_equals_autograd_through_the_unrolled_loop(inner_steps):
    # Matrix factorization: every batch of a task is g_i, so the Hessian batches equal the inner ones and
    # eq. (8) with exact HVPs is the gradient of the unrolled loss, eq. (3).
    cfg = MF.replace(meta_gradient="exact", inner_steps=inner_steps, meta_lr=0.05)
    w0, batches = first_batches(cfg)
    f = cfg.family.loss

    w = w0["w"].clone().requires_grad_(True)
    losses = []
    for i in range(cfg.tasks_per_iteration):
        mb = batches.task(i)
        v = w
        for x, y in mb.inner:
            (g,) = torch.autograd.grad(f({"w": v}, x, y), v, create_graph=True)
            v = v - cfg.inner_lr * g
        losses.append(f({"w": v}, *mb.outer))
    (meta_grad,) = torch.autograd.grad(torch.stack(losses).mean(), w)
    expected = w0["w"] - cfg.meta_lr * meta_grad

    res = c.train(cfg)
    torch.testing.assert_close(res.params["w"], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(res.params["w"], w0["w"] - cfg.meta_lr * torch.stack(
        [grad(f)({"w": w0["w"]}, *batches.task(i).outer)["w"] for i in range(cfg.tasks_per_iteration)]).mean(0), atol=1e-6)


@pytest.mark.parametrize("estimator", ["exact", "first_order", "hessian_free", "fo_muml"])
def test_vmapped_task_gradients_equal_a_loop_over_tasks(estimator):
    # Sine regression, where the inner, outer and Hessian batches all differ.
    # In float64: the finite difference of hessian_free would amplify float32 rounding differences between the
    # batched and the unbatched matmuls.
    cfg = SINE.replace(meta_gradient=estimator, inner_steps=2)
    w0, batches = first_batches(cfg)
    w0 = {k: v.double() for k, v in w0.items()}
    batches = ci.TaskBatches(*(tuple(t.double() for t in part) for part in (batches.inner, batches.outer, batches.hessian)))
    est = meta.meta_gradient(estimator, delta=1e-3)
    got, outer = ci.task_meta_gradients(cfg.family.loss, w0, batches, cfg.inner_lr, est)
    for i in range(cfg.tasks_per_iteration):
        g, w_n = meta.maml_gradient(cfg.family.loss, w0, batches.task(i), cfg.inner_lr, est)
        for k in w0:
            torch.testing.assert_close(got[k][i], g[k], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(outer[i], cfg.family.loss(w_n, *batches.task(i).outer))


def test_fo_muml_is_selectable_and_runs_algorithm_3():
    cfg = SINE.replace(meta_gradient="fo_muml", inner_steps=3, outer_optimizer="sgd", meta_lr=0.01)
    w0, batches = first_batches(cfg)
    f = cfg.family.loss

    def outer_gradient(i: int) -> meta.Params:
        mb = batches.task(i)
        z = w0
        for batch in mb.inner:  # fo-muml Algorithm 3 line 7: every step restarts from the meta-model x
            z = {k: w0[k] - cfg.inner_lr * g for k, g in grad(f)(z, *batch).items()}
        return grad(f)(z, *mb.outer)  # line 11

    gs = [outer_gradient(i) for i in range(cfg.tasks_per_iteration)]
    expected = {k: w0[k] - cfg.meta_lr * torch.stack([g[k] for g in gs]).mean(0) for k in w0}

    res = c.train(cfg)
    for k in w0:
        torch.testing.assert_close(res.params[k], expected[k], rtol=1e-4, atol=1e-6)
    fo = c.train(cfg.replace(meta_gradient="first_order"))  # the plain (unanchored) loop gives another update
    assert not all(torch.allclose(res.params[k], fo.params[k], atol=1e-7) for k in w0)
    assert "fo_muml" in c.CentralizedConfig.__doc__ + c.__doc__ and "FO-MuML" in c._parser().format_help()


@pytest.mark.parametrize("estimator", meta.META_GRADIENTS)
def test_every_estimator_runs_and_one_seed_fixes_model_tasks_and_directions(estimator):
    cfg = MF.replace(meta_gradient=estimator, iterations=3, eval_every=1)
    a, b = c.train(cfg), c.train(cfg)
    assert a.meta_loss == b.meta_loss and a.train_loss == b.train_loss  # reproducible
    assert a.meta_loss[0] == c.train(cfg.replace(meta_gradient="exact", iterations=1)).meta_loss[0]  # same start, same held-out tasks
    assert a.meta_loss[0] != c.train(cfg.replace(seed=1)).meta_loss[0]
    assert a.cost == meta.meta_gradient(estimator).cost(cfg.inner_steps) * (cfg.tasks_per_iteration * 3)


def test_stochastic_estimators_draw_their_own_directions_per_task():
    cfg = SINE.replace(meta_gradient="ggs", tasks_per_iteration=2)
    w0, batches = first_batches(cfg)
    same = ci.TaskBatches(*(tuple(t[:1].expand(2, *t.shape[1:]) for t in part) for part in (batches.inner, batches.outer, batches.hessian)))
    est = meta.meta_gradient("ggs", delta=1e-2, num_directions=2)
    g, _ = ci.task_meta_gradients(cfg.family.loss, w0, same, 1.0, est, torch.Generator().manual_seed(0))
    assert all(not torch.allclose(t[0], t[1]) for t in g.values())  # the same task twice, two different direction sets


def test_a_run_that_blows_up_stops_and_reports_where():
    res = c.train(MF.replace(meta_lr=1e4, iterations=50, eval_every=10))
    assert res.diverged_at is not None and res.diverged_at <= 50
    assert math.isnan(res.final_meta_loss)
    assert len(res.train_loss) == res.diverged_at


def test_run_result_round_trips_through_json():
    res = c.train(MF.replace(iterations=2))
    back = c.RunResult.from_dict(res.to_dict())
    assert back == res and back.config == res.config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"inner_steps": 0}, "inner_steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": -1e-3}, "delta"),
        ({"num_directions": 0}, "num_directions"),
        ({"meta_gradient": "second_order"}, "meta_gradient"),
        ({"inner_lr": -0.01}, "inner_lr"),  # alpha = 0 is allowed (as in the federated configs)
        ({"meta_lr": float("nan")}, "meta_lr"),
        ({"outer_optimizer": "rmsprop"}, "outer_optimizer"),
        ({"tasks_per_iteration": 0}, "tasks_per_iteration"),
        ({"batch_size": 0}, "batch_size"),
        ({"iterations": 0}, "iterations"),
        ({"eval_every": 0}, "eval_every"),
        ({"task": "omniglot"}, "task"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_rejected_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        c.CentralizedConfig(**changes)


def test_command_line(capsys, tmp_path):
    out = tmp_path / "run.json"
    assert c.main(["--meta-gradient", "fo_muml", "--iterations", "2", "--eval-tasks", "4", "--json", str(out)]) == 0
    assert "matrix-factorization, fo_muml: final meta-loss" in capsys.readouterr().out
    record = __import__("json").loads(out.read_text())
    assert c.RunResult.from_dict(record).config.meta_gradient == "fo_muml"
    check_provenance(record["provenance"], record["config"])
    assert c.main(["--inner-steps", "0"]) == 2
    assert "inner_steps" in capsys.readouterr().err
    assert c.main(["--iterations", "0.5"]) == 2


def test_matrix_factorization_loss_is_the_papers_frobenius_norm():
    family = T.MatrixFactorization(dim=5)
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    x, y = family.sample(g[None], 3, gen)
    # ||w w' - g g'||_F^2 = ||w||^4 - 2 (w'g)^2 + ||g||^4
    expected = 0.25 * (w.dot(w) ** 2 - 2 * w.dot(g) ** 2 + g.dot(g) ** 2)
    torch.testing.assert_close(family.loss({"w": w}, x[0], y[0]), expected)


def test_sine_tasks_and_network():
    family = T.SineRegression()
    gen = torch.Generator().manual_seed(0)
    tasks = family.sample_tasks(1000, gen)
    assert tasks[:, 0].min() >= 0.1 and tasks[:, 0].max() <= 5.0 and tasks[:, 1].min() >= 0 and tasks[:, 1].max() <= math.pi
    x, y = family.sample(tasks[:2], 7, gen)
    assert x.shape == y.shape == (2, 7, 1) and x.abs().max() <= 5
    torch.testing.assert_close(y, tasks[:2, None, :1] * torch.sin(x + tasks[:2, None, 1:]))
    params = family.init_params(gen)
    assert sum(p.numel() for p in params.values()) == 1 * 40 + 40 + 40 * 40 + 40 + 40 + 1  # models.sine_mlp
    assert all(float(p.abs().max()) == 0 for k, p in params.items() if k.endswith("bias"))
    assert abs(float(params["3.weight"].std()) - math.sqrt(2 / 40)) < 0.02  # Kaiming normal, fan_in 40
    assert family.loss(params, x[0], y[0]).shape == ()
