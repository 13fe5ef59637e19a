"""One meta-iteration of the centralized runs (:mod:`fedmeta.centralized`): the random streams, the tasks'
batches, MOML's per-task memory, the vmapped meta-gradients of a batch of tasks (MAML, MOML, LocalMOML) and the
meta-loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from fedmeta import meta
from fedmeta.meta import Batch, Params
from fedmeta.personalize import adapt_and_score
from fedmeta.tasks import TaskFamily

if TYPE_CHECKING:
    from fedmeta.centralized import CentralizedConfig


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

    def select(self, positions: Tensor) -> "TaskBatches":
        """The batches of the tasks at ``positions`` (on the task axis)."""
        return TaskBatches(*(tuple(t.index_select(0, positions) for t in part) for part in (self.inner, self.outer, self.hessian)))

    def task(self, i: int) -> meta.MetaBatches:
        """Task ``i``'s batches as :class:`fedmeta.meta.MetaBatches`."""
        return _meta_batches(*(t[i] for t in (*self.inner, *self.outer, *self.hessian)))


def stack_tasks(batches: Sequence[Batch]) -> Batch:
    """Batches of B tasks each (``[B, k, ...]``), stacked on a new second axis: ``[B, len(batches), k, ...]``."""
    return torch.stack([x for x, _ in batches], 1), torch.stack([y for _, y in batches], 1)


def _meta_batches(ix: Tensor, iy: Tensor, ox: Tensor, oy: Tensor, hx: Tensor, hy: Tensor) -> meta.MetaBatches:
    return meta.MetaBatches(inner=tuple(zip(ix, iy)), outer=(ox, oy), hessian=tuple(zip(hx, hy)))


def draw_task_batches(
    family: TaskFamily, num_tasks: int, inner_steps: int, batch_size: int, test_batch_size: int, gen: torch.Generator
) -> TaskBatches:
    """Sample ``num_tasks`` tasks and their fresh batches, in the order tasks, inner, outer, Hessian."""
    tasks = family.sample_tasks(num_tasks, gen)
    return draw_batches(family, tasks, inner_steps, batch_size, test_batch_size, gen)


def draw_batches(
    family: TaskFamily, tasks: Tensor, inner_steps: int, batch_size: int, test_batch_size: int, gen: torch.Generator
) -> TaskBatches:
    """Fresh batches of the given tasks, in the order inner, outer, Hessian. For MOML these are S1
    (inner), S3 (outer) and S2 (Hessian) of Algorithm 1: independent batches of K samples each."""
    inner = stack_tasks([family.sample(tasks, batch_size, gen) for _ in range(inner_steps)])
    outer = family.sample(tasks, test_batch_size, gen)
    hessian = stack_tasks([family.sample(tasks, batch_size, gen) for _ in range(inner_steps)])
    return TaskBatches(inner, outer, hessian)


@dataclass
class TaskMemory:
    """MOML's personalized models ``u_i`` of all n tasks, stacked (``[n, *shape]`` per parameter: one
    copy, O(n d) memory), and which tasks have been visited. An iteration gathers the rows of its
    sampled tasks, updates them together and scatters them back; other rows are not touched."""

    rows: Params
    visited: Tensor

    @classmethod
    def empty(cls, num_tasks: int, like: Params) -> "TaskMemory":
        return cls({k: torch.zeros(num_tasks, *v.shape, dtype=v.dtype) for k, v in like.items()}, torch.zeros(num_tasks, dtype=torch.bool))

    def gather(self, ids: Tensor) -> tuple[Params, Tensor]:
        return {k: v.index_select(0, ids) for k, v in self.rows.items()}, self.visited.index_select(0, ids)

    def scatter(self, ids: Tensor, u: Params) -> None:
        for k, v in self.rows.items():
            v.index_copy_(0, ids, u[k])
        self.visited[ids] = True

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.rows.values())


def memory_age_counts(task_ids: Sequence[Sequence[int]], num_tasks: int) -> tuple[int, ...]:
    """Histogram of memory ages: entry ``a - 1`` counts the samplings of a task whose memory was last
    updated ``a`` iterations earlier (``task_ids[t]``: the tasks of iteration t + 1). With B of n tasks
    drawn uniformly the age is geometric with p = B / n (mean n / B iterations)."""
    last = [0] * num_tasks
    counts: dict[int, int] = {}
    for t, ids in enumerate(task_ids, start=1):
        for i in ids:
            if last[i]:
                counts[t - last[i]] = counts.get(t - last[i], 0) + 1
            last[i] = t
    return tuple(counts.get(a, 0) for a in range(1, max(counts, default=0) + 1))


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


