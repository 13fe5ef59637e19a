"""Centralized multi-step MAML in the resampling setting (multistep-maml-ggs.txt Algorithms 1-2).

No Flower here: one process plays every task. Each meta-iteration ``k``

1. samples ``B`` tasks and, for each, fresh batches ``S_0..S_{N-1}`` (inner), ``T`` (outer) and
   ``D_0..D_{N-1}`` (Hessian), independent of each other (Section 2.2);
2. computes every task's meta-gradient ``G_i`` with :func:`fedmeta.meta.maml_gradient` -- eq. (8)
   with the estimator chosen by ``meta_gradient`` (eq. 19 for ``ggs``, eq. 17 inside eq. 8 for
   ``zeroth_order``), or FO-MuML's ``grad f(z_s)`` (fo-muml Algorithm 3) for ``fo_muml``;
3. averages them over the tasks and hands the average to the outer optimizer: with SGD this is
   eq. (7) / (19), ``w <- w - beta/B sum_i G_i``; with Adam, Adam on the same average.

The tasks of one iteration are processed together with ``torch.func.vmap`` (``randomness=
"different"``: every task draws its own Gaussian directions from the directions generator).

**Meta-loss.** Every ``eval_every`` iterations the runner records the meta-objective of eq. (2),
``L(w) = E_i l_i(w_N^i(w))``, estimated on ``eval_tasks`` held-out tasks drawn once per seed from
their own generator: N plain SGD steps (eq. 6) on fresh inner batches, then the loss on a fresh
test batch -- the paper's "meta loss (i.e. test loss)". Every estimator, FO-MuML included, is
scored with this same eq. (6) inner loop, so their curves are comparable.

**Randomness.** One ``seed`` feeds four independent ``torch.Generator`` s: the initial model, the
training tasks and batches, the Gaussian directions, and the evaluation tasks. The estimator does
not change how many tasks and batches are drawn, so for one seed all estimators see the same
tasks, the same initial model and the same evaluation set. Nothing touches the global RNG.

Two task families of multistep-maml-ggs Section 5 (:data:`TASKS`): ``matrix-factorization``
(5.1) and ``sine`` / ``sine-1x200`` (5.2).

Command line: ``python -m fedmeta.centralized --task sine --meta-gradient ggs --delta 1e-2``;
every field of :class:`CentralizedConfig` is a flag. FO-MuML is ``--meta-gradient fo_muml``, with
``--inner-steps`` as its number of anchored steps ``s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from fedmeta import meta
from fedmeta.meta import Batch, Params
from fedmeta.models import mlp

# ----------------------------------------------------------------------------------------------
# Task families


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

    @cached_property
    def network(self) -> nn.Module:
        return mlp((1, *self.hidden, 1), nn.ReLU)

    def init_params(self, gen: torch.Generator) -> Params:
        params = {}
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
    "matrix-factorization": MatrixFactorization(),
    "sine": SineRegression(),
    "sine-1x200": SineRegression(hidden=(200,)),
}
"""Values of the ``task`` setting: Section 5.1, and Section 5.2 with its two networks."""

OUTER_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
"""Values of ``outer_optimizer``: plain SGD is eq. (7) / (19); the paper uses Adam for sine regression."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CentralizedConfig:
    """One centralized meta-training run. Defaults: multistep-maml-ggs Section 5.1 (matrix factorization)."""

    task: str = "matrix-factorization"
    """Task family, one of :data:`TASKS`."""
    meta_gradient: str = "exact"
    """exact (MAML), first_order (FO-MAML), hessian_free, ggs (GGS-MAML), zeroth_order (ZO-MAML) or fo_muml (FO-MuML)."""
    inner_steps: int = 3
    """N: inner SGD steps (eq. 6); for fo_muml, s: the anchored steps of fo-muml Algorithm 3."""
    inner_lr: float = 0.01
    """alpha: inner step size."""
    meta_lr: float = 0.003
    """beta: outer (meta) step size, eq. (7) / (19); Adam's learning rate with outer_optimizer=adam."""
    outer_optimizer: str = "sgd"
    """sgd or adam."""
    tasks_per_iteration: int = 10
    """B = |B_k|: tasks per meta-iteration."""
    batch_size: int = 1
    """S = D: samples in each inner batch S_j and each Hessian batch D_j (1 for matrix factorization: g_i)."""
    test_batch_size: int = 1
    """T: samples in the outer batch T of grad f(w_N; T) and in the evaluation's test batches."""
    delta: float = 1e-2
    """ggs / zeroth_order: the Gaussian smoothing radius (eqs. 17-18); hessian_free: its finite-difference step."""
    num_directions: int = 10
    """U: Gaussian vectors per Hessian estimate (ggs, zeroth_order)."""
    iterations: int = 2000
    """K: meta-iterations."""
    eval_every: int = 50
    """Record the meta-loss every this many iterations (and before the first and after the last)."""
    eval_tasks: int = 500
    """Held-out tasks of the meta-loss estimate (drawn once per seed)."""
    seed: int = 0
    """Seeds the initial model, the training tasks and batches, the directions and the evaluation tasks."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if self.task not in TASKS:
            raise bad("task", f"one of {sorted(TASKS)}")
        meta.check_meta_gradient(self.meta_gradient, self.inner_steps, self.delta, self.num_directions)
        for name, low in (("inner_lr", 0.0), ("meta_lr", None)):  # alpha = 0 is allowed, as in the federated configs
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= low if low is not None else v > 0)
            if not ok:
                raise bad(name, "a finite number >= 0" if low is not None else "a finite number > 0")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise bad("outer_optimizer", f"one of {sorted(OUTER_OPTIMIZERS)}")
        for name in ("tasks_per_iteration", "batch_size", "test_batch_size", "iterations", "eval_every", "eval_tasks"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "an integer >= 1")
        if not (is_int(self.seed) and self.seed >= 0):
            raise bad("seed", "an integer >= 0")

    @property
    def family(self) -> TaskFamily:
        return TASKS[self.task]

    def replace(self, **changes: Any) -> "CentralizedConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "CentralizedConfig":
        """Parse snake_case or kebab-case keys; command-line strings are converted to the field's type."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown setting {key!r} (valid: {', '.join(sorted(known))})")
            kind = type(getattr(cls, name))
            try:
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError
                kwargs[name] = value if isinstance(value, kind) else kind(value)
            except ValueError:
                raise ValueError(f"{name} must be a {kind.__name__}, got {value!r}") from None
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Random streams and batches


