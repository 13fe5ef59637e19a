"""The meta-gradient estimators against what they must equal (issue 4).

* ``exact``: closed form on quadratics; a plain-autograd unrolled computation on an MLP.
* ``hessian_free``: converges to ``exact`` at the central-difference rate on a smooth network.
* ``ggs``: unbiased on quadratics (and equal to ``(1/U) sum A u u'v`` for its own directions).
* ``zeroth_order``: biased by ``Tr(A)/2 * v`` on quadratics (multistep-maml-ggs Proposition 5).
* ``fo_muml``: fo-muml Lemma 2, ``||grad f(z_s) - grad F(x)|| <= (alpha L)^(s+1) ||grad F(x)||``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmeta import meta
from fedmeta.meta import MetaBatches
from fedmeta.algorithms import PerFedAvgConfig
from fedmeta.algorithms.executor import local_round

D = 5
F64 = torch.float64


def quad_loss(params, a, b):
    """f(w; (A, b)) = 1/2 w'Aw - b'w: the 'batch' is the pair (A, b)."""
    w = params["w"]
    return 0.5 * w @ a @ w - b @ w


def random_quadratic(gen: torch.Generator, d: int = D, scale: float = 1.0):
    m = torch.randn(d, d, generator=gen, dtype=F64)
    a = scale * (m @ m.T / d + 0.1 * torch.eye(d, dtype=F64))
    return a, torch.randn(d, generator=gen, dtype=F64)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def correction_hv(estimator: meta.HessianCorrection, f, w, v, batch, gen) -> dict:
    """The estimator's ``H v``, read off ``(I - alpha H) v`` with alpha = 1."""
    out = estimator(f, w, v, batch, 1.0, gen)
    return {k: v[k] - out[k] for k in v}


# ----------------------------------------------------------------------------------------------
# exact


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_exact_n_step_meta_gradient_is_the_closed_form_on_quadratics(gen, n):
    alpha = 0.15
    w = torch.randn(D, generator=gen, dtype=F64)
    inner = tuple(random_quadratic(gen) for _ in range(n))
    hess = tuple(random_quadratic(gen) for _ in range(n))
    outer = random_quadratic(gen)
    batches = MetaBatches(inner=inner, outer=outer, hessian=hess)

    eye = torch.eye(D, dtype=F64)
    ws = [w]
    for a, b in inner:  # eq. (6)
        ws.append(ws[-1] - alpha * (a @ ws[-1] - b))
    expected = outer[0] @ ws[-1] - outer[1]
    for a, _ in reversed(hess):  # prod_{j=0}^{N-1} (I - alpha A_{D_j}) applied right to left, eq. (8)
        expected = (eye - alpha * a) @ expected

    got, w_n = meta.maml_gradient(quad_loss, {"w": w}, batches, alpha, meta.meta_gradient("exact"))
    torch.testing.assert_close(w_n["w"], ws[-1], rtol=0, atol=1e-12)
    assert float((got["w"] - expected).abs().max()) < 1e-8
    fo, _ = meta.maml_gradient(quad_loss, {"w": w}, batches, alpha, meta.meta_gradient("first_order"))
    torch.testing.assert_close(fo["w"], outer[0] @ ws[-1] - outer[1], rtol=0, atol=1e-12)


def _mlp_params(gen, act_in=3, hidden=7):
    shapes = {"l1.weight": (hidden, act_in), "l1.bias": (hidden,), "l2.weight": (hidden, hidden), "l2.bias": (hidden,),
              "l3.weight": (1, hidden), "l3.bias": (1,)}
    return {k: 0.5 * torch.randn(s, generator=gen, dtype=F64) for k, s in shapes.items()}


def _mlp(p, x, act):
    h = act(F.linear(x, p["l1.weight"], p["l1.bias"]))
    h = act(F.linear(h, p["l2.weight"], p["l2.bias"]))
    return F.linear(h, p["l3.weight"], p["l3.bias"])


def _mlp_loss(act):
    return lambda p, x, y: F.mse_loss(_mlp(p, x, act), y)


