"""The single-client fast path: the plain ``torch.autograd`` backend of :mod:`fedmeta.meta`'s equations.

:mod:`fedmeta.meta` writes every equation once over two primitives (:class:`fedmeta.meta.Autodiff`);
its default backend, ``torch.func`` transforms, runs the same code ``vmap``-ped over the clients of a
node. One client alone (a Flower SuperNode usually hosts exactly one) pays the transforms' wrapping on
every call for nothing: :data:`PLAIN_AUTOGRAD` computes the primitives with ``torch.autograd.grad`` on
fresh leaf tensors (:func:`gradient`), and the exact Hessian-vector product is the double backward
``grad(<grad f(w), v>)`` with ``create_graph=True`` (:func:`hvp`, reverse over reverse, as
:func:`fedmeta.meta.hvp`). The steps are :mod:`fedmeta.meta`'s functions called with
``ad=PLAIN_AUTOGRAD`` (e.g. ``meta.maml_gradient(f, w, batches, alpha, estimator, ad=fast.PLAIN_AUTOGRAD)``).
The loss can also skip ``functional_call``: :func:`make_loss` runs an ``nn.Sequential`` of ``Linear`` /
``Conv`` layers and parameter-free modules directly on the parameter dict (:func:`sequential_forward`).
:func:`descend_` is the in-place update of a caller that owns its tensors.

Same contract as :mod:`fedmeta.meta`: pure functions over parameter dicts (nothing updated in place but by
:func:`descend_`, nothing written to ``.data``), same batches, same order of operations. Measured
(tests/test_fast_step.py, tests/test_golden_rounds.py) the results equal the ``torch.func`` path's
bit for bit on the papers' MLPs on CPU; the tests hold them to 1e-6 (float32) and 1e-10 (float64).

Run on this backend (:data:`ESTIMATORS`, the estimators whose ``plain_autograd`` flag is set): the
``exact`` and ``first_order`` meta-gradients with any number N of inner steps (multistep-maml-ggs.txt
eqs. 6 and 8), and ``fo_muml`` (its anchored inner loop, first order), and FedAvg's SGD step
(:func:`gradient`, then :func:`descend_`). The other estimators (``hessian_free``, ``ggs``,
``zeroth_order``) stay on the ``torch.func`` path; :func:`refusal` says why a setting is not run here. The
selection (``step_impl``), the one place that enforces it, is
:func:`fedmeta.algorithms.executor.resolve_step_impl`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmeta import meta
from fedmeta.meta import Batch, HessianCorrection, LossFn, MetaGradient, Params

Forward = Callable[[Params, Tensor], Tensor]
"""``forward(params, x)``: a model's output for the parameter dict ``params``."""

ESTIMATORS = tuple(n for n in meta.META_GRADIENTS if meta.meta_gradient(n).plain_autograd)
"""Values of the ``meta_gradient`` setting the fast path computes."""


# ----------------------------------------------------------------------------------------------
# The loss without functional_call


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _global_hooks() -> bool:
    m = nn.modules.module
    return any(bool(getattr(m, name, None)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks",
    ))


def _names(module: nn.Module, prefix: str) -> tuple[str, str | None]:
    return prefix + "weight", (prefix + "bias" if module.bias is not None else None)


def _linear(module: nn.Linear, prefix: str) -> Forward:
    w, b = _names(module, prefix)
    if b is None:
        return lambda p, x: F.linear(x, p[w])
    return lambda p, x: F.linear(x, p[w], p[b])


def _conv(module: nn.Module, prefix: str) -> Forward:
    w, b = _names(module, prefix)
    conv = module._conv_forward  # what Conv{1,2,3}d.forward calls, with the weight and bias passed in
    return lambda p, x: conv(x, p[w], p[b] if b is not None else None)


def _stateless(module: nn.Module) -> Forward:
    fwd = module.forward  # no parameters, buffers or hooks: exactly what module(x) runs
    return lambda p, x: fwd(x)


def _plan(module: nn.Module, prefix: str, used: list[str | None]) -> list[Forward] | None:
    if _hooked(module):
        return None
    kind = type(module)
    if kind is nn.Sequential:
        steps: list[Forward] = []
        for name, child in module.named_children():
            sub = _plan(child, f"{prefix}{name}.", used)
            if sub is None:
                return None
            steps += sub
        return steps
    if kind is nn.Linear:
        used += _names(module, prefix)
        return [_linear(module, prefix)]
    if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        used += _names(module, prefix)
        return [_conv(module, prefix)]
    stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    if stateless and not any(_hooked(m) for m in module.modules()):
        return [_stateless(module)]
    return None


