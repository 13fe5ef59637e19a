"""Many clients' local rounds at once: the meta-steps of a group of clients in one vectorized call.

A node that hosts many clients (tasks) stacks the parameters of the clients it runs on a leading
axis and computes their meta-steps together with ``torch.func.vmap`` (the LocalMOML experiments
ran ~12 tasks per GPU the same way, localmoml Section 6.2). Each client keeps its own batches and
its own random stream, drawn in exactly the order of the per-client functions
(:func:`fedmeta.meta.per_fedavg_round`, :func:`fedmeta.meta.local_moml_round`), so the batched
round returns the same models as running the clients one by one, to float round-off (the
batched matrix products sum in another order).

* Clients are processed in chunks of ``chunk_size``, which bounds memory (the second-order graph
  of a chunk is alive at once; see ``shared/perf-anchors.md`` A4 for what vmap costs per client).
* ``vectorize="auto"`` (the default) vmaps when it can and falls back to a plain per-client loop
  when it cannot: for the stochastic estimators (``ggs``, ``zeroth_order``, whose random
  directions come from each client's own generator), for clients whose batches differ in shape
  (fewer training samples than the batch size), and for a model that ``vmap`` rejects (the first
  failing chunk is retried as a loop after restoring every client's generator, and the rest of
  the round runs as a loop). ``"vmap"`` raises instead of falling back; ``"loop"`` never vmaps.

No Flower import here: the ``ClientApp`` in :mod:`fedmeta.clients.app` calls these functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from fedmeta import meta
from fedmeta.meta import Batch, LossFn, MetaBatches, MetaGradient, Params, RoundStats, Sampler

logger = logging.getLogger("fedmeta")

VECTORIZE = ("auto", "vmap", "loop")
"""Values of the ``vectorize`` setting."""
VMAP_ESTIMATORS = ("exact", "first_order", "hessian_free", "fo_muml")
"""Estimators computed under ``vmap``; the stochastic ones (``ggs``, ``zeroth_order``) loop."""
DEFAULT_CHUNK_SIZE = 100
"""Clients per vectorized call (perf-anchors A2: vmap gains saturate near 100 clients for the MLPs)."""


def check_vectorize(vectorize: str, chunk_size: int) -> None:
    """Validate the batching settings; ``ValueError`` names the field and its allowed range."""
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {list(VECTORIZE)}, got {vectorize!r}")
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"chunk_size (clients per vectorized call) must be an integer >= 1, got {chunk_size!r}")


def stack(params: Sequence[Params]) -> Params:
    """Stack parameter dicts on a new leading (client) axis."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def unstack(params: Params) -> list[Params]:
    """The inverse of :func:`stack`: one dict per client (views)."""
    n = next(iter(params.values())).shape[0]
    return [{k: v[i] for k, v in params.items()} for i in range(n)]


def _stack_batches(batches: Sequence[Batch]) -> Batch | None:
    """``(x [C, K, ...], y [C, K, ...])``, or ``None`` if the clients' batches differ in shape."""
    shapes = {(tuple(x.shape), tuple(y.shape)) for x, y in batches}
    if len(shapes) != 1:
        return None
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


def _stack_meta_batches(per_client: Sequence[MetaBatches]) -> tuple | None:
    """The clients' :class:`MetaBatches` as stacked ``(inner, outer, hessian)`` tuples for vmap."""
    n = len(per_client[0].inner)
    inner = [_stack_batches([mb.inner[j] for mb in per_client]) for j in range(n)]
    outer = _stack_batches([mb.outer for mb in per_client])
    hessian = [_stack_batches([mb.hessian[j] for mb in per_client]) for j in range(n)]
    if outer is None or any(b is None for b in inner + hessian):
        return None
    return tuple(inner), outer, tuple(hessian)


class _Ragged(Exception):
    """The clients of a chunk drew batches of different shapes: run the chunk as a loop."""