def _batch(gen, k=8, d=3):
    x = torch.randn(k, d, generator=gen, dtype=F64)
    return x, torch.sin(x.sum(1, keepdim=True))


def _unrolled_autograd(params, inner, hess, outer, alpha, act):
    """Independent computation with plain ``torch.autograd`` (no torch.func, no fedmeta).

    Value of each inner step uses ``S_j``; its Jacobian uses ``D_j``: the step is written as
    ``w - alpha (g_S.detach() + g_D - g_D.detach())`` so backprop through the unrolled loop
    yields ``prod_j (I - alpha H(w_j; D_j)) grad f(w_N; T)``.
    """
    w0 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    w = w0
    for s, d in zip(inner, hess):
        names = list(w)
        g_s = torch.autograd.grad(F.mse_loss(_mlp(w, s[0], act), s[1]), [w[k] for k in names])
        if s is d:
            step = torch.autograd.grad(F.mse_loss(_mlp(w, s[0], act), s[1]), [w[k] for k in names], create_graph=True)
        else:
            g_d = torch.autograd.grad(F.mse_loss(_mlp(w, d[0], act), d[1]), [w[k] for k in names], create_graph=True)
            step = [gs.detach() + gd - gd.detach() for gs, gd in zip(g_s, g_d)]
        w = {k: w[k] - alpha * st for k, st in zip(names, step)}
    loss = F.mse_loss(_mlp(w, outer[0], act), outer[1])
    grads = torch.autograd.grad(loss, [w0[k] for k in w0])
    return dict(zip(w0, grads)), {k: v.detach() for k, v in w.items()}


@pytest.mark.parametrize("same_batches", [True, False], ids=["D_j=S_j (plain MAML)", "independent D_j (resampling)"])
@pytest.mark.parametrize("n", [1, 3])
def test_exact_equals_backprop_through_the_unrolled_loop_on_an_mlp(gen, n, same_batches):
    act = torch.relu
    p = _mlp_params(gen)
    inner = tuple(_batch(gen) for _ in range(n))
    hess = inner if same_batches else tuple(_batch(gen) for _ in range(n))
    outer = _batch(gen)
    alpha = 0.3
    expected, w_n = _unrolled_autograd(p, inner, hess, outer, alpha, act)
    got, got_w_n = meta.maml_gradient(_mlp_loss(act), p, MetaBatches(inner=inner, outer=outer, hessian=hess), alpha, meta.meta_gradient("exact"))
    for k in p:
        torch.testing.assert_close(got_w_n[k], w_n[k], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12)
    # ...and it is not first order: the Hessian terms are there
    fo, _ = meta.maml_gradient(_mlp_loss(act), p, MetaBatches(inner=inner, outer=outer, hessian=hess), alpha, meta.meta_gradient("first_order"))
    assert max(float((fo[k] - got[k]).abs().max()) for k in p) > 1e-4


