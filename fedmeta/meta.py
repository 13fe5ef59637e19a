"""Meta-learning math as pure functions over parameter dicts (no Flower here).

Every function takes a *loss function* ``f(params, x, y) -> scalar`` (see :func:`make_loss`)
and parameter dicts ``dict[str, Tensor]`` and returns new dicts; nothing is updated in place and
nothing writes to ``.data``, so second-order terms are never silently dropped.

Each equation is written once, over two autodiff primitives, the stochastic gradient and the exact
Hessian-vector product (:class:`Autodiff`): every equation function takes the backend as the keyword
``ad``. The default, :data:`TORCH_FUNC` (:func:`gradient`, :func:`hvp`), is built from ``torch.func``
transforms and can be ``vmap``-ped over clients; :data:`fedmeta.fast.PLAIN_AUTOGRAD` computes the same
floats with plain ``torch.autograd`` for one client (faster outside ``vmap``).

Notation (papers in ``shared/papers``):

* ``inner_lr`` -- alpha in both papers: the step size of the adaptation step
  ``w - alpha * grad f(w)``.
* ``meta_lr`` -- Per-FedAvg's beta (per-fedavg.txt eq. 8): the local meta step size.
* ``lr`` -- LocalMOML's eta (localmoml Algorithm 3, line 11): the local meta step size.
* ``momentum`` -- LocalMOML's beta (localmoml eq. 7): the weight of the fresh adapted model in
  the personalized-model average. Not a step size.
* ``inner_steps`` -- N (multistep-maml-ggs.txt eq. 6): inner SGD steps of the adaptation.
* ``meta_gradient`` -- the estimator of the meta-gradient (:func:`meta_gradient`): ``exact``
  (Hessian-vector products), ``first_order`` (FO-MAML), ``hessian_free`` (Per-FedAvg's finite
  differences), ``ggs`` (gradient-based Gaussian smoothing), ``zeroth_order`` (ES-MAML-style),
  ``fo_muml`` (FO-MuML's anchored inner loop, first order).
* ``delta``, ``num_directions`` -- the finite-difference step / smoothing radius and U.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from fedmeta import validation as V

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


def hvp(f: LossFn, params: Params, v: Params, batch: Batch) -> Params:
    """Exact Hessian-vector product ``H(params; batch) v`` by double backward.

    Reverse-over-reverse: the vector-Jacobian product of ``grad f``; since the Hessian is
    symmetric this is ``H v``. The Hessian is never materialised.
    """
    _, vjp_fn = vjp(lambda p: grad(f)(p, *batch), params)
    (hv,) = vjp_fn({k: v[k] for k in params})  # the cotangent's key order must match the parameters'
    return hv


@dataclass(frozen=True)
class Autodiff:
    """The two primitives every equation here is built from: an autodiff backend.

    ``gradient(f, params, batch)`` is the stochastic gradient ``grad f(params; batch)`` (per-fedavg.txt
    eq. 7); ``hvp(f, params, v, batch)`` the exact Hessian-vector product ``H(params; batch) v``. Both are
    pure (new dicts, inputs untouched) and give a zero for a parameter the loss does not use. The
    equation functions take one as ``ad``: :data:`TORCH_FUNC` (default, vmappable over clients) or
    :data:`fedmeta.fast.PLAIN_AUTOGRAD` (one client, plain ``torch.autograd``).
    """

    name: str
    gradient: Callable[[LossFn, Params, Batch], Params]
    hvp: Callable[[LossFn, Params, Params, Batch], Params]


TORCH_FUNC = Autodiff("torch.func", gradient, hvp)
"""The ``torch.func`` backend (:func:`gradient`, :func:`hvp`): ``grad`` and ``vjp``, vmappable over clients."""


def adapt(f: LossFn, params: Params, batch: Batch, inner_lr: float, *, ad: Autodiff = TORCH_FUNC) -> Params:
    """One adaptation step ``params - alpha * grad f(params; batch)`` (per-fedavg.txt eq. 5)."""
    return axpy(-inner_lr, ad.gradient(f, params, batch), params)


def dot(u: Params, v: Params) -> Tensor:
    """``<u, v>`` summed over all leaves (a 0-d tensor)."""
    return sum((u[k] * v[k]).sum() for k in u)


def gaussian_like(params: Params, gen: torch.Generator) -> Params:
    """A standard Gaussian vector with the shapes of ``params``, drawn from ``gen``.

    Drawn on the generator's device (clients use CPU generators) and moved to the parameters', so
    the same seed gives the same directions on CPU and CUDA.
    """
    return {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype, device=gen.device).to(v.device) for k, v in params.items()
    }


@dataclass(frozen=True)
class Cost:
    """Oracle calls, for fair comparisons between estimators (reported to the server)."""

    gradients: int = 0
    hvps: int = 0
    loss_evals: int = 0
    """Forward-only loss evaluations (the zeroth-order estimator)."""

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.gradients + other.gradients, self.hvps + other.hvps, self.loss_evals + other.loss_evals)

    def __mul__(self, n: int) -> "Cost":
        return Cost(self.gradients * n, self.hvps * n, self.loss_evals * n)


class HessianCorrection(Protocol):
    """Estimator of ``(I - alpha * H(w; batch)) v``: one factor of the meta-gradient product (eq. 8).

    ``gen`` feeds the random directions of the stochastic estimators (``ggs``, ``zeroth_order``);
    the deterministic ones ignore it. ``ad``: the autodiff backend of its gradients / HVPs.
    """

    name: str
    cost: Cost
    """Oracle calls of one ``__call__``."""
    random: bool
    """Whether it draws random directions from ``gen`` (then a client's estimate runs alone, not under ``vmap``:
    each client draws its own directions in its own order)."""
    plain_autograd: bool
    """Whether a one-client round runs it on plain ``torch.autograd`` (:data:`fedmeta.fast.PLAIN_AUTOGRAD`, the fast
    path; :func:`fedmeta.algorithms.executor.resolve_step_impl` reads it). Every correction computes on either
    backend; the flag decides which one runs it."""

    def __call__(
        self, f: LossFn, w: Params, v: Params, batch: Batch, inner_lr: float, gen: torch.Generator | None = None,
        *, ad: Autodiff = TORCH_FUNC,
    ) -> Params: ...


@dataclass(frozen=True)
class ExactHessian:
    """``v - alpha * H(w; batch) v`` with an exact double-backward HVP (per-fedavg.txt eq. 9, localmoml eq. 8)."""

    name: str = "exact"
    random: ClassVar[bool] = False
    plain_autograd: ClassVar[bool] = True
    cost: Cost = Cost(hvps=1)

    def __call__(self, f, w, v, batch, inner_lr, gen=None, *, ad=TORCH_FUNC):
        return axpy(-inner_lr, ad.hvp(f, w, v, batch), v)


@dataclass(frozen=True)
class FirstOrder:
    """Drop the Hessian term: ``(I - alpha H) v ~= v`` (per-fedavg.txt eqs. 23 and 112, FO-MAML).

    The Hessian batches are still drawn by the callers, so that switching estimators does not
    change the random stream of the other batches.
    """

    name: str = "first_order"
    random: ClassVar[bool] = False
    plain_autograd: ClassVar[bool] = True
    cost: Cost = Cost()

    def __call__(self, f, w, v, batch, inner_lr, gen=None, *, ad=TORCH_FUNC):
        return v


@dataclass(frozen=True)
class FiniteDifference:
    """Per-FedAvg's Hessian-free HVP, per-fedavg.txt Appendix G eqs. (117)-(119)::

        H(w; D'') v ~= [grad f(w + delta v; D'') - grad f(w - delta v; D'')] / (2 delta)

    with ``v`` the (unnormalised) vector being multiplied, as in eq. (119). The central difference
    has error ``O(rho delta^2 ||v||^3)`` on a loss with Lipschitz Hessian (``rho delta ||v||^2``
    as stated for eq. 117). On ReLU/max-pool networks the loss is only piecewise smooth: the two
    points can sit on different sides of a kink and the difference is then far from ``H v``
    (tests/test_estimators.py and ``bench/fd_accuracy.py`` measure both cases).

    The default ``delta = 1e-5`` is where ``bench/fd_accuracy.py`` measured the smallest error
    in float32 across the papers' MLPs (ReLU, ELU, tanh): larger steps cross ReLU kinks (and the
    kink of ELU's second derivative), smaller ones drown in round-off.
    """

    delta: float = 1e-5
    name: str = "hessian_free"
    random: ClassVar[bool] = False
    plain_autograd: ClassVar[bool] = False
    cost: Cost = Cost(gradients=2)

    def __call__(self, f, w, v, batch, inner_lr, gen=None, *, ad=TORCH_FUNC):
        plus = ad.gradient(f, axpy(self.delta, v, w), batch)
        minus = ad.gradient(f, axpy(-self.delta, v, w), batch)
        return {k: v[k] - inner_lr * (plus[k] - minus[k]) / (2 * self.delta) for k in v}


@dataclass(frozen=True)
class _GaussianDirections:
    """What the two stochastic estimators share: U directions ``u ~ N(0, I)`` drawn from ``gen``, and the radius delta."""

    delta: float = 1e-5
    num_directions: int = 10
    random: ClassVar[bool] = True
    plain_autograd: ClassVar[bool] = False

    def directions(self, w: Params, gen: torch.Generator | None) -> Iterator[Params]:
        if gen is None:
            raise ValueError(f"meta_gradient={self.name!r} draws random directions: pass a torch.Generator as gen")  # type: ignore[attr-defined]
        return (gaussian_like(w, gen) for _ in range(self.num_directions))


@dataclass(frozen=True)
class GaussianSmoothing(_GaussianDirections):
    """GGS Hessian estimator, multistep-maml-ggs.txt eq. (18), applied to ``v`` without forming H::

        H v = (1/U) sum_u [grad f(w + delta u; D) - grad f(w; D)] <u, v> / delta,   u ~ N(0, I)

    ``E[H] = Hessian of the Gaussian-smoothed loss``: exact on quadratics, ``O(delta)`` off
    otherwise (Proposition 6). The paper draws the batch for ``w + delta u`` "under" the perturbed
    parameters, which matters in RL; for supervised data the distribution does not depend on the
    parameters, so we evaluate both gradients on the same batch ``D`` (common random numbers, the
    finite-sum case of its Appendix E), which removes the ``6 d sigma_g^2 / (delta^2 D)`` variance
    term of Proposition 7.
    """

    name: str = "ggs"

    @property
    def cost(self) -> Cost:
        return Cost(gradients=self.num_directions + 1)

    def __call__(self, f, w, v, batch, inner_lr, gen=None, *, ad=TORCH_FUNC):
        directions = self.directions(w, gen)
        g0 = ad.gradient(f, w, batch)
        acc = {k: torch.zeros_like(t) for k, t in v.items()}
        for u in directions:
            g = ad.gradient(f, axpy(self.delta, u, w), batch)
            c = dot(u, v) / (self.delta * self.num_directions)
            acc = {k: acc[k] + c * (g[k] - g0[k]) for k in acc}
        return axpy(-inner_lr, acc, v)


@dataclass(frozen=True)
class ZerothOrder(_GaussianDirections):
    """Zeroth-order (ES-MAML-style) Hessian estimator, multistep-maml-ggs.txt eq. (17)::

        H v = (1/U) sum_u (Delta_{+} + Delta_{-}) / (2 delta^2) u <u, v>,
        Delta_{+-} = f(w +- delta u; D) - f(w; D),   u ~ N(0, I)

    Forward passes only. In expectation it is the smoothed Hessian plus ``Tr(H)/2 * I``
    (Proposition 5): a constant bias that does not vanish as ``delta -> 0``. Provided for
    comparison, as in the paper. Same batch for all three losses (see :class:`GaussianSmoothing`).
    """

    name: str = "zeroth_order"

    @property
    def cost(self) -> Cost:
        return Cost(loss_evals=2 * self.num_directions + 1)

    def __call__(self, f, w, v, batch, inner_lr, gen=None, *, ad=TORCH_FUNC):
        directions = self.directions(w, gen)
        with torch.no_grad():
            l0 = f(w, *batch)
            acc = {k: torch.zeros_like(t) for k, t in v.items()}
            for u in directions:
                second = f(axpy(self.delta, u, w), *batch) + f(axpy(-self.delta, u, w), *batch) - 2 * l0
                c = second / (2 * self.delta**2) * dot(u, v) / self.num_directions
                acc = {k: acc[k] + c * u[k] for k in acc}
        return axpy(-inner_lr, acc, v)


# ----------------------------------------------------------------------------------------------
# Multi-step inner loop and the meta-gradient (multistep-maml-ggs.txt Section 2.2)


@dataclass(frozen=True)
class MetaGradient:
    """How a client computes the meta-gradient of ``L(w) = f(w_N(w); T)``: the ``meta_gradient`` setting.

    Two parts vary: the inner loop that produces ``w_N`` from ``w`` and the estimator of each
    ``(I - alpha H)`` factor.

    * Inner loop (``anchored=False``), multistep-maml-ggs.txt eq. (6)::

          w_{j+1} = w_j - alpha grad f(w_j; S_j),   j = 0..N-1,   w_0 = w

    * FO-MuML's inner loop (``anchored=True``), fo-muml Algorithm 3 line 7, every step restarts
      from the meta-model ``x`` (a fixed-point iteration towards the Moreau-envelope point
      ``z(x)``, Lemma 2)::

          z_{l+1} = x - alpha grad f(z_l; S_l),   l = 0..s-1,   z_0 = x

    * Meta-gradient, eq. (8)::

          G = prod_{j=0}^{N-1} (I - alpha H(w_j; D_j)) grad f(w_N; T)

      evaluated right to left (``j = N-1`` first): reverse-mode accumulation along the stored
      trajectory, which is exactly backpropagation through the unrolled loop when the Hessian
      batches ``D_j`` equal the ``S_j``, but lets them be independent as in the resampling case.
      Only the N+1 iterates are stored; each HVP's graph is freed before the next.

    With ``N = 1`` and ``correction=ExactHessian()`` this is Per-FedAvg's eq. (9).
    """

    name: str
    correction: HessianCorrection
    anchored: bool = False

    @property
    def vmappable(self) -> bool:
        """Whether many clients' estimates run as one ``vmap`` call (the estimator draws nothing)."""
        return not getattr(self.correction, "random", True)

    @property
    def plain_autograd(self) -> bool:
        """Whether the one-client fast path runs it (on :data:`fedmeta.fast.PLAIN_AUTOGRAD`, see
        :attr:`HessianCorrection.plain_autograd`)."""
        return getattr(self.correction, "plain_autograd", False)

    def trajectory(
        self, f: LossFn, w: Params, batches: Sequence[Batch], inner_lr: float, *, ad: Autodiff = TORCH_FUNC
    ) -> list[Params]:
        """``[w_0, ..., w_N]`` for the N inner batches ``S_j`` (eq. 6, or Algorithm 3 line 7 when anchored)."""
        traj = [w]
        for batch in batches:
            z = traj[-1]
            step = ad.gradient(f, z, batch)
            base = w if self.anchored else z
            traj.append({k: (base[k] - inner_lr * step[k]).detach() for k in w})
        return traj

    def backward(
        self,
        f: LossFn,
        trajectory: Sequence[Params],
        g: Params,
        hessian_batches: Sequence[Batch],
        inner_lr: float,
        gen: torch.Generator | None = None,
        *,
        ad: Autodiff = TORCH_FUNC,
    ) -> Params:
        """``prod_j (I - alpha H(w_j; D_j)) g`` applied to ``g = grad f(w_N; T)`` (eqs. 3, 8, 19)."""
        if self.anchored:  # FO-MuML: the outer step uses grad f(z_s) as is (Algorithm 3 line 11)
            return g
        for j in reversed(range(len(trajectory) - 1)):
            hv = self.correction(f, trajectory[j], g, hessian_batches[j], inner_lr, gen, ad=ad)
            g = {k: v.detach() for k, v in hv.items()}
        return g

    def cost(self, inner_steps: int) -> Cost:
        """Oracle calls of one meta-gradient: N inner gradients, the outer gradient, N corrections."""
        corrections = Cost() if self.anchored else self.correction.cost * inner_steps
        return Cost(gradients=inner_steps + 1) + corrections


