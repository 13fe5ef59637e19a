"""The math against what it must equal: closed forms on quadratics, explicit Hessians, reductions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmeta import meta, personalize
from fedmeta.algorithms import LocalMOMLConfig, PerFedAvgConfig
from fedmeta.algorithms.executor import local_round
from fedmeta.meta import ExactHessian, FirstOrder, MetaBatches

D = 6


def quad_loss(params, a, b):
    """f(w; (A, b)) = 1/2 w'Aw - b'w: the 'batch' is the pair (A, b)."""
    w = params["w"]
    return 0.5 * w @ a @ w - b @ w


def random_quadratic(gen: torch.Generator):
    m = torch.randn(D, D, generator=gen, dtype=torch.float64)
    a = m @ m.T / D + 0.1 * torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    return a, b


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_per_fedavg_step_matches_closed_form(gen):
    alpha, beta = 0.1, 0.05
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    (a1, b1), (a2, b2), (a3, b3) = (random_quadratic(gen) for _ in range(3))
    eye = torch.eye(D, dtype=torch.float64)
    w_tilde = w - alpha * (a1 @ w - b1)
    expected = w - beta * (eye - alpha * a3) @ (a2 @ w_tilde - b2)

    got = meta.per_fedavg_step(quad_loss, {"w": w}, MetaBatches(inner=((a1, b1),), outer=(a2, b2), hessian=((a3, b3),)), alpha, beta,
                               ExactHessian())
    torch.testing.assert_close(got["w"], expected, atol=1e-6, rtol=0)

    expected_fo = w - beta * (a2 @ w_tilde - b2)
    got_fo = meta.per_fedavg_step(quad_loss, {"w": w}, MetaBatches(inner=((a1, b1),), outer=(a2, b2), hessian=((a3, b3),)), alpha, beta,
                                  FirstOrder())
    torch.testing.assert_close(got_fo["w"], expected_fo, atol=1e-6, rtol=0)


def test_local_moml_step_matches_closed_form(gen):
    alpha, eta, mom = 0.1, 0.05, 0.3
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    (a1, b1), (a2, b2), (a3, b3) = (random_quadratic(gen) for _ in range(3))
    eye = torch.eye(D, dtype=torch.float64)
    u_new = (1 - mom) * u + mom * (w - alpha * (a1 @ w - b1))  # eq. (7)
    delta = (eye - alpha * a2) @ (a3 @ u_new - b3)  # eq. (8)
    w_new = w - eta * delta

    got_w, got_u = meta.local_moml_step(
        quad_loss, {"w": w}, {"w": u}, MetaBatches(inner=((a1, b1),), hessian=((a2, b2),), outer=(a3, b3)), alpha, eta, mom, ExactHessian()
    )
    torch.testing.assert_close(got_u["w"], u_new, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_w["w"], w_new, atol=1e-6, rtol=0)


def test_local_moml_reset_memory_is_one_adaptation_step(gen):
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    a0, b0 = random_quadratic(gen)
    u = meta.local_moml_init_memory(quad_loss, {"w": w}, [(a0, b0)], 0.2)
    torch.testing.assert_close(u["w"], w - 0.2 * (a0 @ w - b0), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# A small smooth MLP in float64, with an explicit Hessian computed independently


def _tiny_mlp():
    torch.manual_seed(0)  # only for the module's initial values; the math under test takes params explicitly
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batch(gen, n=7):
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (n,), generator=gen)


def _flat(params):
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vec, like):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape)
        i += v.numel()
    return out


def _explicit_hessian(model, params, batch):
    """Materialised Hessian with torch.autograd.functional.hessian over the flat vector."""
    x, y = batch

    def flat_loss(vec):
        out = functional_call(model, _unflat(vec, params), (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(flat_loss, _flat(params))


def test_hvp_equals_explicit_hessian_times_vector(gen):
    model = _tiny_mlp()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    params = meta.params_of(model)
    v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in params.items()}
    batch = _batch(gen)
    hv = meta.hvp(f, params, v, batch)
    expected = _explicit_hessian(model, params, batch) @ _flat(v)
    torch.testing.assert_close(_flat(hv), expected, atol=1e-10, rtol=1e-8)


def test_exact_minus_first_order_is_exactly_the_alpha_hg_term(gen):
    model = _tiny_mlp()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    w = meta.params_of(model)
    d, d1, d2 = _batch(gen), _batch(gen), _batch(gen)
    batches = MetaBatches(inner=(d,), outer=d1, hessian=(d2,))
    alpha, beta = 0.3, 0.1
    exact = meta.per_fedavg_step(f, w, batches, alpha, beta, ExactHessian())
    fo = meta.per_fedavg_step(f, w, batches, alpha, beta, FirstOrder())

    # g = grad f(w - alpha grad f(w; D); D') computed with plain autograd, H explicit on D''
    w_tilde = {k: w[k] - alpha * g for k, g in meta.gradient(f, w, d).items()}
    wt = {k: v.clone().requires_grad_(True) for k, v in w_tilde.items()}
    g = torch.autograd.grad(f(wt, *d1), list(wt.values()))
    g = torch.cat([t.reshape(-1) for t in g])
    h = _explicit_hessian(model, w, d2)
    # exact = w - beta (g - alpha H g), fo = w - beta g  =>  exact - fo = beta * alpha * H g
    torch.testing.assert_close(_flat(exact) - _flat(fo), beta * alpha * (h @ g), atol=1e-10, rtol=1e-8)
    assert (h @ g).abs().max() > 1e-3  # the term is not trivially zero here


def test_local_moml_with_momentum_one_is_per_fedavg_step_for_step(gen):
    model = _tiny_mlp()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    w_pf = meta.params_of(model)
    w_lm = meta.params_of(model)
    u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in w_lm.items()}  # discarded by beta=1
    for _ in range(5):
        s1, s2, s3 = _batch(gen), _batch(gen), _batch(gen)
        mb = MetaBatches(inner=(s1,), hessian=(s2,), outer=s3)
        w_pf = meta.per_fedavg_step(f, w_pf, mb, 0.2, 0.1, ExactHessian())
        w_lm, u = meta.local_moml_step(f, w_lm, u, mb, 0.2, 0.1, 1.0, ExactHessian())
        torch.testing.assert_close(_flat(w_lm), _flat(w_pf), atol=1e-12, rtol=0)


def _s123(s1, s2, s3) -> MetaBatches:
    """LocalMOML's batches in the order a local round draws them (Algorithm 3: S1, S2, S3)."""
    return MetaBatches(inner=(s1,), hessian=(s2,), outer=s3)