@dataclass
class _Plan:
    """How the remaining chunks of a round run, decided once (``auto`` falls back at most once)."""

    vectorize: str
    estimator: MetaGradient

    @property
    def use_vmap(self) -> bool:
        return self.vectorize != "loop" and self.estimator.name in VMAP_ESTIMATORS


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _run_chunked(
    n: int,
    chunk_size: int,
    plan: _Plan,
    gens: Sequence[torch.Generator],
    vmapped: Callable[[range], tuple],
    looped: Callable[[range], tuple],
) -> list[tuple]:
    """Run every chunk vmapped if the plan allows, else looped; ``auto`` falls back to the loop."""
    if plan.vectorize == "vmap" and not plan.use_vmap:
        raise ValueError(
            f"vectorize='vmap' supports meta_gradient in {list(VMAP_ESTIMATORS)}, got {plan.estimator.name!r} "
            "(its random directions are drawn per client: use vectorize='auto' or 'loop')"
        )
    out = []
    for chunk in _chunks(n, chunk_size):
        if not plan.use_vmap:
            out.append(looped(chunk))
            continue
        states = [gens[i].get_state() for i in chunk]
        try:
            out.append(vmapped(chunk))
        except Exception as err:  # noqa: BLE001 -- vmap's failures are RuntimeError, NotImplementedError, ...
            if plan.vectorize == "vmap" and not isinstance(err, _Ragged):
                raise
            for i, s in zip(chunk, states):  # replay the chunk's draws in the loop
                gens[i].set_state(s)
            if not isinstance(err, _Ragged):
                logger.warning("vmap failed (%s: %s); running the clients one by one", type(err).__name__, err)
                plan.vectorize = "loop"
            out.append(looped(chunk))
    return out


def _guarded(run: Callable[[], tuple], w: Params, num_models: int) -> tuple:
    """One client's round in the loop path; a client whose training diverges
    (``FloatingPointError`` from the divergence guard) gets all-NaN rows, so that the group's
    caller drops it like a diverged client of the vmapped path instead of failing the whole group."""
    try:
        return run()
    except FloatingPointError as err:
        logger.warning("%s", err)
        nan = {k: torch.full_like(v, float("nan")) for k, v in w.items()}
        stats = RoundStats(num_samples=0, num_gradients=0, num_hvps=0, last_loss=float("nan"))
        return (*([nan] * num_models), stats)


def _last_losses(f: LossFn, w: Params, outer: Batch) -> list[float]:
    with torch.no_grad():
        return [float(v) for v in vmap(f)(w, *outer)]


# ----------------------------------------------------------------------------------------------
# Per-FedAvg


