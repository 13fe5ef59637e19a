"""Meta-learning math as pure functions over parameter dicts (no Flower here).

Every function takes a *loss function* ``f(params, x, y) -> scalar`` (see :func:`make_loss`)
and parameter dicts ``dict[str, Tensor]`` and returns new dicts; nothing is updated in place and
nothing writes to ``.data``, so second-order terms are never silently dropped. All functions
are built from ``torch.func`` transforms and can be ``vmap``-ped over clients later.

Notation (papers in ``shared/papers``):

* ``inner_lr`` -- alpha in both papers: the step size of the adaptation step
  ``w - alpha * grad f(w)``.
* ``meta_lr`` -- Per-FedAvg's beta (per-fedavg.txt eq. 8): the local meta step size.
* ``lr`` -- LocalMOML's eta (localmoml Algorithm 3, line 11): the local meta step size.
* ``momentum`` -- LocalMOML's beta (localmoml eq. 7): the weight of the fresh adapted model in
  the personalized-model average. Not a step size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Params, Tensor, Tensor], Tensor]
Sampler = Callable[[int], Batch]
"""``sample(k)`` returns a fresh batch of ``k`` samples of one client's training data."""


def make_loss(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """Return ``f(params, x, y) = criterion(model_params(x), y)`` via ``functional_call``."""

    def f(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return criterion(functional_call(model, params, (x,)), y)

    return f


def params_of(model: nn.Module) -> Params:
    """Detached copies of a module's parameters (the starting point of the pure functions)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def axpy(a: float, x: Params, y: Params) -> Params:
    """``y + a * x`` leaf-wise."""
    return {k: y[k] + a * x[k] for k in y}


def lerp(u: Params, v: Params, weight: float) -> Params:
    """``(1 - weight) * u + weight * v`` leaf-wise."""
    return {k: (1.0 - weight) * u[k] + weight * v[k] for k in u}


def gradient(f: LossFn, params: Params, batch: Batch) -> Params:
    """Stochastic gradient ``grad f(params; batch)`` (per-fedavg.txt eq. 7)."""
    return grad(f)(params, *batch)


def adapt(f: LossFn, params: Params, batch: Batch, inner_lr: float) -> Params:
    """One adaptation step ``params - alpha * grad f(params; batch)`` (per-fedavg.txt eq. 5)."""
    return axpy(-inner_lr, gradient(f, params, batch), params)


def hvp(f: LossFn, params: Params, v: Params, batch: Batch) -> Params:
    """Exact Hessian-vector product ``H(params; batch) v`` by double backward.

    Reverse-over-reverse: the vector-Jacobian product of ``grad f``; since the Hessian is
    symmetric this is ``H v``. The Hessian is never materialised.
    """
    _, vjp_fn = vjp(lambda p: grad(f)(p, *batch), params)
    (hv,) = vjp_fn(v)
    return hv


class HessianCorrection(Protocol):
    """Estimator of ``(I - alpha * H(w; batch)) g``, the Hessian factor of a meta-gradient."""

    name: str
    hvps_per_call: int
    """Hessian-vector products one call costs (reported to the server)."""

    def __call__(self, f: LossFn, w: Params, g: Params, batch: Batch, inner_lr: float) -> Params: ...


@dataclass(frozen=True)
class ExactHessian:
    """``g - alpha * H(w; batch) g`` with an exact HVP (per-fedavg.txt eq. 9, localmoml eq. 8)."""

    name: str = "exact"
    hvps_per_call: int = 1

    def __call__(self, f: LossFn, w: Params, g: Params, batch: Batch, inner_lr: float) -> Params:
        return axpy(-inner_lr, hvp(f, w, g, batch), g)


@dataclass(frozen=True)
class FirstOrder:
    """Drop the Hessian term: ``(I - alpha H) g ~= g`` (per-fedavg.txt eq. 23, FO-MAML).

    The batch for the Hessian is still drawn by the callers so that switching modes does not
    change the random stream of the other batches.
    """

    name: str = "first_order"
    hvps_per_call: int = 0

    def __call__(self, f: LossFn, w: Params, g: Params, batch: Batch, inner_lr: float) -> Params:
        return g


HESSIAN_MODES: dict[str, HessianCorrection] = {"exact": ExactHessian(), "first_order": FirstOrder()}


def hessian_correction(mode: str) -> HessianCorrection:
    """Look up a Hessian mode by name; ``ValueError`` lists the allowed names."""
    try:
        return HESSIAN_MODES[mode]
    except KeyError:
        raise ValueError(f"hessian_mode must be one of {sorted(HESSIAN_MODES)}, got {mode!r}") from None


# ----------------------------------------------------------------------------------------------
# Per-FedAvg (Fallah et al. 2020), Algorithm 1


def per_fedavg_step(
    f: LossFn,
    w: Params,
    batches: tuple[Batch, Batch, Batch],
    inner_lr: float,
    meta_lr: float,
    hessian: HessianCorrection,
) -> Params:
    """One local Per-FedAvg step, per-fedavg.txt eqs. (8)-(9).

    ``w <- w - beta * (I - alpha * H(w; D'')) grad f(w - alpha * grad f(w; D); D')``

    Parameters
    ----------
    batches
        The three independent batches ``(D, D', D'')``.
    inner_lr
        alpha.
    meta_lr
        Per-FedAvg's beta (local meta step size).
    hessian
        Estimator of the ``(I - alpha H)`` factor (exact or first-order, eq. 23).
    """
    d, d_prime, d_second = batches
    w_tilde = adapt(f, w, d, inner_lr)
    g = gradient(f, w_tilde, d_prime)
    return axpy(-meta_lr, hessian(f, w, g, d_second, inner_lr), w)


# ----------------------------------------------------------------------------------------------
# LocalMOML (Wang et al.), Algorithm 3


def local_moml_init_memory(f: LossFn, w: Params, batch: Batch, inner_lr: float) -> Params:
    """Reset of the personalized model, localmoml Algorithm 3 line 5: ``u = w - alpha grad f(w; S0)``."""
    return adapt(f, w, batch, inner_lr)


def local_moml_step(
    f: LossFn,
    w: Params,
    u: Params,
    batches: tuple[Batch, Batch, Batch],
    inner_lr: float,
    lr: float,
    momentum: float,
    hessian: HessianCorrection,
) -> tuple[Params, Params]:
    """One local LocalMOML step, localmoml eqs. (7)-(8) and Algorithm 3 lines 10-11.

    ``u <- (1 - beta) u + beta (w - alpha grad f(w; S1))``                 (7)
    ``Delta = (I - alpha H(w; S2)) grad f(u; S3)``                        (8)
    ``w <- w - eta * Delta``

    Parameters
    ----------
    u
        The personalized model (the memory) before this step.
    batches
        ``(S1, S2, S3)``.
    lr
        eta, the local meta step size.
    momentum
        LocalMOML's beta in (0, 1]. With ``momentum = 1`` the step equals
        :func:`per_fedavg_step` with ``(D, D', D'') = (S1, S3, S2)`` (localmoml Section 5.1).

    Returns
    -------
    (w, u) after the step.
    """
    s1, s2, s3 = batches
    u = lerp(u, adapt(f, w, s1, inner_lr), momentum)
    g = gradient(f, u, s3)
    return axpy(-lr, hessian(f, w, g, s2, inner_lr), w), u


# ----------------------------------------------------------------------------------------------
# Local rounds (what one client does between two communications)


@dataclass(frozen=True)
class RoundStats:
    """Work done in one local round, for fair comparisons between algorithms."""

    num_samples: int
    num_gradients: int
    num_hvps: int
    last_loss: float


def per_fedavg_round(
    f: LossFn,
    w: Params,
    sample: Sampler,
    *,
    local_steps: int,
    batch_size: int,
    inner_lr: float,
    meta_lr: float,
    hessian: HessianCorrection,
) -> tuple[Params, RoundStats]:
    """``tau = local_steps`` Per-FedAvg steps (Algorithm 1 inner loop), fresh batches each step."""
    w = {k: v.detach() for k, v in w.items()}
    for _ in range(local_steps):
        batches = (sample(batch_size), sample(batch_size), sample(batch_size))
        w = {k: v.detach() for k, v in per_fedavg_step(f, w, batches, inner_lr, meta_lr, hessian).items()}
    loss = float(f(w, *batches[1]).detach())
    return w, RoundStats(
        num_samples=3 * batch_size * local_steps,
        num_gradients=2 * local_steps,
        num_hvps=hessian.hvps_per_call * local_steps,
        last_loss=loss,
    )


def local_moml_round(
    f: LossFn,
    w: Params,
    u: Params | None,
    sample: Sampler,
    *,
    local_steps: int,
    batch_size: int,
    init_batch_size: int,
    inner_lr: float,
    lr: float,
    momentum: float,
    hessian: HessianCorrection,
) -> tuple[Params, Params, RoundStats]:
    """``H = local_steps`` LocalMOML steps (Algorithm 3 lines 4-12).

    ``u=None`` rebuilds the memory from ``w - alpha grad f(w; S0)`` with ``init_batch_size``
    (K0) samples (line 5, the ``reset`` policy and a client's first round); otherwise the given
    ``u`` (``keep`` policy, line 7) is the value the first momentum update (7) starts from.
    """
    w = {k: v.detach() for k, v in w.items()}
    samples, grads = 0, 0
    if u is None:
        u = local_moml_init_memory(f, w, sample(init_batch_size), inner_lr)
        samples, grads = init_batch_size, 1
    u = {k: v.detach() for k, v in u.items()}
    for _ in range(local_steps):
        batches = (sample(batch_size), sample(batch_size), sample(batch_size))
        w, u = local_moml_step(f, w, u, batches, inner_lr, lr, momentum, hessian)
        w = {k: v.detach() for k, v in w.items()}
        u = {k: v.detach() for k, v in u.items()}
    loss = float(f(u, *batches[2]).detach())
    return w, u, RoundStats(
        num_samples=samples + 3 * batch_size * local_steps,
        num_gradients=grads + 2 * local_steps,
        num_hvps=hessian.hvps_per_call * local_steps,
        last_loss=loss,
    )


def sgd_round(
    f: LossFn,
    w: Params,
    sample: Sampler,
    *,
    local_steps: int,
    batch_size: int,
    lr: float,
) -> tuple[Params, RoundStats]:
    """FedAvg's local update (McMahan et al. 2017; per-fedavg.txt Section 3): ``tau`` SGD steps."""
    w = {k: v.detach() for k, v in w.items()}
    for _ in range(local_steps):
        batch = sample(batch_size)
        w = {k: v.detach() for k, v in adapt(f, w, batch, lr).items()}
    loss = float(f(w, *batch).detach())
    return w, RoundStats(num_samples=batch_size * local_steps, num_gradients=local_steps, num_hvps=0, last_loss=loss)


# ----------------------------------------------------------------------------------------------
# Personalized evaluation


@dataclass(frozen=True)
class Scores:
    loss: float
    accuracy: float


def score(f: LossFn, model: nn.Module, params: Params, batch: Batch) -> Scores:
    """Loss and (for integer labels) accuracy of ``params`` on ``batch``; accuracy is NaN for regression."""
    x, y = batch
    with torch.no_grad():
        out = functional_call(model, params, (x,))
        loss = float(f(params, x, y))
        acc = float((out.argmax(-1) == y).float().mean()) if not y.is_floating_point() else float("nan")
    return Scores(loss=loss, accuracy=acc)


def fine_tune(f: LossFn, params: Params, support: Batch, inner_lr: float, steps: int) -> Params:
    """``steps`` gradient steps with step size alpha on one fixed support set (personalization)."""
    for _ in range(steps):
        params = {k: v.detach() for k, v in adapt(f, params, support, inner_lr).items()}
    return params
