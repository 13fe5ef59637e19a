"""The task families of the centralized runs (:mod:`fedmeta.centralized`): multistep-maml-ggs Section 5's
rank-one matrix factorization (5.1) and sine regression (5.2), a quadratic with closed forms (for tests), and
localmoml Section 6.1's sine tasks with its few-shot test error (Table 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from fedmeta import meta
from fedmeta.meta import Batch, Params
from fedmeta.models import mlp
from fedmeta.personalize import adapt_and_score


class TaskFamily(Protocol):
    """A distribution over tasks ``p(T)`` with per-task data, as the runner sees it.

    Tasks and batches come stacked on a leading task axis, so that one meta-iteration's ``B``
    tasks are drawn (and later processed) together.
    """

    def init_params(self, gen: torch.Generator) -> Params:
        """The initial meta-parameters ``w_0``."""
        ...

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """``l_i(w; batch)`` for one task's batch ``(x, y)`` (no task axis)."""
        ...

    def sample_tasks(self, num_tasks: int, gen: torch.Generator) -> Tensor:
        """``num_tasks`` tasks ``T_i ~ p(T)``, one row each."""
        ...

    def sample(self, tasks: Tensor, size: int, gen: torch.Generator) -> Batch:
        """A fresh batch of ``size`` samples of every task in ``tasks``: ``x, y`` of shape ``[B, size, ...]``."""
        ...


@dataclass(frozen=True)
class MatrixFactorization:
    """Rank-one matrix factorization, multistep-maml-ggs.txt Section 5.1::

        l_i(w) = 1/4 || w w^T - g_i g_i^T ||_F^2,   w in R^d

    The loss is deterministic given the task, so a "sample" of task ``i`` is ``g_i`` itself and
    every batch of that task repeats it (``y`` is unused). The paper gives neither ``d``, the
    distribution of ``g_i`` nor the initialization; the defaults are those of the authors' code
    (github.com/JunjieYang97/GGS-MAML-DL, ``matrix_rank_train.py`` / ``linear_matrix_rank.py``):
    ``d = 20``, ``g_i ~ N(0, s_i^2 I)`` with a per-task scale ``s_i ~ U[0, sigma_max = 0.1]``, and
    ``w_0 ~ N(0, 2 / (d + 1) I)``.
    """

    dim: int = 20
    sigma_max: float = 0.1

    def init_params(self, gen: torch.Generator) -> Params:
        return {"w": torch.randn(self.dim, generator=gen) * math.sqrt(2.0 / (self.dim + 1))}

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        w = params["w"]
        diff = torch.outer(w, w) - x[:, :, None] * x[:, None, :]  # one d x d residual per sample row
        return 0.25 * diff.pow(2).sum((1, 2)).mean()

    def sample_tasks(self, num_tasks: int, gen: torch.Generator) -> Tensor:
        scale = torch.rand(num_tasks, 1, generator=gen) * self.sigma_max
        return scale * torch.randn(num_tasks, self.dim, generator=gen)

    def sample(self, tasks: Tensor, size: int, gen: torch.Generator) -> Batch:
        return tasks[:, None, :].expand(-1, size, -1), torch.zeros(tasks.shape[0], size)


@dataclass(frozen=True)
class Quadratic:
    """``l_i(w) = 1/2 ||w - c_i||^2`` with centers ``c_i ~ N(0, I_d)``: gradient ``w - c_i``, Hessian ``I``,
    so every algorithm's recursion has a closed form (the tests check the runner against it). Like
    matrix factorization, a "sample" of task i is ``c_i`` itself."""

    dim: int = 3

    def init_params(self, gen: torch.Generator) -> Params:
        return {"w": torch.randn(self.dim, generator=gen)}

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (params["w"] - x).pow(2).sum(-1).mean()

    def sample_tasks(self, num_tasks: int, gen: torch.Generator) -> Tensor:
        return torch.randn(num_tasks, self.dim, generator=gen)

    def sample(self, tasks: Tensor, size: int, gen: torch.Generator) -> Batch:
        return tasks[:, None, :].expand(-1, size, -1), torch.zeros(tasks.shape[0], size)


@dataclass(frozen=True)
class SineRegression:
    """Sine-wave regression, multistep-maml-ggs.txt Section 5.2 (after Finn et al. 2017)::

        l_i(w; X) = 1/|X| sum_{x in X} (f(w; x) - a_i sin(x + b_i))^2

    ``a_i ~ U[0.1, 5]``, ``b_i ~ U[0, pi]``, ``x ~ U[-5, 5]``; ``f`` a ReLU MLP ``1-hidden-1``
    (:func:`fedmeta.models.mlp`; ``(40, 40)`` is ``sine-mlp``). Initialization as in the authors'
    code (its ``learner.py``): Kaiming-normal weights ``N(0, 2 / fan_in)``, zero biases.
    """

    hidden: tuple[int, ...] = (40, 40)
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    init: str = "kaiming-normal"
    """``kaiming-normal`` (the GGS authors' code) or ``torch`` (``nn.Linear``'s default: weights and biases
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, drawn from the run's generator)."""

    @cached_property
    def network(self) -> nn.Module:
        return mlp((1, *self.hidden, 1), nn.ReLU)

    def init_params(self, gen: torch.Generator) -> Params:
        params = {}
        if self.init == "torch":
            fan_in = {name: p.shape[1] for name, p in self.network.named_parameters() if p.dim() == 2}
            for name, p in self.network.named_parameters():
                bound = 1.0 / math.sqrt(fan_in[name.rsplit(".", 1)[0] + ".weight"])
                params[name] = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            return params
        for name, p in self.network.named_parameters():
            if p.dim() == 2:  # a weight, [fan_out, fan_in]
                params[name] = torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / p.shape[1])
            else:
                params[name] = torch.zeros(p.shape)
        return params

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(self.network, params, (x,)), y)

    def sample_tasks(self, num_tasks: int, gen: torch.Generator) -> Tensor:
        lo, hi = torch.tensor([self.amplitude[0], self.phase[0]]), torch.tensor([self.amplitude[1], self.phase[1]])
        return lo + (hi - lo) * torch.rand(num_tasks, 2, generator=gen)

    def sample(self, tasks: Tensor, size: int, gen: torch.Generator) -> Batch:
        lo, hi = self.x_range
        x = lo + (hi - lo) * torch.rand(tasks.shape[0], size, 1, generator=gen)
        a, b = tasks[:, None, 0:1], tasks[:, None, 1:2]
        return x, a * torch.sin(x + b)


