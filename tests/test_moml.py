"""Centralized MOML (localmoml Algorithm 1, MOMLv1) and LocalMOML run centrally, in fedmeta.centralized:
reductions to MAML, the quadratic closed form, memories, sampling, step-size decay, vmap vs loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeta import meta
from fedmeta.centralized import CentralizedConfig, RunResult, main, train
from fedmeta.centralized_iteration import Streams, TaskMemory, draw_batches, memory_age_counts, moml_directions
from fedmeta.tasks import TASKS, grid_tasks

SINE = dict(task="sine-table2", num_tasks=25, task_set="grid", tasks_per_iteration=3, batch_size=2, test_batch_size=2,
            inner_lr=0.01, meta_lr=0.005, eval_every=10, eval_tasks=4, eval_protocol="few-shot", decay_at=0.75)


def _params(res) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in res.params.items()}


@pytest.mark.parametrize("meta_gradient", ["exact", "first_order"])
def test_moml_with_momentum_1_is_maml_bit_for_bit(meta_gradient):
    """localmoml lines ~461-462: MOMLv1 with beta = 1 recovers MAML (BSGD): same draws, same model."""
    maml = train(CentralizedConfig(algorithm="maml", iterations=20, meta_gradient=meta_gradient, **SINE))
    moml = train(CentralizedConfig(algorithm="moml", momentum=1.0, iterations=20, meta_gradient=meta_gradient, **SINE))
    assert maml.task_ids == moml.task_ids and len(maml.task_ids) == 20
    for k, v in _params(maml).items():
        np.testing.assert_array_equal(_params(moml)[k], v)
    assert maml.meta_loss == moml.meta_loss and maml.train_loss == moml.train_loss
    # and a beta < 1 run is a different algorithm
    other = train(CentralizedConfig(algorithm="moml", momentum=0.5, iterations=20, meta_gradient=meta_gradient, **SINE))
    assert any(not np.array_equal(_params(other)[k], v) for k, v in _params(maml).items())


def test_a_local_moml_step_with_momentum_1_is_a_maml_step_bit_for_bit():
    """LocalMOML with beta = 1 and H = 1: the local model is MAML's ``w - eta G`` on the same batches
    (whatever the memory held), so with one task per iteration the run is MAML's."""
    family, gen = TASKS["sine-table2"], torch.Generator().manual_seed(3)
    f, w = family.loss, family.init_params(gen)
    tasks = grid_tasks()[:1]
    b = draw_batches(family, tasks, 2, 4, 4, gen)
    mb = b.task(0)
    est = meta.meta_gradient("exact")
    stale = {k: torch.randn_like(v) for k, v in w.items()}
    local, u = meta.local_moml_step(f, w, stale, mb, 0.01, 0.05, 1.0, est)
    g, w_n = meta.maml_gradient(f, w, mb, 0.01, est)
    maml_step = meta.per_fedavg_step(f, w, mb, 0.01, 0.05, est)  # fedmeta's MAML step: w - beta G(w)
    for k in w:
        assert torch.equal(local[k], maml_step[k]) and torch.equal(u[k], w_n[k])