META_GRADIENTS = ("exact", "first_order", "hessian_free", "ggs", "zeroth_order", "fo_muml")
"""Values of the ``meta_gradient`` setting."""


DEFAULT_DELTA = 1e-5
"""delta when none is given, for every estimator that uses one.

Measured (``bench/fd_accuracy.py``, float32, the papers' MLPs): the finite difference is most
accurate near 1e-5 (ReLU kinks spoil 1e-3 and 1e-4, round-off grows below); GGS on the
784-40-40-10 ReLU MLP has a U-independent error floor at 1e-3 (``||delta u|| ~ 0.2`` crosses kinks)
that disappears at 1e-5. The zeroth-order estimator needs a larger delta in float32 (its
signal is ``delta^2 u'Hu``, below float32 round-off of the loss at 1e-5): set it explicitly.
"""


def meta_gradient(name: str = "exact", *, delta: float = DEFAULT_DELTA, num_directions: int = 10) -> MetaGradient:
    """Build the estimator named ``name`` (one of :data:`META_GRADIENTS`).

    Parameters
    ----------
    delta
        ``hessian_free``: the finite-difference step (per-fedavg eq. 119); ``ggs``/``zeroth_order``:
        the Gaussian smoothing radius (multistep-maml-ggs eqs. 17-18), see :data:`DEFAULT_DELTA`.
        Ignored by the others.
    num_directions
        U, Gaussian vectors per Hessian estimate (``ggs``, ``zeroth_order``).
    """
    V.check_choice("meta_gradient", name, META_GRADIENTS)
    V.check("delta (finite-difference step / smoothing radius)", V.is_finite(delta) and delta > 0, "a finite number > 0", delta)
    V.check("num_directions (U)", V.is_int(num_directions) and num_directions >= 1, "an integer >= 1", num_directions)
    correction: HessianCorrection = {
        "exact": lambda: ExactHessian(),
        "first_order": lambda: FirstOrder(),
        "hessian_free": lambda: FiniteDifference(delta=delta),
        "ggs": lambda: GaussianSmoothing(delta=delta, num_directions=num_directions),
        "zeroth_order": lambda: ZerothOrder(delta=delta, num_directions=num_directions),
        "fo_muml": lambda: FirstOrder(),
    }[name]()
    return MetaGradient(name=name, correction=correction, anchored=name == "fo_muml")