def sequential_forward(model: nn.Module) -> Forward | None:
    """``model``'s forward as a pure function of a parameter dict, or ``None`` where not supported.

    Supported: an ``nn.Sequential`` (nested ones too) of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
    modules without parameters or buffers (``Flatten``, activations, pooling, ...), with no hooks.
    Each layer runs the very call its ``forward`` makes (``F.linear(x, weight, bias)``,
    ``Conv._conv_forward(x, weight, bias)``, the parameter-free module's ``forward``) with the
    tensors of ``params`` (keys as in ``model.named_parameters()``), so the output equals
    ``functional_call(model, params, (x,))`` bit for bit, without swapping the module's parameters
    on every call. Hooks registered after this call are not seen; a model with tied parameters is
    left to ``functional_call``.
    """
    if _global_hooks():
        return None
    used: list[str | None] = []
    steps = _plan(model, "", used)
    # Tied parameters are listed once by named_parameters(): leave them to functional_call.
    if steps is None or not {k for k in used if k is not None} <= {k for k, _ in model.named_parameters()}:
        return None

    def forward(params: Params, x: Tensor) -> Tensor:
        for step in steps:
            x = step(params, x)
        return x

    return forward


def make_loss(model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """``f(params, x, y) = criterion(model_params(x), y)``, as :func:`fedmeta.meta.make_loss`, via
    :func:`sequential_forward` when the model allows it (else ``functional_call``)."""
    forward = sequential_forward(model)
    if forward is None:
        return meta.make_loss(model, criterion)

    def f(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return criterion(forward(params, x), y)

    return f


# ----------------------------------------------------------------------------------------------
# Oracles: gradient and exact Hessian-vector product


def _leaves(params: Params) -> Params:
    return {k: v.detach().requires_grad_() for k, v in params.items()}


def gradient(f: LossFn, params: Params, batch: Batch) -> Params:
    """Stochastic gradient ``grad f(params; batch)`` (per-fedavg.txt eq. 7), as :func:`fedmeta.meta.gradient`.

    A parameter the loss does not use gets a zero gradient (as ``torch.func.grad`` gives).
    """
    leaves = _leaves(params)
    with torch.enable_grad():
        loss = f(leaves, *batch)
    grads = torch.autograd.grad(loss, tuple(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


def descend_(params: Params, direction: Params, lr: float) -> Params:
    """``params <- params - lr * direction`` **in place** (both dicts' tensors are overwritten: ``direction``
    holds ``lr * direction`` after it) and returns ``params``. The same floats as the pure update
    ``meta.axpy(-lr, direction, params)``, computed as ``lr * d`` then a subtraction (no fused multiply-add),
    without allocating: for a caller that owns both dicts, e.g. the executor's fast path
    (:meth:`fedmeta.algorithms.base.Algorithm.fast_step`)."""
    with torch.no_grad():
        for k, p in params.items():
            p.sub_(direction[k].mul_(lr))
    return params


def hvp(f: LossFn, params: Params, v: Params, batch: Batch) -> Params:
    """Exact Hessian-vector product ``H(params; batch) v`` by double backward, as :func:`fedmeta.meta.hvp`.

    ``g = grad f(params; batch)`` with ``create_graph=True``, then ``grad(<g, v>)`` (the vector-Jacobian
    product of ``grad f``; the Hessian is symmetric, so it is ``H v``). The Hessian is never formed.
    """
    leaves = _leaves(params)
    xs = tuple(leaves.values())
    with torch.enable_grad():
        loss = f(leaves, *batch)
        g = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True)
    # Gradient leaves that do not depend on the parameters (a loss linear in them) add nothing to H v.
    pairs = [(gk, v[k]) for k, gk in zip(leaves, g) if gk is not None and gk.requires_grad]
    if not pairs:
        return {k: torch.zeros_like(t) for k, t in params.items()}
    # grad of the scalar sum_k <g_k, v_k>: its backward hands each g_k exactly v_k (1.0 * v_k), so this is the
    # vector-Jacobian product with grad_outputs=v bit for bit, without grad_outputs, whose first use in a process
    # imports sympy (about 0.3 s, paid by every deployed ClientApp process)
    inner = torch.stack([(gk * vk).sum() for gk, vk in pairs]).sum()
    hv = torch.autograd.grad(inner, xs, allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, hv))


# ----------------------------------------------------------------------------------------------
# The backend, and which estimators run on it


PLAIN_AUTOGRAD = meta.Autodiff("autograd", gradient, hvp)
"""The plain ``torch.autograd`` backend (:func:`gradient`, :func:`hvp`) of :mod:`fedmeta.meta`'s equations: one
client, no ``vmap``. Pass it as ``ad=`` to :func:`fedmeta.meta.maml_gradient`, :func:`fedmeta.meta.local_moml_step`,
:func:`fedmeta.meta.local_moml_init_memory`, ... for the estimators in :data:`ESTIMATORS`."""


def refusal(estimator: MetaGradient | HessianCorrection) -> str | None:
    """Why the fast path does not run ``estimator`` (its steps then run on the ``torch.func`` backend), or ``None``."""
    est = meta._as_estimator(estimator)
    if est.plain_autograd:
        return None
    return (f"the plain-autograd fast path computes meta_gradient in {list(ESTIMATORS)}, got {est.name!r} "
            "(it runs on the torch.func path)")


__all__ = ["ESTIMATORS", "PLAIN_AUTOGRAD", "descend_", "gradient", "hvp", "make_loss", "refusal", "sequential_forward"]
