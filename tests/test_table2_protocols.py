"""localmoml Table 2 under two protocols (fedmeta.simulations.reproduce_table2): each protocol resolves to the settings
it claims, and each setting of the authors' code computes what their code computes (checked against independent
PyTorch computations and against the numbers their code printed here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta import meta
from fedmeta.centralized import CentralizedConfig, train
from fedmeta.centralized_iteration import draw_batches
from fedmeta.tasks import TASKS, FewShotSet, few_shot_errors, grid_tasks
from fedmeta.simulations import reproduce_table2 as t2

SINE = TASKS["sine-table2"]


def test_init_seed_draws_torchs_default_initialization_bit_for_bit():
    """The authors' Model(seed=1234): nn.Linear's own initialization under torch.manual_seed(1234), every seed."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    w = SINE.init_params(torch.Generator().manual_seed(1234))
    assert len(w) == 6
    for v, p in zip(w.values(), net.parameters()):
        assert torch.equal(v, p.detach())
    a = train(CentralizedConfig(task="sine-table2", iterations=1, eval_every=1, eval_tasks=2, init_seed=1234, seed=0)).meta_loss[0]
    b = train(CentralizedConfig(task="sine-table2", iterations=1, eval_every=1, eval_tasks=2, init_seed=1234, seed=3, eval_seed=0)).meta_loss[0]
    c = train(CentralizedConfig(task="sine-table2", iterations=1, eval_every=1, eval_tasks=2, seed=3, eval_seed=0)).meta_loss[0]
    assert a == b != c  # the same model whatever the seed (seed 0's evaluation tasks in both)


# The authors' sinewave/train.py test error of the untrained Model(seed=1234) on its 5 test tasks, printed by their code
# (loss_on_random_task, one task at a time) run on this machine from the snapshot of GitHub bokun-wang/moml.
AUTHORS_CODE_UNTRAINED = [4.759237289428711, 3.3150746822357178, 3.612677812576294, 4.757269859313965, 10.100802421569824]


def test_the_authors_test_set_and_score_equal_an_nn_module_and_sgd_recomputation():
    held_out = FewShotSet.authors()
    w = SINE.init_params(torch.Generator().manual_seed(1234))
    ours = few_shot_errors(SINE.loss, w, held_out)
    x = torch.tensor(np.random.RandomState(2021).uniform(-5, 5, 100), dtype=torch.float32)[:, None]
    for i in range(5):
        rng = np.random.RandomState(i)
        amplitude, phase = rng.uniform(1, 5), rng.uniform(np.pi / 5, np.pi)
        y = torch.tensor(amplitude * np.sin(phase + x.double().numpy()), dtype=torch.float32)
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(10):  # on the first 10 points, then scored on all 100
            opt.zero_grad()
            nn.functional.mse_loss(net(x[:10]), y[:10]).backward()
            opt.step()
        theirs = nn.functional.mse_loss(net(x), y).item()
        assert ours[i].item() == pytest.approx(theirs, rel=1e-5)
    np.testing.assert_allclose(ours.numpy(), AUTHORS_CODE_UNTRAINED, rtol=1e-6)