TASKS: dict[str, TaskFamily] = {
    "quadratic": Quadratic(),
    "matrix-factorization": MatrixFactorization(),
    "sine": SineRegression(),
    "sine-1x200": SineRegression(hidden=(200,)),
    "sine-table2": SineRegression(init="torch"),
}
"""Values of the ``task`` setting: Section 5.1, and Section 5.2 with its two networks; ``sine-table2`` is
the 1-40-40-1 network with PyTorch's default initialization, for localmoml Section 6.1 (which, with
Finn et al.'s alpha = 0.01 on x in [-5, 5], diverges from the Kaiming-normal start)."""


def grid_tasks() -> Tensor:
    """localmoml Section 6.1's 25 training tasks ``A sin(phi + x)``: rows ``(A, phi)``, A in {1..5}, phi = i pi/5, i = 1..5."""
    return torch.cartesian_prod(torch.arange(1.0, 6.0), torch.arange(1.0, 6.0) * math.pi / 5)


FEW_SHOT_TASKS = SineRegression(amplitude=(1.0, 5.0), phase=(math.pi / 5, math.pi))
"""localmoml Section 6.1's unseen tasks: A ~ U(1, 5), phi ~ U(pi/5, pi), x ~ U(-5, 5)."""
FEW_SHOT_SHOTS, FEW_SHOT_STEPS, FEW_SHOT_LR, FEW_SHOT_TEST = 10, 10, 0.01, 100
"""localmoml Section 6.1: adapt with 10 steps of gradient descent at lr 0.01 on 10 points, test on 100 more."""


@dataclass(frozen=True)
class FewShotSet:
    """Held-out unseen tasks with their support and test points (drawn once per run)."""

    support: Batch
    test: Batch

    @classmethod
    def draw(cls, num_tasks: int, gen: torch.Generator, test_size: int = FEW_SHOT_TEST) -> "FewShotSet":
        tasks = FEW_SHOT_TASKS.sample_tasks(num_tasks, gen)
        return cls(FEW_SHOT_TASKS.sample(tasks, FEW_SHOT_SHOTS, gen), FEW_SHOT_TASKS.sample(tasks, test_size, gen))

    @classmethod
    def authors(cls, num_tasks: int = 5, test_size: int = FEW_SHOT_TEST) -> "FewShotSet":
        """The localmoml authors' test set (sinewave/train.py lines 14-27, src/tasks.py ``sample_amp_pha`` and
        ``sample_test_data``), drawn with numpy as they draw it: task i has ``A ~ U(1, 5)``, ``phi ~ U(pi/5, pi)``
        from numpy seed i; every task's 100 test points are ``x ~ U(-5, 5)`` from numpy seed 2021, and its 10 support
        points are the same seed's first 10 draws, i.e. the first 10 test points."""
        params = [np.random.RandomState(i).uniform([1.0, math.pi / 5], [5.0, math.pi]) for i in range(num_tasks)]
        x = np.random.RandomState(2021).uniform(-5.0, 5.0, test_size)
        y = np.stack([a * np.sin(phi + x) for a, phi in params])
        xs = torch.tensor(np.broadcast_to(x, y.shape).copy(), dtype=torch.float32)[..., None]
        ys = torch.tensor(y, dtype=torch.float32)[..., None]
        return cls((xs[:, :FEW_SHOT_SHOTS], ys[:, :FEW_SHOT_SHOTS]), (xs, ys))


def few_shot_error(f: meta.LossFn, w: Params, held_out: FewShotSet, lr: float = FEW_SHOT_LR, steps: int = FEW_SHOT_STEPS) -> float:
    """localmoml Table 2's test error: every unseen task adapts w with ``steps`` full-batch gradient
    steps on its support points, then its loss on its test points; the mean over the tasks."""
    return float(few_shot_errors(f, w, held_out, lr, steps).mean())


def few_shot_errors(f: meta.LossFn, w: Params, held_out: FewShotSet, lr: float = FEW_SHOT_LR, steps: int = FEW_SHOT_STEPS) -> Tensor:
    """:func:`few_shot_error` of every task (one value per held-out task): :func:`fedmeta.personalize.adapt_and_score`
    vmapped over the tasks."""

    def one(support: Batch, test: Batch) -> Tensor:
        return adapt_and_score(f, w, support, test, lr, steps).loss

    return vmap(one)(held_out.support, held_out.test)