@dataclass(frozen=True)
class Streams:
    """The independent generators of one run, all derived from its seed."""

    init: torch.Generator
    tasks: torch.Generator
    directions: torch.Generator
    evaluation: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> "Streams":
        states = np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)
        return cls(*(torch.Generator().manual_seed(int(s)) for s in states))


@dataclass(frozen=True)
class TaskBatches:
    """The independent batches of ``B`` tasks, stacked on a leading task axis (Section 2.2).

    ``inner``: ``S_0..S_{N-1}``, shapes ``[B, N, S, ...]``; ``outer``: ``T``, ``[B, T, ...]``;
    ``hessian``: ``D_0..D_{N-1}``, ``[B, N, D, ...]``.
    """

    inner: Batch
    outer: Batch
    hessian: Batch

    def task(self, i: int) -> meta.MetaBatches:
        """Task ``i``'s batches as :class:`fedmeta.meta.MetaBatches`."""
        return _meta_batches(*(t[i] for t in (*self.inner, *self.outer, *self.hessian)))


def _stack(batches: Sequence[Batch]) -> Batch:
    return torch.stack([x for x, _ in batches], 1), torch.stack([y for _, y in batches], 1)


def _meta_batches(ix: Tensor, iy: Tensor, ox: Tensor, oy: Tensor, hx: Tensor, hy: Tensor) -> meta.MetaBatches:
    return meta.MetaBatches(tuple(zip(ix, iy)), (ox, oy), tuple(zip(hx, hy)))