def _closed_form(cfg: CentralizedConfig, res) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The MOML recursion on l_i = 1/2 ||w - c_i||^2 (gradient w - c_i, Hessian I), in float64:
    v_i = w - alpha (w - c_i); u_i <- (1 - beta) u_i + beta v_i (v_i on a first visit);
    w <- w - eta_t (1/B) sum_i (1 - alpha) (u_i - c_i), eta_t = eta / 10 from iteration floor(decay_at K) on.

    The other settings of the localmoml authors' code: ``first_order`` drops the (1 - alpha) factor, ``initial-model``
    starts every u_i at w_0 - alpha (w_0 - c_i), ``through-memory`` multiplies each term by beta; a task drawn twice
    in one iteration (``with-replacement``) is visited in turn, at the same w."""
    streams = Streams.from_seed(cfg.seed)
    init = streams.init if cfg.init_seed < 0 else torch.Generator().manual_seed(cfg.init_seed)
    w = TASKS["quadratic"].init_params(init)["w"].double().numpy()
    centers = TASKS["quadratic"].sample_tasks(cfg.num_tasks, streams.tasks).double().numpy()
    a, u = cfg.inner_lr, {}
    if cfg.memory_init == "initial-model":
        u = {i: w - a * (w - c) for i, c in enumerate(centers)}
    factor = (1 - a) if cfg.meta_gradient == "exact" else 1.0
    scale = cfg.momentum if cfg.memory_gradient == "through-memory" else 1.0
    for t, ids in enumerate(res.task_ids, 1):
        eta = cfg.meta_lr if t < int(cfg.decay_at * cfg.iterations) else cfg.meta_lr / 10
        delta = np.zeros_like(w)
        for i in ids:
            v = w - a * (w - centers[i])
            first = i not in u
            u[i] = v if first else (1 - cfg.momentum) * u[i] + cfg.momentum * v
            delta += (1.0 if first else scale) * factor * (u[i] - centers[i])
        w = w - eta * delta / len(ids)
    return w, u


AUTHORS_CHOICES = dict(meta_gradient="first_order", memory_init="initial-model", memory_gradient="through-memory", init_seed=1234,
                      task_sampling="with-replacement")


@pytest.mark.parametrize("momentum, choices", [
    (0.3, {}), (1.0, {}), (0.3, AUTHORS_CHOICES), (0.6, dict(task_sampling="with-replacement")),
    (0.6, dict(memory_gradient="through-memory")), (0.6, dict(memory_init="initial-model", meta_gradient="first_order")),
])
def test_moml_on_quadratic_tasks_follows_the_closed_form(momentum, choices):
    cfg = CentralizedConfig(task="quadratic", algorithm="moml", num_tasks=6, tasks_per_iteration=3, momentum=momentum, inner_lr=0.2,
                            meta_lr=0.3, iterations=24, decay_at=0.5, inner_steps=1, eval_every=24, eval_tasks=2, **choices)
    res = train(cfg)
    if cfg.task_sampling == "with-replacement":  # some iteration drew a task twice: the closed form visits it twice, in turn
        assert any(len(set(ids)) < len(ids) for ids in res.task_ids)
    w, u = _closed_form(cfg, res)
    np.testing.assert_allclose(res.params["w"].double().numpy(), w, rtol=1e-5, atol=1e-6)
    for i, ui in u.items():
        np.testing.assert_allclose(res.memory.rows["w"][i].double().numpy(), ui, rtol=1e-5, atol=1e-6)
    assert sorted(u) == sorted(int(i) for i in torch.nonzero(res.memory.visited).flatten())
    changed = {k: v for k, v in choices.items() if k not in ("task_sampling", "init_seed")}
    if changed:  # each choice changes the recursion: the closed form without it ends elsewhere
        plain, _ = _closed_form(cfg.replace(**{k: getattr(CentralizedConfig(), k) for k in changed}), res)
        assert np.abs(plain - w).max() > 1e-4
    # the decay matters: without it the model ends elsewhere
    undecayed, _ = _closed_form(cfg.replace(decay_at=1.0), res)
    assert np.abs(undecayed - w).max() > 1e-3


def test_unsampled_memories_are_bit_unchanged_and_sampled_ids_distinct():
    cfg = CentralizedConfig(algorithm="moml", momentum=0.5, iterations=12, **{**SINE, "decay_at": 1.0})  # one schedule for both
    before, after = train(cfg.replace(iterations=11)), train(cfg)
    assert after.task_ids[:11] == before.task_ids
    assert all(len(set(ids)) == len(ids) == 3 and all(0 <= i < 25 for i in ids) for ids in after.task_ids)
    last = set(after.task_ids[-1])
    for k, rows in after.memory.rows.items():
        for i in range(25):
            same = torch.equal(rows[i], before.memory.rows[k][i])
            assert same == (i not in last), (k, i)


def test_memory_ages_count_iterations_since_the_last_visit():
    assert memory_age_counts([(0, 1), (2, 0), (1, 3), (0, 2)], 4) == (1, 3)  # task 0: ages 1 and 2; tasks 1 and 2: 2; task 3: once
    run = train(CentralizedConfig(algorithm="moml", momentum=0.5, iterations=40, **SINE))
    ages = run.memory_ages
    revisits = sum(len(ids) for ids in run.task_ids) - len({i for ids in run.task_ids for i in ids})
    assert sum(ages) == revisits and ages == memory_age_counts(run.task_ids, 25)
    assert RunResult.from_dict(run.to_dict()).memory_ages == ages
    assert train(CentralizedConfig(algorithm="maml", iterations=3, **SINE)).memory_ages == ()


def test_vmapped_task_directions_equal_a_per_task_loop():
    family, gen = TASKS["sine-table2"], torch.Generator().manual_seed(1)
    f, w = family.loss, family.init_params(gen)
    tasks = grid_tasks()[torch.tensor([3, 17, 9])]
    b = draw_batches(family, tasks, 2, 5, 5, gen)
    u = {k: torch.randn(3, *v.shape, generator=gen) for k, v in w.items()}
    beta = torch.tensor([0.5, 1.0, 0.7])
    est = meta.meta_gradient("exact")
    d, u_new, losses = moml_directions(f, w, u, beta, b, 0.01, est)
    for i in range(3):
        di, ui = meta.moml_direction(f, w, {k: v[i] for k, v in u.items()}, b.task(i), 0.01, float(beta[i]), est)
        for k in w:
            torch.testing.assert_close(d[k][i], di[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(u_new[k][i], ui[k], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(losses[i], f(ui, *b.task(i).outer), rtol=1e-5, atol=1e-6)


def test_memories_of_ten_thousand_sine_tasks_are_one_stacked_copy():
    w = TASKS["sine-table2"].init_params(torch.Generator().manual_seed(0))
    mem = TaskMemory.empty(10_000, w)
    d = sum(v.numel() for v in w.values())
    assert mem.nbytes == 10_000 * d * 4 < 2**30  # 70 MB for the 1,761-parameter MLP


def test_local_moml_runs_centrally_and_all_three_improve_on_the_grid():
    results = {}
    for algorithm, beta in (("maml", 1.0), ("moml", 0.5), ("local-moml", 0.5)):
        cfg = CentralizedConfig(algorithm=algorithm, momentum=beta, iterations=150, local_steps=2, **{**SINE, "meta_lr": 0.002, "eval_tasks": 20})
        res = results[algorithm] = train(cfg)
        assert res.diverged_at is None and res.meta_loss[-1] < res.meta_loss[0], (algorithm, res.meta_loss)
    assert results["local-moml"].cost.gradients == 2 * results["maml"].cost.gradients  # H = 2 steps per sampled task


@pytest.mark.parametrize("bad, message", [
    (dict(algorithm="reptile"), "algorithm must be one of"),
    (dict(algorithm="moml", num_tasks=2, tasks_per_iteration=3), "num_tasks must be an integer >= tasks_per_iteration=3"),
    (dict(algorithm="moml", num_tasks=25, momentum=0.0), "momentum (beta) must be a number in (0, 1]"),
    (dict(task="sine", num_tasks=10, task_set="grid"), "task_set must be 'grid' only for a sine task with num_tasks=25"),
    (dict(decay_at=1.5), "decay_at must be a number in (0, 1]"),
    (dict(algorithm="local-moml", num_tasks=25, outer_optimizer="adam"), "local-moml with outer_optimizer='sgd'"),
])
def test_bad_moml_settings_name_the_field(bad, message):
    with pytest.raises(ValueError) as err:
        CentralizedConfig(**bad)
    assert message in str(err.value)


def test_moml_from_the_command_line(capsys):
    assert main(["--task", "sine-table2", "--algorithm", "moml", "--num-tasks", "25", "--task-set", "grid", "--tasks-per-iteration", "3",
                 "--momentum", "0.5", "--iterations", "5", "--eval-every", "5", "--eval-tasks", "3", "--eval-protocol", "few-shot",
                 "--batch-size", "1", "--test-batch-size", "1", "--inner-steps", "1"]) == 0
    assert "moml exact iteration 5: few-shot" in capsys.readouterr().out