EXACT = meta_gradient("exact")
FIRST_ORDER = meta_gradient("first_order")


@dataclass(frozen=True, kw_only=True)
class MetaBatches:
    """The independent batches of one meta-gradient (multistep-maml-ggs.txt Section 2.2), by name only
    (the papers order them differently: Per-FedAvg's ``(D, D', D'')`` is ``(inner, outer, hessian)``,
    LocalMOML's ``(S1, S2, S3)`` is ``(inner, hessian, outer)``).

    ``inner``: ``S_0..S_{N-1}`` (eq. 6); ``outer``: ``T`` for ``grad f(w_N; T)``;
    ``hessian``: ``D_0..D_{N-1}`` for the ``(I - alpha H)`` factors (eq. 8).
    """

    inner: tuple[Batch, ...]
    outer: Batch
    hessian: tuple[Batch, ...]

    def __post_init__(self) -> None:
        if len(self.inner) < 1 or len(self.hessian) != len(self.inner):
            raise ValueError(
                f"need N >= 1 inner batches and as many Hessian batches, got {len(self.inner)} and {len(self.hessian)}"
            )

    @classmethod
    def draw(cls, sample: Sampler, inner_steps: int, batch_size: int) -> "MetaBatches":
        """Fresh batches in a fixed order: inner, outer, Hessian (for N=1: Per-FedAvg's D, D', D'')."""
        inner = tuple(sample(batch_size) for _ in range(inner_steps))
        outer = sample(batch_size)
        return cls(inner=inner, outer=outer, hessian=tuple(sample(batch_size) for _ in range(inner_steps)))