def draw_task_batches(
    family: TaskFamily, num_tasks: int, inner_steps: int, batch_size: int, test_batch_size: int, gen: torch.Generator
) -> TaskBatches:
    """Sample ``num_tasks`` tasks and their fresh batches, in the order tasks, inner, outer, Hessian."""
    tasks = family.sample_tasks(num_tasks, gen)
    inner = _stack([family.sample(tasks, batch_size, gen) for _ in range(inner_steps)])
    outer = family.sample(tasks, test_batch_size, gen)
    hessian = _stack([family.sample(tasks, batch_size, gen) for _ in range(inner_steps)])
    return TaskBatches(inner, outer, hessian)


# ----------------------------------------------------------------------------------------------
# One meta-iteration and the meta-loss


def task_meta_gradients(
    f: meta.LossFn,
    w: Params,
    batches: TaskBatches,
    inner_lr: float,
    estimator: meta.MetaGradient,
    gen: torch.Generator | None = None,
) -> tuple[Params, Tensor]:
    """Every task's meta-gradient ``G_i(w)`` (eq. 8, or eq. 19 for ggs) and outer loss ``l_i(w_N^i; T_i)``.

    Returns the gradients stacked on a leading task axis and the ``B`` outer losses. ``vmap`` runs
    the tasks together; ``randomness="different"`` gives each task its own directions from ``gen``.
    """

    def one(ix: Tensor, iy: Tensor, ox: Tensor, oy: Tensor, hx: Tensor, hy: Tensor) -> tuple[Params, Tensor]:
        mb = _meta_batches(ix, iy, ox, oy, hx, hy)
        g, w_n = meta.maml_gradient(f, w, mb, inner_lr, estimator, gen)
        return g, f(w_n, *mb.outer)

    return vmap(one, randomness="different")(*batches.inner, *batches.outer, *batches.hessian)