@pytest.mark.parametrize("meta_gradient", ["exact", "first_order"])
def test_through_memory_is_the_gradient_of_the_loss_through_the_memory_update(meta_gradient):
    """beta (I - alpha H) grad L(u) is d/dw L((1 - beta) u + beta (w - alpha grad L(w; S1)); S3) with u fixed; first-order
    is what the authors' code differentiates: the inner gradient taken without create_graph (a constant)."""
    gen = torch.Generator().manual_seed(4)
    f, w = SINE.loss, SINE.init_params(gen)
    b = draw_batches(SINE, grid_tasks()[:1], 1, 5, 5, gen).task(0)
    b = meta.MetaBatches(inner=b.inner, outer=b.outer, hessian=b.inner)  # the Hessian on S1, as autodiff takes it
    u = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in w.items()}
    beta, alpha = 0.3, 0.01
    d, u_new = meta.moml_direction(f, w, u, b, alpha, beta, meta.meta_gradient(meta_gradient))

    leaves = {k: v.clone().requires_grad_() for k, v in w.items()}
    inner = torch.autograd.grad(f(leaves, *b.inner[0]), list(leaves.values()), create_graph=meta_gradient == "exact")
    v = {k: p - alpha * g for (k, p), g in zip(leaves.items(), inner)}
    mixed = {k: (1 - beta) * u[k] + beta * v[k] for k in w}
    autodiff = torch.autograd.grad(f(mixed, *b.outer), list(leaves.values()))
    for (k, dk), a in zip(d.items(), autodiff):
        torch.testing.assert_close(beta * dk, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(u_new[k], mixed[k].detach(), rtol=1e-6, atol=1e-7)


def _sine_cfg(**kw) -> CentralizedConfig:
    return CentralizedConfig(**{**t2.COMMON, "batch_size": 2, "test_batch_size": 2, "init_batch_size": 4, "meta_lr": 0.004,
                                "iterations": 8, "eval_every": 8, "eval_tasks": 2, "eval_protocol": "few-shot", "momentum": 0.4, **kw})


def test_local_moml_through_memory_steps_eta_times_beta():
    kw = dict(algorithm="local-moml", meta_gradient="first_order", iterations=4, eval_every=4, local_steps=2)
    a = train(_sine_cfg(**kw, memory_gradient="through-memory"))
    b = train(_sine_cfg(**kw, meta_lr=0.004 * 0.4))
    c = train(_sine_cfg(**kw))
    for k, v in a.params.items():
        torch.testing.assert_close(v, b.params[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(v, c.params[k]) for k, v in a.params.items())


def test_initial_model_memories_start_one_inner_step_from_w0_and_are_all_visited():
    cfg = CentralizedConfig(task="quadratic", algorithm="moml", num_tasks=5, tasks_per_iteration=2, momentum=0.5, inner_lr=0.2, meta_lr=0.1,
                            iterations=1, eval_every=1, eval_tasks=2, inner_steps=1, memory_init="initial-model", seed=2)
    res = train(cfg)
    assert bool(res.memory.visited.all())
    from fedmeta.centralized_iteration import Streams

    streams = Streams.from_seed(2)
    w0 = TASKS["quadratic"].init_params(streams.init)["w"]
    centers = TASKS["quadratic"].sample_tasks(5, streams.tasks)
    for i in set(range(5)) - set(res.task_ids[0]):
        torch.testing.assert_close(res.memory.rows["w"][i], w0 - 0.2 * (w0 - centers[i]))


def test_with_replacement_draws_repeat_and_distinct_draws_never_do():
    rep = train(_sine_cfg(algorithm="moml", task_sampling="with-replacement", iterations=60, eval_every=60))
    assert any(len(set(ids)) < 3 for ids in rep.task_ids) and all(len(ids) == 3 for ids in rep.task_ids)
    dis = train(_sine_cfg(algorithm="moml", iterations=60, eval_every=60))
    assert all(len(set(ids)) == 3 for ids in dis.task_ids)


@pytest.mark.parametrize("bad, message", [
    (dict(task_sampling="bootstrap"), "task_sampling must be one of ['distinct', 'with-replacement']"),
    (dict(memory_init="zeros"), "memory_init must be one of ['first-visit', 'initial-model']"),
    (dict(memory_gradient="chain"), "memory_gradient must be one of ['direction', 'through-memory']"),
    (dict(init_seed=-2), "init_seed must be an integer >= -1"),
    (dict(eval_protocol="few-shot-fixed"), "'few-shot-fixed' only for a sine task"),
])
def test_bad_protocol_settings_name_the_field(bad, message):
    with pytest.raises(ValueError) as err:
        CentralizedConfig(**bad)
    assert message in str(err.value)


# --- the protocols -------------------------------------------------------------------------------------------------


def test_each_protocol_resolves_to_the_settings_it_claims():
    full = t2.BUDGETS["full"]
    authors, paper = t2.PROTOCOLS["authors"], t2.PROTOCOLS["paper"]
    a = t2.config(authors, 1, t2.MOML, full, authors.meta_lr[(1, t2.MOML)])
    assert (a.meta_gradient, a.memory_gradient, a.memory_init, a.init_seed, a.task_sampling, a.eval_protocol, a.eval_tasks) == (
        "first_order", "through-memory", "initial-model", 1234, "with-replacement", "few-shot-fixed", 5)
    assert (a.iterations, a.meta_lr, a.momentum, a.batch_size, a.test_batch_size, a.tasks_per_iteration, a.num_tasks, a.inner_lr) == (
        40_000, 0.005, 0.3, 1, 1, 3, 25, 0.01)
    p = t2.config(paper, 5, t2.MOML, full, 0.001)
    assert (p.meta_gradient, p.memory_gradient, p.memory_init, p.init_seed, p.task_sampling, p.eval_protocol, p.eval_tasks) == (
        "exact", "direction", "first-visit", -1, "distinct", "few-shot", 500)
    assert (p.momentum, p.batch_size, p.init_batch_size, p.decay_at) == (0.7, 5, 10, 0.75)
    for k in (1, 3, 5):  # LocalMOML: the same sampled points as 40,000 MAML iterations (the authors' train.py)
        local = t2.config(authors, k, t2.LOCAL, full, 0.01)
        assert (local.iterations, local.local_steps, local.init_batch_size) == (5714, 5, 2 * k)
        assert t2.config(authors, k, t2.MAML, full, 0.01).momentum == 1.0
    assert t2.config(authors, 3, t2.LOCAL, full, authors.meta_lr[(3, t2.LOCAL)]).meta_lr == 0.01
    assert (3, t2.MAML) in paper.meta_lr and (5, t2.MAML) not in paper.meta_lr  # eta at K = 5 is tuned
    # nothing looks at a protocol's name: the same settings under another name give the same runs
    renamed = dataclasses.replace(authors, name="anything")
    assert t2.config(renamed, 1, t2.LOCAL, full, 0.005) == t2.config(authors, 1, t2.LOCAL, full, 0.005)


def test_verdicts_are_judged_by_the_seed_bands():
    assert t2.verdict([0.3, 0.31], [0.8, 0.9]) == "holds"
    assert t2.verdict([0.8, 0.9], [0.3, 0.31]) == "reversed"
    assert t2.verdict([0.5, 0.9], [0.6, 0.8]) == "not separable"
    nan = float("nan")
    assert t2.verdict([0.3, 0.4], [0.8, nan]) == "holds (diverged: 0 of 2 and 1 of 2 seeds)"  # a diverged run: infinite error
    assert t2.verdict([nan, 0.4], [0.8, 0.9]) == "reversed (diverged: 1 of 2 and 0 of 2 seeds)"
    assert t2.verdict([nan, 0.4], [nan, nan]) == "holds (diverged: 1 of 2 and 2 of 2 seeds)"
    assert t2.verdict([nan], [nan]).startswith("not separable")


def test_table2_tunes_only_what_a_protocol_does_not_give_and_runs_every_seed():
    seen: list[CentralizedConfig] = []

    def run_all(cfgs):
        seen.extend(cfgs)
        return [train(c) for c in cfgs]

    budget = t2.Table2Budget(iterations=6, eval_every=3, seeds=(0, 1), ks=(1, 5), grid=(0.001, 0.002), validation_tasks=3)
    protocols = [t2.PROTOCOLS["paper"].__class__(**{**dataclasses.asdict(t2.PROTOCOLS["paper"]), "test_tasks": 7}),
                 t2.PROTOCOLS["authors"]]
    code = {(1, t2.MAML): {"test_error": 0.918, "ms_per_iteration": 1.30}}
    text, curves = t2.table2(protocols, budget, run_all, code)
    tuning = [c for c in seen if c.eval_seed == t2.VALIDATION_SEED]
    assert len(tuning) == 2 * 3 * 2 and {c.batch_size for c in tuning} == {5}  # K = 5 only: K = 1's eta is the README's
    assert all(c.seed == 0 and c.eval_tasks == 3 and c.eval_protocol == "few-shot" for c in tuning)
    testing = [c for c in seen if c.eval_seed == -1]
    assert len(testing) == 2 * 2 * 3 * 2  # protocols x K x algorithms x seeds
    assert {c.eval_tasks for c in testing if c.meta_gradient == "exact"} == {7}
    assert {c.eval_tasks for c in testing if c.meta_gradient == "first_order"} == {5}
    assert "0.310 ± 0.025 (2.73 ms)" in text and "0.836 ± 0.072 (2.59 ms)" in text and "0.918 (1.30 ms)" in text
    assert text.count("| 1 | ") == 3 and text.count("| 5 | ") == 3 and "paper, K = 5, MOML: eta" in text
    assert len(curves) == 12 and all(len(rs) == 2 for rs in curves.values())


def test_each_ablation_step_changes_only_its_settings():
    seen: list[CentralizedConfig] = []

    def run_all(cfgs):  # the table is made of whatever the runs give: one short run stands for all
        seen.extend(cfgs)
        one = train(cfgs[0].replace(iterations=1, eval_every=1))
        return [dataclasses.replace(one, config=c) for c in cfgs]

    budget = t2.Table2Budget(iterations=60, eval_every=30, seeds=(0,))
    text, _ = t2.ablation(budget, run_all)
    base = {c.algorithm: c for c in seen[:3]}
    for i, (step, change) in enumerate(t2.ABLATION_STEPS):
        for c in seen[3 * i: 3 * i + 3]:
            diff = {f.name for f in dataclasses.fields(c) if getattr(c, f.name) != getattr(base[c.algorithm], f.name)}
            label = {alg: lb for lb, alg in t2.ALGORITHMS.items()}[c.algorithm]
            expected = set(change) - t2.IGNORED_BY[label]
            if "iterations" in change:
                expected |= {"eval_every"}
            assert diff == expected, (step, c.algorithm, diff)
        assert f"| {step} |" in text
    assert "(as above)" in text.split("| step along eq. (3)")[1].split("\n")[0]  # MAML does not read memory_gradient


def test_the_commands_write_the_table_and_the_ablation_sharing_one_cache(tmp_path, monkeypatch, capsys):
    from fedmeta.simulations import reproduce

    tiny = t2.Table2Budget(iterations=20, eval_every=20, seeds=(0,), ks=(1,), grid=(0.005,), validation_tasks=3)
    monkeypatch.setitem(t2.BUDGETS, "quick", tiny)
    (tmp_path / "localmoml-table2").mkdir()
    code = {"runs": [{"K": 1, "algorithm": t2.MOML, "test_error": 0.291, "ms_per_iteration": 2.0}]}
    (tmp_path / "localmoml-table2" / t2.AUTHORS_CODE).write_text(__import__("json").dumps(code))
    args = ["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")]
    assert reproduce.main(["localmoml-table2", "--protocol", "authors", *args]) == 0
    text = (tmp_path / "localmoml-table2-authors-quick" / "summary.md").read_text()
    assert "fedmeta-reproduce localmoml-table2 --protocol authors --quick" in text and "0.291 (2.00 ms)" in text
    assert "| authors: eta, beta |" in text and "paper: eta" not in text and "Verdicts" in text
    capsys.readouterr()
    assert reproduce.main(["localmoml-table2-ablation", *args]) == 0
    out = capsys.readouterr().out
    # the first row is the table's 3 runs; 4 more leave a setting their algorithm does not read unchanged: the first row's
    assert out.count("(reused,") == 3 + 4 and "| authors' protocol |" in out
    with pytest.raises(SystemExit):
        reproduce.main(["ggs-fig1", "--protocol", "paper"])
    assert "--protocol is for localmoml-table2 and localmoml-table3 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["localmoml-table3", "--protocol", "both"])
    assert "--protocol for localmoml-table3 is paper or authors" in capsys.readouterr().err