def test_per_fedavg_and_local_moml_steps_use_the_n_step_estimator(gen):
    """Per-FedAvg with N steps is ``w - beta * G``; LocalMOML with momentum 1 equals it (localmoml Section 5.1)."""
    f = _mlp_loss(torch.tanh)
    p = _mlp_params(gen)
    b = MetaBatches(inner=tuple(_batch(gen) for _ in range(3)), outer=_batch(gen), hessian=tuple(_batch(gen) for _ in range(3)))
    est = meta.meta_gradient("exact")
    g, w_n = meta.maml_gradient(f, p, b, 0.2, est)
    stepped = meta.per_fedavg_step(f, p, b, 0.2, 0.1, est)
    for k in p:
        torch.testing.assert_close(stepped[k], p[k] - 0.1 * g[k], rtol=0, atol=1e-13)
    u0 = {k: torch.zeros_like(v) for k, v in p.items()}
    w_lm, u = meta.local_moml_step(f, p, u0, b, 0.2, 0.1, 1.0, est)
    # with momentum 1, u = w_N and the outer gradient is taken at u on the outer batch: Per-FedAvg exactly
    for k in p:
        torch.testing.assert_close(u[k], w_n[k], rtol=0, atol=1e-13)
        torch.testing.assert_close(w_lm[k], stepped[k], rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# hessian_free (Per-FedAvg Appendix G, eqs. 118-119)


def test_hessian_free_is_exact_on_quadratics(gen):
    a, b = random_quadratic(gen)
    w, v = {"w": torch.randn(D, generator=gen, dtype=F64)}, {"w": torch.randn(D, generator=gen, dtype=F64)}
    hv = correction_hv(meta.FiniteDifference(delta=0.37), quad_loss, w, v, (a, b), None)
    torch.testing.assert_close(hv["w"], a @ v["w"], rtol=1e-12, atol=1e-12)


def test_hessian_free_converges_to_exact_at_the_central_difference_rate_on_a_smooth_network(gen):
    """tanh MLP, float64, N=3: the error of the whole meta-gradient drops ~100x per 10x smaller delta."""
    f = _mlp_loss(torch.tanh)
    p = _mlp_params(gen)
    b = MetaBatches(inner=tuple(_batch(gen) for _ in range(3)), outer=_batch(gen), hessian=tuple(_batch(gen) for _ in range(3)))
    exact, _ = meta.maml_gradient(f, p, b, 0.3, meta.meta_gradient("exact"))
    errors = []
    for delta in (1e-1, 1e-2, 1e-3, 1e-4):
        fd, _ = meta.maml_gradient(f, p, b, 0.3, meta.meta_gradient("hessian_free", delta=delta))
        errors.append(math.sqrt(sum(float(((fd[k] - exact[k]) ** 2).sum()) for k in p)))
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert errors[0] > 1e-8, errors  # the finite difference is not exact off quadratics...
    assert all(60 < r < 160 for r in ratios), (errors, ratios)  # ...its error is O(delta^2)
    norm = math.sqrt(sum(float((exact[k] ** 2).sum()) for k in p))
    assert errors[-1] < 1e-6 * norm, (errors, norm)


# ----------------------------------------------------------------------------------------------
# ggs and zeroth_order (multistep-maml-ggs eqs. 17-18, Propositions 5-6)


def test_ggs_on_a_quadratic_is_the_average_of_a_u_u_v_over_its_own_directions(gen):
    """On a quadratic, grad f(w + delta u) - grad f(w) = delta A u exactly, so eq. (18) gives (1/U) sum A u u'v for any delta."""
    a, b = random_quadratic(gen)
    w, v = {"w": torch.randn(D, generator=gen, dtype=F64)}, {"w": torch.randn(D, generator=gen, dtype=F64)}
    est = meta.GaussianSmoothing(delta=0.05, num_directions=7)
    hv = correction_hv(est, quad_loss, w, v, (a, b), torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    us = [meta.gaussian_like(w, replay)["w"] for _ in range(7)]
    expected = sum(a @ u * (u @ v["w"]) for u in us) / 7
    torch.testing.assert_close(hv["w"], expected, rtol=1e-9, atol=1e-9)


def _repeated_estimates(estimator, a, w, v, repeats):
    """``repeats`` independent estimates of H v (fixed seeds)."""
    return torch.stack([
        correction_hv(estimator, quad_loss, w, v, (a, torch.zeros(D, dtype=F64)), torch.Generator().manual_seed(100 + r))["w"]
        for r in range(repeats)
    ])


def test_ggs_is_unbiased_on_quadratics(gen):
    """Mean of R estimates with U directions each is within 5 standard errors of A v, componentwise."""
    a, _ = random_quadratic(gen)
    w, v = {"w": torch.randn(D, generator=gen, dtype=F64)}, {"w": torch.randn(D, generator=gen, dtype=F64)}
    est = _repeated_estimates(meta.GaussianSmoothing(delta=1e-3, num_directions=250), a, w, v, repeats=20)
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    exact = a @ v["w"]
    assert bool(((mean - exact).abs() < 5 * se).all()), (mean, exact, se)
    assert float(se.max()) < 0.05 * float(exact.abs().max())  # the test has power: the SE is small


def test_zeroth_order_has_the_constant_trace_bias_of_proposition_5(gen):
    """E[H] = A + Tr(A)/2 I on a quadratic: the mean estimate is A v + Tr(A)/2 v, far from A v."""
    a, _ = random_quadratic(gen)
    w, v = {"w": torch.randn(D, generator=gen, dtype=F64)}, {"w": torch.randn(D, generator=gen, dtype=F64)}
    est = _repeated_estimates(meta.ZerothOrder(delta=1e-3, num_directions=1000), a, w, v, repeats=20)
    mean, se = est.mean(0), est.std(0) / math.sqrt(est.shape[0])
    biased = a @ v["w"] + torch.trace(a) / 2 * v["w"]
    assert bool(((mean - biased).abs() < 5 * se).all()), (mean, biased, se)
    unbiased = a @ v["w"]
    assert float((mean - unbiased).norm()) > 20 * float(se.norm())  # the bias is real, not noise


def test_randomized_estimators_need_a_generator_and_are_reproducible(gen):
    a, b = random_quadratic(gen)
    w, v = {"w": torch.randn(D, generator=gen, dtype=F64)}, {"w": torch.randn(D, generator=gen, dtype=F64)}
    for est in (meta.GaussianSmoothing(), meta.ZerothOrder()):
        with pytest.raises(ValueError, match="Generator"):
            est(quad_loss, w, v, (a, b), 0.1, None)
        one = est(quad_loss, w, v, (a, b), 0.1, torch.Generator().manual_seed(1))
        two = est(quad_loss, w, v, (a, b), 0.1, torch.Generator().manual_seed(1))
        assert torch.equal(one["w"], two["w"])


# ----------------------------------------------------------------------------------------------
# FO-MuML (fo-muml Algorithm 3, Lemma 2)


@pytest.mark.parametrize("alpha_l", [0.3, 0.9])
def test_fo_muml_satisfies_lemma_2_on_quadratics(gen, alpha_l):
    a, b = random_quadratic(gen)
    lip = float(torch.linalg.eigvalsh(a).max())
    alpha = alpha_l / lip
    x = torch.randn(D, generator=gen, dtype=F64)
    eye = torch.eye(D, dtype=F64)
    z_star = torch.linalg.solve(eye + alpha * a, x + alpha * b)  # argmin f(z) + ||z - x||^2 / (2 alpha)
    grad_env = (x - z_star) / alpha  # grad F(x) of the Moreau envelope (fo-muml eq. 7)
    est = meta.meta_gradient("fo_muml")
    errors = []
    for s in range(0, 8):
        g, z_s = meta.maml_gradient(quad_loss, {"w": x}, MetaBatches(inner=((a, b),) * max(s, 1), outer=(a, b), hessian=((a, b),) * max(s, 1)), alpha, est)
        if s == 0:  # z_0 = x: grad f(x)
            g = {"w": a @ x - b}
        err = float((g["w"] - grad_env).norm())
        assert err <= alpha_l ** (s + 1) * float(grad_env.norm()) * (1 + 1e-9), (s, err)
        errors.append(err)
    assert errors[-1] < errors[1] < errors[0]


def test_fo_muml_with_one_step_is_fo_maml_and_differs_from_it_after(gen):
    f = _mlp_loss(torch.tanh)
    p = _mlp_params(gen)
    one = MetaBatches(inner=(_batch(gen),), outer=_batch(gen), hessian=(_batch(gen),))
    g1, _ = meta.maml_gradient(f, p, one, 0.2, meta.meta_gradient("fo_muml"))
    g2, _ = meta.maml_gradient(f, p, one, 0.2, meta.meta_gradient("first_order"))
    assert all(torch.equal(g1[k], g2[k]) for k in p)
    three = MetaBatches(inner=tuple(_batch(gen) for _ in range(3)), outer=_batch(gen), hessian=tuple(_batch(gen) for _ in range(3)))
    traj_mu = meta.meta_gradient("fo_muml").trajectory(f, p, three.inner, 0.2)
    traj_fo = meta.meta_gradient("first_order").trajectory(f, p, three.inner, 0.2)
    # anchored: z_2 = x - alpha grad f(z_1) restarts from x, unlike eq. (6)
    g_z1 = meta.gradient(f, traj_mu[1], three.inner[1])
    for k in p:
        torch.testing.assert_close(traj_mu[2][k], p[k] - 0.2 * g_z1[k], rtol=0, atol=1e-14)
    assert max(float((traj_mu[3][k] - traj_fo[3][k]).abs().max()) for k in p) > 1e-6


# ----------------------------------------------------------------------------------------------
# Rounds: cost accounting and validation


@pytest.mark.parametrize(
    "name, per_step",
    [
        ("exact", meta.Cost(gradients=3 + 1, hvps=3)),
        ("first_order", meta.Cost(gradients=3 + 1)),
        ("hessian_free", meta.Cost(gradients=3 + 1 + 2 * 3)),
        ("ggs", meta.Cost(gradients=3 + 1 + (4 + 1) * 3)),
        ("zeroth_order", meta.Cost(gradients=3 + 1, loss_evals=(2 * 4 + 1) * 3)),
        ("fo_muml", meta.Cost(gradients=3 + 1)),
    ],
)
def test_per_fedavg_round_reports_the_work_of_each_estimator(gen, name, per_step):
    a, b = random_quadratic(gen)
    draws = []

    def sample(k):
        draws.append(k)
        return a, b

    hp = PerFedAvgConfig(local_steps=2, batch_size=3, inner_lr=0.05, meta_lr=0.1, meta_gradient=name, num_directions=4, inner_steps=3)
    r = local_round("per-fedavg", quad_loss, {"w": torch.zeros(D, dtype=F64)}, sample, hp, gen=torch.Generator().manual_seed(0))
    w, stats = r.meta_model, r.stats
    assert draws == [3] * (2 * (2 * 3 + 1))  # 2N + 1 fresh batches per local step
    assert (stats.num_gradients, stats.num_hvps, stats.num_loss_evals) == (
        2 * per_step.gradients, 2 * per_step.hvps, 2 * per_step.loss_evals)
    assert stats.num_samples == 2 * 7 * 3
    assert torch.isfinite(w["w"]).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(name="second_order"), "meta_gradient"),
        (dict(name="ggs", num_directions=0), "num_directions"),
        (dict(name="ggs", delta=0.0), "delta"),
        (dict(name="hessian_free", delta=-1e-3), "delta"),
        (dict(name="zeroth_order", delta=float("nan")), "delta"),
    ],
)
def test_bad_estimator_settings_are_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        meta.meta_gradient(**kwargs)