def meta_loss(f: meta.LossFn, w: Params, batches: TaskBatches, inner_lr: float) -> float:
    """``1/B sum_i l_i(w_N^i; T_i)`` with ``w_N^i`` from N SGD steps (eq. 6) on ``S_0..S_{N-1}``: eq. (2) estimated."""

    def one(ix: Tensor, iy: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
        v = w
        for batch in zip(ix, iy):
            v = meta.adapt(f, v, batch, inner_lr)
        return f(v, tx, ty)

    return float(vmap(one)(*batches.inner, *batches.outer).mean())


# ----------------------------------------------------------------------------------------------
# A run


@dataclass(frozen=True)
class RunResult:
    """The record of one run: the meta-loss curve and what it cost."""

    config: CentralizedConfig
    iterations: tuple[int, ...]
    """Iterations at which the meta-loss was recorded (0 = the initial model)."""
    meta_loss: tuple[float, ...]
    """The meta-loss on the held-out tasks at those iterations."""
    train_loss: tuple[float, ...]
    """Per iteration: the mean over the B training tasks of ``l_i(w_N^i; T_i)`` (what the authors' code logs)."""
    seconds: float
    """Wall time of the run, evaluation included."""
    cost: meta.Cost
    """Oracle calls of all meta-gradients (inner and outer gradients, HVPs, loss evaluations)."""
    diverged_at: int | None = None
    """The iteration whose update made the meta-parameters non-finite; the run stopped there."""
    params: Params | None = dataclasses.field(default=None, compare=False)
    """The final meta-parameters (not serialized)."""

    @property
    def final_meta_loss(self) -> float:
        """The last recorded meta-loss; NaN for a diverged run."""
        return float("nan") if self.diverged_at is not None else self.meta_loss[-1]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        return {**d, "config": self.config.to_dict(), "cost": dataclasses.asdict(self.cost),
                "iterations": list(self.iterations), "meta_loss": list(self.meta_loss), "train_loss": list(self.train_loss)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunResult":
        return cls(
            config=CentralizedConfig.from_mapping(d["config"]),
            iterations=tuple(d["iterations"]),
            meta_loss=tuple(d["meta_loss"]),
            train_loss=tuple(d["train_loss"]),
            seconds=d["seconds"],
            cost=meta.Cost(**d["cost"]),
            diverged_at=d["diverged_at"],
        )


def train(cfg: CentralizedConfig, *, log: Callable[[str], None] | None = None) -> RunResult:
    """Run Algorithm 1 (exact, first_order, hessian_free), Algorithm 2 (ggs), ZO-MAML or FO-MuML.

    The outer step is ``torch.optim`` on leaf tensors that no differentiated computation reads while
    they change: each iteration computes the meta-gradients on a detached view of the current
    parameters, then the optimizer steps.
    """
    t0 = time.perf_counter()
    family, streams = cfg.family, Streams.from_seed(cfg.seed)
    f = family.loss
    estimator = meta.meta_gradient(cfg.meta_gradient, delta=cfg.delta, num_directions=cfg.num_directions)
    leaves = family.init_params(streams.init)
    optimizer = OUTER_OPTIMIZERS[cfg.outer_optimizer](list(leaves.values()), lr=cfg.meta_lr)
    held_out = draw_task_batches(family, cfg.eval_tasks, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size, streams.evaluation)

    def current() -> Params:
        return {k: v.detach() for k, v in leaves.items()}

    recorded, losses, train_losses = [0], [meta_loss(f, current(), held_out, cfg.inner_lr)], []
    diverged_at, done = None, 0
    for k in range(1, cfg.iterations + 1):
        batches = draw_task_batches(
            family, cfg.tasks_per_iteration, cfg.inner_steps, cfg.batch_size, cfg.test_batch_size, streams.tasks
        )
        grads, outer = task_meta_gradients(f, current(), batches, cfg.inner_lr, estimator, streams.directions)
        for name, p in leaves.items():
            p.grad = grads[name].mean(0)  # eq. (7) / (19): the average over the B tasks
        optimizer.step()
        done = k
        train_losses.append(float(outer.mean()))
        if not all(bool(torch.isfinite(p).all()) for p in leaves.values()):
            diverged_at = k
            break
        if k % cfg.eval_every == 0 or k == cfg.iterations:
            recorded.append(k)
            losses.append(meta_loss(f, current(), held_out, cfg.inner_lr))
            if log:
                log(f"{cfg.meta_gradient} iteration {k}: meta-loss {losses[-1]:.6g}")
    return RunResult(
        config=cfg,
        iterations=tuple(recorded),
        meta_loss=tuple(losses),
        train_loss=tuple(train_losses),
        seconds=time.perf_counter() - t0,
        cost=estimator.cost(cfg.inner_steps) * (cfg.tasks_per_iteration * done),
        diverged_at=diverged_at,
        params=current(),
    )


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedmeta.centralized", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    defaults = CentralizedConfig()
    for f in fields(CentralizedConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=type(getattr(defaults, f.name)).__name__.upper(),
                       help=f"(default: {getattr(defaults, f.name)!r})")
    p.add_argument("--json", dest="json_path", default=None, help="also write the run's record to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    json_path = args.pop("json_path")
    try:
        cfg = CentralizedConfig.from_mapping({k: v for k, v in args.items() if v is not None})
    except ValueError as err:
        print(f"fedmeta.centralized: error: {err}", file=sys.stderr)
        return 2
    res = train(cfg, log=lambda line: print(line, flush=True))
    state = f"diverged at iteration {res.diverged_at}" if res.diverged_at is not None else f"final meta-loss {res.final_meta_loss:.6g}"
    print(f"{cfg.task}, {cfg.meta_gradient}: {state}; {res.seconds:.1f} s; "
          f"{res.cost.gradients} gradients, {res.cost.hvps} HVPs, {res.cost.loss_evals} loss evaluations")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res.to_dict(), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
