"""Adapt, then score: a meta-model takes ``steps`` gradient steps at alpha on a support set, then its loss (and,
for integer labels, accuracy) on a query set. Every few-shot evaluation in fedmeta is this one function,
:func:`adapt_and_score`:

* the clients' personalized evaluation (:mod:`fedmeta.clients.client`), one client or C of them under
  ``torch.func.vmap``: per-fedavg.txt Section 5 (one step on the client's train split, scored on its test
  split) and localmoml Section 6.2 (5-shot, 10 steps), before and after adaptation;
* localmoml Table 2's few-shot test error (:func:`fedmeta.tasks.few_shot_errors`, Section 6.1: 10 steps at
  lr 0.01 on 10 points, MSE on 100 more), vmapped over the unseen tasks;
* the centralized runs' meta-loss (:func:`fedmeta.centralized_iteration.meta_loss`: N steps on fresh batches
  S_0..S_{N-1}, then the loss on T), vmapped over tasks;
* Dif-MAML's test (:func:`fedmeta.dif_maml.test_losses`, dif-maml.txt Section 5 and Figure 2c: the query MSE
  after 0..steps adaptation steps), vmapped over test tasks and agents.

It is written with torch ops only (no ``float()`` / ``.item()``), so callers vmap it over clients, tasks or
agents and turn the results into numbers afterwards.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedmeta import fast
from fedmeta.meta import Batch, LossFn, Params, adapt

Forward = Callable[[Params, Tensor], Tensor]
"""``forward(params, x)``: a model's output as a pure function of its parameters."""


class Scores(NamedTuple):
    """Loss and accuracy (NaN for regression, or without a ``forward``) on a query set: 0-d tensors, or
    stacked on a leading axis of adaptation-step counts (:func:`adapt_and_score`'s ``at``)."""

    loss: Tensor
    accuracy: Tensor


def model_forward(model: nn.Module, *, sequential: bool = False) -> Forward:
    """``model``'s forward as a function of a parameter dict: ``functional_call``, or with ``sequential``
    :func:`fedmeta.fast.sequential_forward` where the model allows it (the same output bit for bit, faster)."""
    if sequential:
        forward = fast.sequential_forward(model)
        if forward is not None:
            return forward

    def forward(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x,))

    return forward


def score(f: LossFn, params: Params, query: Batch, forward: Forward | None = None,
          criterion: Callable[[Tensor, Tensor], Tensor] | None = None) -> Scores:
    """Loss and accuracy of ``params`` on ``query`` (the only place :func:`adapt_and_score` reads it).

    With ``forward`` and ``criterion`` one forward pass gives both: ``criterion(out, y)`` and, for integer
    labels, the argmax accuracy of ``out``. Without them, the loss is ``f(params, x, y)`` and the accuracy NaN.
    """
    x, y = query
    with torch.no_grad():
        if forward is None:
            loss = f(params, x, y)
            return Scores(loss.detach(), torch.full((), float("nan"), dtype=loss.dtype, device=loss.device))
        out = forward(params, x)
        loss = criterion(out, y)
        if y.is_floating_point():
            acc = torch.full((), float("nan"), dtype=loss.dtype, device=loss.device)
        else:
            acc = (out.argmax(-1) == y).float().mean()
        return Scores(loss.detach(), acc)


def adapt_and_score(
    f: LossFn,
    params: Params,
    support: Batch,
    query: Batch,
    inner_lr: float,
    steps: int | None = None,
    *,
    forward: Forward | None = None,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    at: Sequence[int] | None = None,
) -> Scores:
    """Adapt ``params`` with ``steps`` gradient steps ``v <- v - inner_lr grad f(v; support)`` (per-fedavg.txt
    eq. 5, repeated), then score on ``query``: per-fedavg.txt Section 5's personalized evaluation is
    ``steps=1`` on the client's data, localmoml Section 6.2's ``steps=10`` on 5 shots.

    Parameters
    ----------
    f
        The loss the adaptation steps descend (and, without ``forward``, the query loss).
    support
        ``(x, y)``, used at every step; with ``steps=None``, ``x`` and ``y`` carry a leading step axis and
        step ``i`` adapts on ``(x[i], y[i])`` (the centralized runs' fresh batches ``S_0..S_{N-1}``).
    query
        ``(x, y)``, read only after the last adaptation step (no leakage into the adaptation).
    forward, criterion
        Give both to score with one forward pass ``out = forward(params, x)``: the loss
        ``criterion(out, y)`` and, for integer labels, the argmax accuracy (``f`` must then be
        ``criterion(forward(params, x), y)``, as :func:`fedmeta.meta.make_loss` builds it). Without them the
        loss is ``f`` on the query and the accuracy NaN.
    at
        Score after each of these numbers of steps (in ``0..steps``) and stack the scores on a leading
        axis: ``(0, steps)`` is the before/after pair of the clients, ``range(steps + 1)`` Dif-MAML's
        adaptation curve (dif-maml.txt Figure 2c). Default: the 0-d scores after all ``steps``.

    Notes
    -----
    The adapted parameters are detached after every step (an evaluation: nothing differentiates through
    it). Torch ops only, so it can be ``torch.func.vmap``-ped over clients, tasks or agents.
    """
    if (forward is None) != (criterion is None):
        raise ValueError("give both forward and criterion, or neither")
    batches = list(zip(*support)) if steps is None else [support] * steps
    marks = (len(batches),) if at is None else tuple(at)
    if any(not 0 <= s <= len(batches) for s in marks):
        raise ValueError(f"at must name step counts in 0..{len(batches)}, got {marks}")
    v = {k: t.detach() for k, t in params.items()}
    kept = {0: v}
    for i, batch in enumerate(batches, 1):
        v = {k: t.detach() for k, t in adapt(f, v, batch, inner_lr).items()}
        if i in marks:
            kept[i] = v
    scored = [score(f, kept[s], query, forward, criterion) for s in marks]
    if at is None:
        return scored[0]
    return Scores(torch.stack([s.loss for s in scored]), torch.stack([s.accuracy for s in scored]))
