"""One executor for every algorithm's local round: one client (a loop of steps) or many at once (vmap).

:func:`local_round` is what a client does between two communications: build its state if it has
to (:meth:`~fedmeta.algorithms.base.Algorithm.init_state`), then ``local_steps`` times draw the
step's batches (or reuse the first step's, :meth:`~fedmeta.algorithms.base.Algorithm.draws_once`) and take the step, then check the result (the divergence guard). Its steps run on the
``torch.func`` path or on plain autograd (``step_impl``, :data:`STEP_IMPLS`); on the latter a step may
update the round's own copy of the model and state in place.

:func:`local_rounds` runs the same round for C clients that start from one meta-model, in chunks of
``chunk_size`` clients: their parameters (and states) are stacked on a leading axis and each step is
one ``torch.func.vmap`` call. Every client draws from its own generator in the order of
:func:`local_round`, so the vmapped round returns the per-client models to float round-off (the
batched matrix products sum in another order). ``vectorize="compile"`` runs the vmapped step under
``torch.compile``; ``"auto"`` does so where it measurably pays (long rounds, :mod:`fedmeta.algorithms.plan`),
and falls back to the per-client loop where vmap cannot run: an algorithm setting that refuses it (the stochastic estimators), clients
whose batches differ in shape (fewer training samples than the batch size), or a model that vmap
rejects (the failing chunk is replayed as a loop from the saved generator states, and the rest of
the round loops). ``"vmap"`` and ``"compile"`` raise instead of falling back; ``"loop"`` never vmaps (a looped client's
steps take the plain-autograd path where the algorithm has one, ``step_impl="auto"``). A client whose
loop diverges gets NaN rows, so the caller drops it (:func:`fedmeta.batched.nonfinite_rows`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.func import vmap

from fedmeta import algorithms
from fedmeta.algorithms import plan
from fedmeta.algorithms.base import Algorithm
from fedmeta.batched import DEFAULT_CHUNK_SIZE, check_vectorize, stack, stack_batches
from fedmeta.meta import LossFn, Params, Sampler

logger = logging.getLogger("fedmeta")


@dataclass(frozen=True)
class RoundStats:
    """Work done in one local round, for fair comparisons between algorithms."""

    num_samples: int
    num_gradients: int
    num_hvps: int
    last_loss: float
    num_loss_evals: int = 0


def check_finite(steps: int, **params: Params) -> None:
    """Divergence guard: raise ``FloatingPointError`` if a round's result holds NaN or Inf.

    Checked once, after the round's ``steps`` local steps: a NaN or an infinity in the model or
    the state propagates through every later step of the algorithms (each step adds to the model,
    LocalMOML's memory is a convex combination), so the result of a round that diverged at any step
    is non-finite. The caller then returns an error instead of a poisoned model (and leaves the
    kept memory at its last finite value). One summing pass per tensor: a sum is non-finite iff a
    value is (or the sum overflows, which only a diverged model's does).
    """
    for name, p in params.items():
        bad = [k for k, v in p.items() if not bool(torch.isfinite(v.sum()))]
        if bad:
            raise FloatingPointError(
                f"local training diverged within {steps} local steps: the {name} has non-finite values in {bad}; "
                "lower lr / meta-lr / inner-lr"
            )


@dataclass(frozen=True)
class LocalRound:
    """One client's round: the local meta-model, its state (``None`` for a stateless algorithm) and the work done."""

    meta_model: Params
    state: Params | None
    stats: RoundStats


@dataclass(frozen=True)
class LocalRounds:
    """C clients' round: meta-models and states stacked on a leading client axis, and per-client stats."""

    meta_models: Params
    states: Params | None
    stats: list[RoundStats]


def _detached(p: Params | None) -> Params | None:
    return None if p is None else {k: v.detach() for k, v in p.items()}


def _cloned(p: Params | None) -> Params | None:
    return None if p is None else {k: v.detach().clone() for k, v in p.items()}


def _stats(algo: Algorithm, hp: Any, fresh_state: bool, loss: float) -> RoundStats:
    c = algo.cost(hp, fresh_state=fresh_state)
    return RoundStats(num_samples=c.samples, num_gradients=c.cost.gradients, num_hvps=c.cost.hvps, last_loss=loss,
                      num_loss_evals=c.cost.loss_evals)


STEP_IMPLS = ("auto", "fast", "func")
"""How one client's steps are computed: ``fast`` is plain ``torch.autograd`` (:mod:`fedmeta.fast`,
:meth:`~fedmeta.algorithms.base.Algorithm.fast_step`), ``func`` the ``torch.func`` path of
:mod:`fedmeta.meta` (:meth:`~fedmeta.algorithms.base.Algorithm.step`), ``auto`` the fast path where the
algorithm and estimator have one, else ``func``. Both give the same numbers (tests/test_fast_step.py)."""


def resolve_step_impl(algorithm: str | Algorithm, hp: Any, step_impl: str = "auto") -> str:
    """``"fast"`` or ``"func"``: the path :func:`local_round` takes for ``hp`` when asked for ``step_impl``.

    Raises
    ------
    ValueError
        For an unknown ``step_impl``, or ``"fast"`` where the algorithm / estimator has no fast path.
    """
    if step_impl not in STEP_IMPLS:
        raise ValueError(f"step_impl must be one of {list(STEP_IMPLS)}, got {step_impl!r}")
    if step_impl == "func":
        return "func"
    refusal = algorithms.get(algorithm).fast_refusal(hp)
    if refusal and step_impl == "fast":
        raise ValueError(refusal)
    return "func" if refusal else "fast"


def local_round(algorithm: str | Algorithm, f: LossFn, w: Params, sample: Sampler, hp: Any, *, state: Params | None = None,
                gen: torch.Generator | None = None, step_impl: str = "func") -> LocalRound:
    """One client's local round of ``algorithm`` with hyper-parameters ``hp`` from the meta-model ``w``.

    Parameters
    ----------
    sample
        ``sample(k)``: a fresh batch of ``k`` samples of the client's training data.
    state
        The state kept from the client's last round (used only when the algorithm keeps state under
        ``hp``); ``None`` builds a fresh one.
    gen
        Random directions of the ``ggs`` / ``zeroth_order`` estimators.
    step_impl
        ``"func"`` (default), ``"fast"`` or ``"auto"``: see :data:`STEP_IMPLS`. The batches are drawn
        the same way on both paths.

    Raises
    ------
    FloatingPointError
        If the round's model or state holds NaN or Inf (the divergence guard, :func:`check_finite`).
    """
    algo = algorithms.get(algorithm)
    use_fast = resolve_step_impl(algo, hp, step_impl) == "fast"
    init_state, take_step = (algo.fast_init_state, algo.fast_step) if use_fast else (algo.init_state, algo.step)
    # The fast path's steps may update the round's tensors in place: they get a private copy.
    own = _cloned if use_fast else _detached
    w = own(w)
    if not algo.keeps_state(hp):
        state = None
    fresh = algo.stateful and state is None
    if fresh:
        state = init_state(f, w, algo.draw_init(sample, hp), hp)
    state = own(state)
    batches: tuple = ()
    once = algo.draws_once(hp)
    for h in range(hp.local_steps):
        if h == 0 or not once:
            batches = algo.draw(sample, hp)
        w, state = take_step(f, w, state, batches, hp, gen)
        w, state = _detached(w), _detached(state)
    # NaN and Inf propagate through every later step, so one check of the round's result finds a divergence.
    check_finite(hp.local_steps, **{algo.model_label: w}, **({algo.state_label: state} if state is not None else {}))
    loss = float(algo.train_loss(f, w, state, batches).detach())
    return LocalRound(w, state, _stats(algo, hp, fresh, loss))


# --- many clients ----------------------------------------------------------------------------------


class _Ragged(Exception):
    """The clients of a chunk drew batches of different shapes: run the chunk as a loop."""


def _stacked(per_client: Sequence[Any]) -> Any:
    out = stack_batches(per_client)
    if out is None:
        raise _Ragged
    return out


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def local_rounds(
    algorithm: str | Algorithm,
    f: LossFn,
    w: Params,
    samplers: Sequence[Sampler],
    gens: Sequence[torch.Generator],
    hp: Any,
    *,
    states: Params | None = None,
    has_state: Sequence[bool] | None = None,
    direction_gens: Sequence[torch.Generator | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vectorize: str = "auto",
    workload: Any = None,
) -> LocalRounds:
    """:func:`local_round` for C clients that all start from the meta-model ``w``.

    Parameters
    ----------
    samplers, gens
        Per client: ``sample(k)`` drawing from that client's training data with the generator
        ``gens[i]`` (saved and restored if a chunk has to be replayed as a loop).
    states, has_state
        The clients' kept states stacked ``[C, ...]`` (``None`` if no client has one) and, per
        client, whether its row is one (else a fresh state is built, as :func:`local_round` does).
    direction_gens
        Per client, the generator of ``ggs`` / ``zeroth_order`` directions.
    chunk_size, vectorize
        See the module docstring.
    workload
        What ``f`` computes, hashable, if ``f`` is rebuilt every round for the same model and loss (a ClientApp
        builds its model per message): ``vectorize="auto"`` measures once per workload and process, and reuses a
        compiled step, keyed by it (:mod:`fedmeta.algorithms.plan`). ``None``: ``f`` itself.
    """
    algo = algorithms.get(algorithm)
    check_vectorize(vectorize, chunk_size)
    n = len(samplers)
    if not algo.keeps_state(hp):
        states, has_state = None, None
    has_state = list(has_state) if has_state is not None else [False] * n
    if len(has_state) != n or (states is None and any(has_state)):
        raise ValueError(f"has_state must hold one flag per client ({n}) and states must be given if any is True")
    dgens = list(direction_gens) if direction_gens is not None else [None] * n
    refusal = algo.vmap_refusal(hp)
    if vectorize in ("vmap", "compile") and refusal:
        raise ValueError(refusal)
    mode = {"vectorize": "loop" if refusal else vectorize}

    def one(i: int) -> tuple[Params, Params | None, float]:
        """Client i on its own; a diverged client gets NaN rows (its caller leaves it out)."""
        si = {k: v[i] for k, v in states.items()} if has_state[i] else None
        try:
            r = local_round(algo, f, w, samplers[i], hp, state=si, gen=dgens[i], step_impl="auto")
            return r.meta_model, r.state, r.stats.last_loss
        except FloatingPointError as err:
            logger.warning("%s", err)
            nan = {k: torch.full_like(v, float("nan")) for k, v in w.items()}
            return nan, (nan if algo.stateful else None), float("nan")

    def looped(chunk: range) -> tuple[Params, Params | None, list[float]]:
        outs = [one(i) for i in chunk]
        return stack([o[0] for o in outs]), (stack([o[1] for o in outs]) if algo.stateful else None), [o[2] for o in outs]

    def raw_step(wi: Params, si: Params | None, b: Any) -> Any:
        return algo.step(f, wi, si, b, hp) if algo.stateful else algo.step(f, wi, None, b, hp)[0]

    def vmapped_step() -> Any:
        return vmap(raw_step) if algo.stateful else vmap(lambda wi, b: raw_step(wi, None, b))

    vstep = vmapped_step()
    loss_key = f if workload is None else workload
    step_key = (algo.name, hp, loss_key)
    sizes = getattr(hp, "STEP_SIZES", ())
    family = (algo.name, tuple((k, v) for k, v in vars(hp).items() if k not in sizes and not k.startswith("_")), loss_key)

    def compiled() -> Any:
        if hasattr(hp, "estimator"):
            hp.estimator()  # built before tracing: the compiled step reads it as a constant
        return plan.compiled_step(step_key, vmapped_step(), family)


    vinit = vmap(lambda wi, b: algo.init_state(f, wi, b, hp), in_dims=(None, 0))
    vloss = vmap(lambda wi, si, b: algo.train_loss(f, wi, si, b), in_dims=(0, 0 if algo.stateful else None, 0))

    def vmapped(chunk: range) -> tuple[Params, Params | None, list[float]]:
        c = len(chunk)
        sc = None
        if algo.stateful:
            fresh = [j for j, i in enumerate(chunk) if not has_state[i]]
            init_batches = [algo.draw_init(samplers[chunk[j]], hp) for j in fresh]  # each client's first draws
            if states is not None:
                sc = {k: states[k][chunk.start:chunk.stop].clone() for k in w}
            else:
                sc = {k: torch.zeros(c, *v.shape, dtype=v.dtype, device=v.device) for k, v in w.items()}
            if fresh:
                built = vinit(w, _stacked(init_batches))
                idx = torch.tensor(fresh, device=next(iter(w.values())).device)
                for k in sc:
                    sc[k][idx] = built[k].detach()
        wc = {k: v.expand(c, *v.shape).clone() for k, v in w.items()}  # contiguous: every step sees the same strides
        drawn = None
        once = algo.draws_once(hp)
        run = vstep
        for h in range(hp.local_steps):
            if h == 0 or not once:
                drawn = _stacked([algo.draw(samplers[i], hp) for i in chunk])
            if h == 0 and mode["vectorize"] == "compile":
                run = compiled()
            elif h == 0 and mode["vectorize"] == "auto":
                call = (lambda fn: (lambda: fn(wc, sc, drawn))) if algo.stateful else (lambda fn: (lambda: fn(wc, drawn)))
                candidate = (lambda: call(compiled())()) if plan.may_compile(step_key, family) else None
                chosen = plan.choose((step_key, c), call(vstep), candidate, hp.local_steps, algo.name)
                run = compiled() if chosen.impl == "compile" else vstep
            if algo.stateful:
                wc, sc = run(wc, sc, drawn)
                sc = _detached(sc)
            else:
                wc = run(wc, drawn)
            wc = _detached(wc)
        with torch.no_grad():
            losses = [float(v) for v in vloss(wc, sc, drawn)]
        return wc, sc, losses

    parts = []
    for chunk in _chunks(n, chunk_size):
        if mode["vectorize"] == "loop":
            parts.append(looped(chunk))
            continue
        saved = [gens[i].get_state() for i in chunk]
        try:
            parts.append(vmapped(chunk))
        except Exception as err:  # noqa: BLE001 -- vmap's failures are RuntimeError, NotImplementedError, ...
            if mode["vectorize"] in ("vmap", "compile") and not isinstance(err, _Ragged):
                raise
            for i, s in zip(chunk, saved):  # replay the chunk's draws in the loop
                gens[i].set_state(s)
            if not isinstance(err, _Ragged):
                logger.warning("vmap failed (%s: %s); running the clients one by one", type(err).__name__, err)
                mode["vectorize"] = "loop"
            parts.append(looped(chunk))
    models = {k: torch.cat([p[0][k] for p in parts]) for k in w}
    kept = {k: torch.cat([p[1][k] for p in parts]) for k in w} if algo.stateful else None
    losses = [loss for p in parts for loss in p[2]]
    stats = [_stats(algo, hp, algo.stateful and not has_state[i], loss) for i, loss in enumerate(losses)]
    return LocalRounds(models, kept, stats)


__all__ = ["LocalRound", "LocalRounds", "RoundStats", "check_finite", "STEP_IMPLS", "local_round", "local_rounds", "resolve_step_impl"]