def maml_gradient(
    f: LossFn,
    w: Params,
    batches: MetaBatches,
    inner_lr: float,
    estimator: MetaGradient,
    gen: torch.Generator | None = None,
    *,
    ad: Autodiff = TORCH_FUNC,
) -> tuple[Params, Params]:
    """The N-step meta-gradient ``G(w) = prod_j (I - alpha H(w_j; D_j)) grad f(w_N; T)`` of eq. (8)
    (or FO-MuML's ``grad f(z_s)``) and ``w_N``."""
    traj = estimator.trajectory(f, w, batches.inner, inner_lr, ad=ad)
    g = ad.gradient(f, traj[-1], batches.outer)
    return estimator.backward(f, traj, g, batches.hessian, inner_lr, gen, ad=ad), traj[-1]


def _as_estimator(estimator: MetaGradient | HessianCorrection) -> MetaGradient:
    if isinstance(estimator, MetaGradient):
        return estimator
    return MetaGradient(name=estimator.name, correction=estimator)


# ----------------------------------------------------------------------------------------------
# Per-FedAvg (Fallah et al. 2020), Algorithm 1


def per_fedavg_step(f: LossFn, w: Params, batches: MetaBatches, inner_lr: float, meta_lr: float,
                    estimator: MetaGradient | HessianCorrection, gen: torch.Generator | None = None, *,
                    ad: Autodiff = TORCH_FUNC) -> Params:
    """One local Per-FedAvg step, per-fedavg.txt eqs. (8)-(9), with an N-step inner loop.

    ``w <- w - beta * prod_j (I - alpha H(w_j; D_j)) grad f(w_N; T)``  (multistep-maml-ggs eq. 8)

    For ``N = 1`` and batches ``inner=(D,), outer=D', hessian=(D'',)`` this is eq. (9):
    ``w <- w - beta (I - alpha H(w; D'')) grad f(w - alpha grad f(w; D); D')``.

    Parameters
    ----------
    batches
        The independent batches (for ``N = 1``: ``inner=(D,), outer=D', hessian=(D'',)``).
    inner_lr
        alpha.
    meta_lr
        Per-FedAvg's beta (local meta step size).
    estimator
        The meta-gradient estimator (:func:`meta_gradient`), or a bare ``(I - alpha H)`` estimator.
    gen
        Random directions of ``ggs`` / ``zeroth_order``.
    ad
        The autodiff backend (:class:`Autodiff`).
    """
    est = _as_estimator(estimator)
    g, _ = maml_gradient(f, w, batches, inner_lr, est, gen, ad=ad)
    return axpy(-meta_lr, g, w)