def _sampler(gen):
    return lambda k: _batch(gen, k)


def test_local_moml_round_memory_policies(gen):
    model = _tiny_mlp()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    w = meta.params_of(model)
    hp = LocalMOMLConfig(local_steps=3, batch_size=4, init_batch_size=6, inner_lr=0.1, lr=0.05, momentum=0.4, memory_policy="keep")

    # reset (u=None): the first draw is S0 with K0 samples and u starts from w - alpha grad f(w; S0)
    draws = []
    g1 = torch.Generator().manual_seed(1)

    def recording(k):
        b = _batch(g1, k)
        draws.append(b)
        return b

    r = local_round("local-moml", f, w, recording, hp)
    w1, u1, stats = r.meta_model, r.state, r.stats
    assert [len(b[1]) for b in draws] == [6] + [4] * 9
    u = meta.local_moml_init_memory(f, w, [draws[0]], 0.1)
    ww = w
    for h in range(3):
        ww, u = meta.local_moml_step(f, ww, u, _s123(*draws[1 + 3 * h : 4 + 3 * h]), 0.1, 0.05, 0.4, ExactHessian())
    torch.testing.assert_close(_flat(w1), _flat(ww), atol=1e-12, rtol=0)
    torch.testing.assert_close(_flat(u1), _flat(u), atol=1e-12, rtol=0)
    assert (stats.num_samples, stats.num_gradients, stats.num_hvps) == (6 + 36, 1 + 6, 3)

    # keep: a given u is the value the first momentum update starts from (no S0 draw)
    draws.clear()
    r = local_round("local-moml", f, w, recording, hp, state=u1)
    w2, u2, stats2 = r.meta_model, r.state, r.stats
    assert [len(b[1]) for b in draws] == [4] * 9
    u = u1
    ww = w
    for h in range(3):
        ww, u = meta.local_moml_step(f, ww, u, _s123(*draws[3 * h : 3 * h + 3]), 0.1, 0.05, 0.4, ExactHessian())
    torch.testing.assert_close(_flat(u2), _flat(u), atol=1e-12, rtol=0)
    assert stats2.num_samples == 36


def test_functions_do_not_mutate_inputs(gen):
    model = _tiny_mlp()
    f = meta.make_loss(model, nn.functional.cross_entropy)
    w = meta.params_of(model)
    before = _flat(w).clone()
    local_round("per-fedavg", f, w, _sampler(gen), PerFedAvgConfig(local_steps=2, batch_size=3, inner_lr=0.1, meta_lr=0.1))
    local_round("local-moml", f, w, _sampler(gen), LocalMOMLConfig(local_steps=2, batch_size=3, init_batch_size=3, inner_lr=0.1,
                                                                     lr=0.1, momentum=0.5))
    assert torch.equal(_flat(w), before)


def test_adapt_and_score_is_repeated_adaptation_then_the_query_loss(gen):
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    a, b = random_quadratic(gen)
    qa, qb = random_quadratic(gen)
    iterates = [w]
    for _ in range(4):
        iterates.append(iterates[-1] - 0.1 * (a @ iterates[-1] - b))
    expected = torch.stack([quad_loss({"w": v}, qa, qb) for v in iterates])
    got = personalize.adapt_and_score(quad_loss, {"w": w}, (a, b), (qa, qb), 0.1, 4)
    torch.testing.assert_close(got.loss, expected[-1], atol=1e-12, rtol=0)
    assert got.accuracy.isnan()  # no forward: no accuracy
    curve = personalize.adapt_and_score(quad_loss, {"w": w}, (a, b), (qa, qb), 0.1, 4, at=range(5))
    torch.testing.assert_close(curve.loss, expected, atol=1e-12, rtol=0)
    # steps=None: one step per batch of the leading axis (here the same batch four times)
    per_step = personalize.adapt_and_score(quad_loss, {"w": w}, (a.expand(4, D, D), b.expand(4, D)), (qa, qb), 0.1)
    torch.testing.assert_close(per_step.loss, expected[-1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="at must name"):
        personalize.adapt_and_score(quad_loss, {"w": w}, (a, b), (qa, qb), 0.1, 4, at=(5,))


def test_unknown_hessian_mode_is_rejected():
    with pytest.raises(ValueError, match="meta_gradient"):
        meta.meta_gradient("second_order")