def per_fedavg_rounds(
    f: LossFn,
    w: Params,
    samplers: Sequence[Sampler],
    gens: Sequence[torch.Generator],
    *,
    local_steps: int,
    batch_size: int,
    inner_lr: float,
    meta_lr: float,
    estimator: MetaGradient = meta.EXACT,
    inner_steps: int = 1,
    direction_gens: Sequence[torch.Generator | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vectorize: str = "auto",
) -> tuple[Params, list[RoundStats]]:
    """:func:`fedmeta.meta.per_fedavg_round` for C clients that all start from the meta-model ``w``.

    Parameters
    ----------
    samplers, gens
        Per client: ``sample(k)`` drawing from that client's training data with the generator
        ``gens[i]`` (which is saved and restored if a chunk has to be replayed as a loop).
    direction_gens
        Per client, the generator of ``ggs`` / ``zeroth_order`` directions (as ``gen`` of the
        per-client function); ignored by the other estimators.
    chunk_size, vectorize
        See the module docstring.

    Returns
    -------
    The clients' local meta-models stacked on a leading axis ``[C, ...]``, and their round statistics.
    """
    check_vectorize(vectorize, chunk_size)
    n = len(samplers)
    dgens = list(direction_gens) if direction_gens is not None else [None] * n
    plan = _Plan(vectorize, estimator)

    def step(wi: Params, inner, outer, hessian) -> Params:
        return meta.per_fedavg_step(f, wi, MetaBatches(inner, outer, hessian), inner_lr, meta_lr, estimator)

    vstep = vmap(step)

    def vmapped(chunk: range) -> tuple:
        wc = {k: v.expand(len(chunk), *v.shape) for k, v in w.items()}
        for _ in range(local_steps):
            drawn = _stack_meta_batches([MetaBatches.draw(samplers[i], inner_steps, batch_size) for i in chunk])
            if drawn is None:
                raise _Ragged
            wc = {k: v.detach() for k, v in vstep(wc, *drawn).items()}
        return wc, _last_losses(f, wc, drawn[1])

    def looped(chunk: range) -> tuple:
        outs = [
            _guarded(lambda i=i: meta.per_fedavg_round(
                f, w, samplers[i], local_steps=local_steps, batch_size=batch_size, inner_lr=inner_lr, meta_lr=meta_lr,
                estimator=estimator, inner_steps=inner_steps, gen=dgens[i]), w, 1)
            for i in chunk
        ]
        return stack([o[0] for o in outs]), [o[1].last_loss for o in outs]

    parts = _run_chunked(n, chunk_size, plan, gens, vmapped, looped)
    models = {k: torch.cat([p[0][k] for p in parts]) for k in w}
    cost = estimator.cost(inner_steps) * local_steps
    stats = [
        RoundStats(num_samples=(2 * inner_steps + 1) * batch_size * local_steps, num_gradients=cost.gradients,
                   num_hvps=cost.hvps, last_loss=loss, num_loss_evals=cost.loss_evals)
        for p in parts for loss in p[1]
    ]
    return models, stats


# ----------------------------------------------------------------------------------------------
# LocalMOML


def local_moml_rounds(
    f: LossFn,
    w: Params,
    u: Params | None,
    has_memory: Sequence[bool],
    samplers: Sequence[Sampler],
    gens: Sequence[torch.Generator],
    *,
    local_steps: int,
    batch_size: int,
    init_batch_size: int,
    inner_lr: float,
    lr: float,
    momentum: float,
    estimator: MetaGradient = meta.EXACT,
    inner_steps: int = 1,
    direction_gens: Sequence[torch.Generator | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vectorize: str = "auto",
) -> tuple[Params, Params, list[RoundStats]]:
    """:func:`fedmeta.meta.local_moml_round` for C clients that start from the meta-model ``w``.

    Parameters
    ----------
    u, has_memory
        The clients' kept memories stacked ``[C, ...]`` (``None`` if no client has one) and, per
        client, whether its row is a memory (``keep`` policy) or must be rebuilt from ``S0``
        (Algorithm 3 line 5: the ``reset`` policy and a client's first round).
    samplers, gens, direction_gens, chunk_size, vectorize
        As for :func:`per_fedavg_rounds`.

    Returns
    -------
    The stacked meta-models ``w`` and memories ``u`` after the round, and the round statistics.
    """
    check_vectorize(vectorize, chunk_size)
    n = len(samplers)
    if len(has_memory) != n or (u is None and any(has_memory)):
        raise ValueError(f"has_memory must hold one flag per client ({n}) and u must be given if any is True")
    dgens = list(direction_gens) if direction_gens is not None else [None] * n
    plan = _Plan(vectorize, estimator)

    def step(wi: Params, ui: Params, inner, outer, hessian) -> tuple[Params, Params]:
        return meta.local_moml_step(f, wi, ui, MetaBatches(inner, outer, hessian), inner_lr, lr, momentum, estimator)

    def init(wi: Params, s0) -> Params:
        return meta.local_moml_init_memory(f, wi, s0, inner_lr, estimator)

    vstep, vinit = vmap(step), vmap(init, in_dims=(None, 0))

    def draw(i: int) -> MetaBatches:
        # Algorithm 3's draw order S1, S2, S3, as in local_moml_round
        inner = tuple(samplers[i](batch_size) for _ in range(inner_steps))
        hessian = tuple(samplers[i](batch_size) for _ in range(inner_steps))
        return MetaBatches(inner, samplers[i](batch_size), hessian)

    def vmapped(chunk: range) -> tuple:
        c = len(chunk)
        fresh = [j for j, i in enumerate(chunk) if not has_memory[i]]
        s0 = [[samplers[chunk[j]](init_batch_size) for _ in range(inner_steps)] for j in fresh]
        if u is not None:
            uc = {k: u[k][chunk.start:chunk.stop].clone() for k in w}
        else:
            uc = {k: torch.zeros(c, *v.shape, dtype=v.dtype, device=v.device) for k, v in w.items()}
        if fresh:
            stacked = [_stack_batches([s[j] for s in s0]) for j in range(inner_steps)]
            if any(b is None for b in stacked):
                raise _Ragged
            init_u = vinit(w, tuple(stacked))
            idx = torch.tensor(fresh, device=next(iter(w.values())).device)
            for k in uc:
                uc[k][idx] = init_u[k].detach()
        wc = {k: v.expand(c, *v.shape) for k, v in w.items()}
        for _ in range(local_steps):
            drawn = _stack_meta_batches([draw(i) for i in chunk])
            if drawn is None:
                raise _Ragged
            wc, uc = vstep(wc, uc, *drawn)
            wc, uc = {k: v.detach() for k, v in wc.items()}, {k: v.detach() for k, v in uc.items()}
        return wc, uc, _last_losses(f, uc, drawn[1])

    def looped(chunk: range) -> tuple:
        outs = []
        for i in chunk:
            ui = {k: v[i] for k, v in u.items()} if has_memory[i] else None
            outs.append(_guarded(lambda i=i, ui=ui: meta.local_moml_round(
                f, w, ui, samplers[i], local_steps=local_steps, batch_size=batch_size, init_batch_size=init_batch_size,
                inner_lr=inner_lr, lr=lr, momentum=momentum, estimator=estimator, inner_steps=inner_steps, gen=dgens[i]),
                w, 2))
        return stack([o[0] for o in outs]), stack([o[1] for o in outs]), [o[2].last_loss for o in outs]

    parts = _run_chunked(n, chunk_size, plan, gens, vmapped, looped)
    models = {k: torch.cat([p[0][k] for p in parts]) for k in w}
    memories = {k: torch.cat([p[1][k] for p in parts]) for k in w}
    losses = [loss for p in parts for loss in p[2]]
    step_cost = estimator.cost(inner_steps) * local_steps
    stats = []
    for i, loss in enumerate(losses):
        init_samples, init_grads = (0, 0) if has_memory[i] else (init_batch_size * inner_steps, inner_steps)
        stats.append(RoundStats(
            num_samples=init_samples + (2 * inner_steps + 1) * batch_size * local_steps,
            num_gradients=init_grads + step_cost.gradients, num_hvps=step_cost.hvps, last_loss=loss,
            num_loss_evals=step_cost.loss_evals))
    return models, memories, stats


def weighted_mean(stacked: Params, weights: Sequence[float] | Tensor) -> Params:
    """``sum_i weights_i * stacked_i / sum_i weights_i`` per key (over the leading client axis).

    Summed in the parameters' dtype with torch's cascade summation (relative error ~1e-7 for
    float32, independent of the number of clients to first order); the strategy then averages the
    nodes' means in float64.
    """
    wt = torch.as_tensor(weights, dtype=torch.float64)
    wt = (wt / wt.sum()).to(torch.float32)
    out = {}
    for k, v in stacked.items():
        shape = (-1,) + (1,) * (v.dim() - 1)
        out[k] = (v * wt.to(device=v.device, dtype=v.dtype).view(shape)).sum(0)
    return out


def nonfinite_rows(stacked: Params) -> list[int]:
    """Indices of the clients (rows) with a NaN or infinite value in any parameter.

    One summing pass per key: a row's sum is non-finite iff the row holds a NaN or an infinity
    (or sums past the dtype's range, which only a diverged model does).
    """
    bad = None
    for v in stacked.values():
        rows = ~torch.isfinite(v.reshape(v.shape[0], -1).sum(1))
        bad = rows if bad is None else bad | rows
    return [] if bad is None else torch.nonzero(bad).flatten().tolist()