# ----------------------------------------------------------------------------------------------
# LocalMOML (Wang et al.), Algorithm 3


def local_moml_init_memory(
    f: LossFn,
    w: Params,
    batches: Sequence[Batch],
    inner_lr: float,
    estimator: MetaGradient = EXACT,
    *,
    ad: Autodiff = TORCH_FUNC,
) -> Params:
    """Reset of the personalized model, localmoml Algorithm 3 line 5: ``u = w - alpha grad f(w; S0)``.

    ``batches`` holds ``S0``; with N of them the memory starts from the same N-step inner loop
    ``w_N(w; S0_0..S0_{N-1})`` that the meta step uses (eq. 6; FO-MuML's loop when anchored).
    """
    return estimator.trajectory(f, w, batches, inner_lr, ad=ad)[-1]


def local_moml_step(f: LossFn, w: Params, u: Params, batches: MetaBatches, inner_lr: float, lr: float, momentum: float,
                    estimator: MetaGradient | HessianCorrection, gen: torch.Generator | None = None, *,
                    ad: Autodiff = TORCH_FUNC) -> tuple[Params, Params]:
    """One local LocalMOML step, localmoml eqs. (7)-(8) and Algorithm 3 lines 10-11, N-step inner loop.

    ``u <- (1 - beta) u + beta w_N(w; S1)``                                (7)
    ``Delta = prod_j (I - alpha H(w_j; S2_j)) grad f(u; S3)``              (8)
    ``w <- w - eta * Delta``

    For ``N = 1``, ``w_N = w - alpha grad f(w; S1)`` and this is eqs. (7)-(8) as written.

    Parameters
    ----------
    u
        The personalized model (the memory) before this step.
    batches
        ``MetaBatches(inner=S1, hessian=S2, outer=S3)``.
    lr
        eta, the local meta step size.
    momentum
        LocalMOML's beta in (0, 1]. With ``momentum = 1`` the step equals
        :func:`per_fedavg_step` on the same batches (localmoml Section 5.1).

    Returns
    -------
    (w, u) after the step.
    """
    delta, u = moml_direction(f, w, u, batches, inner_lr, momentum, _as_estimator(estimator), gen, ad=ad)
    return axpy(-lr, delta, w), u


