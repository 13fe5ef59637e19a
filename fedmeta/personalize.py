"""Personalized evaluation: fine-tune a meta-model on a support set, then score it (loss and accuracy) on held-out
data. The clients (:mod:`fedmeta.clients.client`) score every client this way, on its own train and test splits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedmeta.meta import Batch, LossFn, Params, adapt


@dataclass(frozen=True)
class Scores:
    """Loss and accuracy (NaN for regression) of one model on one batch."""

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