def moml_directions(
    f: meta.LossFn,
    w: Params,
    u: Params,
    momentum: Tensor,
    batches: TaskBatches,
    inner_lr: float,
    estimator: meta.MetaGradient,
    gen: torch.Generator | None = None,
) -> tuple[Params, Params, Tensor]:
    """MOML's per-task work of one iteration (localmoml Algorithm 1 lines 3-7), the sampled tasks together:
    ``v_i = w_N(w; S_i1)``, ``u_i <- (1 - beta_i) u_i + beta_i v_i`` (eq. v1) and the direction
    ``(I - alpha H_i(w; S_i2)) grad L_i(u_i; S_i3)`` (one term of eq. 3), by :func:`fedmeta.meta.moml_direction`.

    ``u``: the tasks' memories stacked on a leading task axis; ``momentum``: one beta per task.
    Returns the directions and the new memories (stacked) and the losses ``L_i(u_i; S_i3)``."""

    def one(u_i: Params, beta: Tensor, ix: Tensor, iy: Tensor, ox: Tensor, oy: Tensor, hx: Tensor, hy: Tensor):
        mb = _meta_batches(ix, iy, ox, oy, hx, hy)
        d, u_new = meta.moml_direction(f, w, u_i, mb, inner_lr, beta, estimator, gen)
        return d, u_new, f(u_new, *mb.outer)

    return vmap(one, randomness="different")(u, momentum, *batches.inner, *batches.outer, *batches.hessian)


def moml_iteration(
    f: meta.LossFn,
    w: Params,
    memory: TaskMemory,
    ids: Tensor,
    batches: TaskBatches,
    cfg: CentralizedConfig,
    estimator: meta.MetaGradient,
    gen: torch.Generator | None = None,
) -> tuple[Params, Tensor]:
    """One MOML iteration's directions (localmoml Algorithm 1 lines 3-7) for the sampled tasks ``ids``, their
    memories read from and written back to ``memory``; the directions and the losses ``L_i(u_i; S_i3)`` in the
    order of ``ids``.

    A task drawn twice (``task_sampling="with-replacement"``) is visited in turn: the draws go in waves (first
    draws, second draws, ...), each wave reading the memories the previous wave wrote, all at the same ``w``.
    With ``memory_gradient="through-memory"`` each direction is multiplied by its task's beta."""
    waves = _waves(ids)
    parts, outers = [], []
    for pos in waves:
        sub_ids = ids if len(waves) == 1 else ids.index_select(0, pos)
        sub = batches if len(waves) == 1 else batches.select(pos)
        u, visited = memory.gather(sub_ids)
        # eq. (v1); a task's first visit takes v_i itself (beta = 1)
        beta = torch.where(visited, torch.tensor(float(cfg.momentum)), torch.tensor(1.0))
        d, u, outer = moml_directions(f, w, u, beta, sub, cfg.inner_lr, estimator, gen)
        if cfg.memory_gradient == "through-memory":
            d = {k: v * beta.view(-1, *([1] * (v.dim() - 1))) for k, v in d.items()}
        memory.scatter(sub_ids, u)
        parts.append(d)
        outers.append(outer)
    if len(waves) == 1:
        return parts[0], outers[0]
    order = torch.argsort(torch.cat(waves))
    return {k: torch.cat([d[k] for d in parts]).index_select(0, order) for k in parts[0]}, torch.cat(outers).index_select(0, order)


def _waves(ids: Tensor) -> list[Tensor]:
    """The positions of ``ids`` grouped by occurrence: wave j holds every id's (j+1)-th draw, in draw order."""
    seen: dict[int, int] = {}
    occurrence = []
    for i in ids.tolist():
        occurrence.append(seen.get(i, 0))
        seen[i] = occurrence[-1] + 1
    return [torch.tensor([p for p, o in enumerate(occurrence) if o == j]) for j in range(max(occurrence) + 1)]


def local_moml_models(
    f: meta.LossFn,
    w: Params,
    init: Batch,
    steps: Sequence[TaskBatches],
    inner_lr: float,
    lr: float,
    momentum: float,
    estimator: meta.MetaGradient,
    gen: torch.Generator | None = None,
) -> tuple[Params, Tensor]:
    """LocalMOML run centrally (localmoml Algorithm 3, memory reset): every sampled task resets its
    memory from w with the batches ``init`` (S0, line 5), runs ``len(steps)`` = H LocalMOML steps
    (:func:`fedmeta.meta.local_moml_step`, eqs. 7-8) and returns its local model; stacked, with the
    last step's loss ``L_i(u_i; S3)``."""

    def one(ix: Tensor, iy: Tensor, *flat: Tensor):
        u = meta.local_moml_init_memory(f, w, list(zip(ix, iy)), inner_lr, estimator)
        v = w
        for h in range(len(steps)):
            mb = _meta_batches(*flat[6 * h: 6 * h + 6])
            v, u = meta.local_moml_step(f, v, u, mb, inner_lr, lr, momentum, estimator, gen)
        return v, f(u, *mb.outer)

    flat = [t for b in steps for t in (*b.inner, *b.outer, *b.hessian)]
    return vmap(one, randomness="different")(*init, *flat)


def meta_loss(f: meta.LossFn, w: Params, batches: TaskBatches, inner_lr: float) -> float:
    """``1/B sum_i l_i(w_N^i; T_i)`` with ``w_N^i`` from N SGD steps (eq. 6) on ``S_0..S_{N-1}``: eq. (2) estimated
    (:func:`fedmeta.personalize.adapt_and_score`, one step per inner batch, vmapped over the tasks)."""

    def one(inner: Batch, outer: Batch) -> Tensor:
        return adapt_and_score(f, w, inner, outer, inner_lr).loss

    return float(vmap(one)(batches.inner, batches.outer).mean())