def moml_direction(
    f: LossFn,
    w: Params,
    u: Params,
    batches: MetaBatches,
    inner_lr: float,
    momentum: float | Tensor,
    estimator: MetaGradient,
    gen: torch.Generator | None = None,
    *,
    ad: Autodiff = TORCH_FUNC,
) -> tuple[Params, Params]:
    """One task's memory update and meta-direction, shared by LocalMOML (Algorithm 3 lines 10-11, eqs.
    7-8) and centralized MOML (Algorithm 1 lines 4-7, eqs. v1 and 3), with an N-step inner loop::

        v = w_N(w; S1)                                   (line 4; N = 1: w - alpha grad L(w; S1))
        u <- (1 - beta) u + beta v                       (eq. 7 / eq. v1)
        Delta = prod_j (I - alpha H(w_j; S2_j)) grad L(u; S3)    (eq. 8 / one term of eq. 3)

    ``batches``: ``inner = S1``, ``hessian = S2``, ``outer = S3``. ``momentum`` may be a 0-d tensor
    (one beta per task under ``vmap``). Returns ``(Delta, u)``; ``beta = 1`` gives ``u = v`` exactly and
    ``Delta`` the MAML meta-gradient of :func:`maml_gradient` with ``T = S3`` and ``D = S2``.
    """
    traj = estimator.trajectory(f, w, batches.inner, inner_lr, ad=ad)
    u = lerp(u, traj[-1], momentum)
    g = ad.gradient(f, u, batches.outer)
    return estimator.backward(f, traj, g, batches.hessian, inner_lr, gen, ad=ad), u