def test_meta_batches_need_matching_inner_and_hessian_batches(gen):
    a, b = random_quadratic(gen)
    with pytest.raises(ValueError, match="N >= 1"):
        MetaBatches(inner=(), outer=(a, b), hessian=())
    with pytest.raises(ValueError, match="as many Hessian batches"):
        MetaBatches(inner=((a, b),), outer=(a, b), hessian=((a, b), (a, b)))


def test_estimators_carry_their_capabilities():
    """Whether an estimator runs under vmap (draws nothing) and on the plain-autograd fast path is said by the
    estimator; the executor, the fast path and Dif-MAML read it there."""
    from fedmeta import fast
    from fedmeta.algorithms.base import VMAP_ESTIMATORS

    caps = {n: (meta.meta_gradient(n).vmappable, meta.meta_gradient(n).plain_autograd) for n in meta.META_GRADIENTS}
    assert caps == {"exact": (True, True), "first_order": (True, True), "hessian_free": (True, False), "ggs": (False, False),
                    "zeroth_order": (False, False), "fo_muml": (True, True)}
    assert VMAP_ESTIMATORS == ("exact", "first_order", "hessian_free", "fo_muml") and fast.ESTIMATORS == ("exact", "first_order", "fo_muml")

    class Mine:  # a user's correction that declares nothing: looped, on the torch.func path
        name, cost = "mine", meta.Cost()

        def __call__(self, f, w, v, batch, inner_lr, gen=None):
            return v

    est = meta.MetaGradient(name="mine", correction=Mine())
    assert (est.vmappable, est.plain_autograd) == (False, False) and fast.refusal(est) is not None
