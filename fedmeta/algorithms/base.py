"""What an algorithm is in fedmeta: one unit with its config, its batch draws, its step and its state.

An :class:`Algorithm` says, in one place:

* ``config``: its hyper-parameters, a frozen dataclass (:class:`~fedmeta.config.WireConfig`) with the
  wire keys, the defaults, the validation and the papers' symbols in its docstrings;
* :meth:`~Algorithm.draw`: the batches of one local step, drawn in the paper's order (the only
  place that order lives);
* :meth:`~Algorithm.step`: one local step, written as the paper's equations;
* its per-client state (LocalMOML's memory u; none for the others): :meth:`~Algorithm.draw_init`
  and :meth:`~Algorithm.init_state` build it, :meth:`~Algorithm.keeps_state` says whether a client
  stores it between rounds;
* :meth:`~Algorithm.cost`: the samples and oracle calls of one local round.

The executor (:mod:`fedmeta.algorithms.executor`) runs any algorithm's local round, for one client
(a loop of steps) or for many clients at once (``torch.func.vmap``). Register an algorithm with
:func:`fedmeta.algorithms.register` and the clients run it by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedmeta import fast, meta
from fedmeta.config import HP, WireConfig
from fedmeta.meta import Batch, Cost, LossFn, MetaBatches, Params, Sampler

Batches = tuple
"""The batches of one local step: a tuple whose leaves are ``(x, y)`` batches (nested tuples allowed),
so that the batches of many clients stack leaf by leaf for ``vmap``."""

VMAP_ESTIMATORS = tuple(n for n in meta.META_GRADIENTS if meta.meta_gradient(n).vmappable)
"""Estimators computed under ``vmap``; the stochastic ones (``ggs``, ``zeroth_order``) draw their
directions per client and run as a loop."""


@dataclass(frozen=True)
class RoundCost:
    """Samples drawn and oracle calls of one client's local round."""

    samples: int
    cost: Cost


class Algorithm:
    """Base of the algorithm units (see the module docstring). Subclasses set ``name``, ``config``
    and implement :meth:`draw`, :meth:`step`, :meth:`train_loss` and :meth:`cost`; a stateful one
    also sets ``state_label`` and implements :meth:`draw_init` and :meth:`init_state`."""

    name: ClassVar[str]
    """The registry name and the value of the ``algorithm`` config key."""
    config: ClassVar[type]
    """The hyper-parameter dataclass (a :class:`~fedmeta.config.WireConfig`)."""
    model_label: ClassVar[str] = "meta_model"
    """How errors name the model the round trains."""
    state_label: ClassVar[str | None] = None
    """How errors name the per-client state (``None``: the algorithm has none)."""

    @property
    def stateful(self) -> bool:
        return self.state_label is not None

    def keeps_state(self, hp: Any) -> bool:
        """Whether a client stores its state after a round and starts the next one from it."""
        return False

    def vmap_refusal(self, hp: Any) -> str | None:
        """Why a round of ``hp`` cannot run under ``vmap`` (it then runs as a loop), or ``None``."""
        return None

    def draw_init(self, sample: Sampler, hp: Any) -> Batches:
        """The batches :meth:`init_state` needs, drawn before the first step."""
        return ()

    def init_state(self, f: LossFn, w: Params, batches: Batches, hp: Any) -> Params:
        raise NotImplementedError(f"{self.name} has no per-client state")

    def draw(self, sample: Sampler, hp: Any) -> Batches:
        """The batches of one local step, in the paper's order."""
        raise NotImplementedError

    def draws_once(self, hp: Any) -> bool:
        """Whether the batches of a round's first step serve all its local steps (else each step draws its own)."""
        return False

    def step(self, f: LossFn, w: Params, state: Params | None, batches: Batches, hp: Any,
             gen: torch.Generator | None = None) -> tuple[Params, Params | None]:
        """One local step: the new meta-model and state. ``gen``: random directions (``ggs``, ``zeroth_order``)."""
        raise NotImplementedError

    def train_loss(self, f: LossFn, w: Params, state: Params | None, batches: Batches) -> torch.Tensor:
        """The loss a client reports after its round (on the last step's batches)."""
        raise NotImplementedError

    # The single-client fast path (:mod:`fedmeta.fast`): optional, same math without torch.func.

    def fast_refusal(self, hp: Any) -> str | None:
        """Why a one-client round of ``hp`` cannot take the plain-autograd fast path (it then runs
        :meth:`step`), or ``None``. By default: whether the unit implements :meth:`fast_step`."""
        if type(self).fast_step is Algorithm.fast_step:
            return f"{self.name} has no plain-autograd fast step"
        return None

    def fast_step(self, f: LossFn, w: Params, state: Params | None, batches: Batches, hp: Any,
                  gen: torch.Generator | None = None) -> tuple[Params, Params | None]:
        """:meth:`step` computed with plain ``torch.autograd`` (one client, no ``vmap``): the same result.
        ``w`` and ``state`` are the round's own copies (:func:`~fedmeta.algorithms.executor.local_round`):
        the step may update them in place and return them (:func:`fedmeta.fast.descend_`)."""
        raise NotImplementedError

    def fast_init_state(self, f: LossFn, w: Params, batches: Batches, hp: Any) -> Params:
        """:meth:`init_state` on the fast path (by default :meth:`init_state` itself)."""
        return self.init_state(f, w, batches, hp)

    def cost(self, hp: Any, *, fresh_state: bool) -> RoundCost:
        """Samples and oracle calls of one round (``fresh_state``: the state was built this round)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<algorithm {self.name!r} ({self.config.__name__})>"


# --- what Per-FedAvg and LocalMOML share: the meta-gradient estimator (multistep-maml-ggs Section 2.2)


@dataclass(frozen=True)
class EstimatorConfig(WireConfig):
    """The meta-gradient estimator fields of the MAML-type algorithms (:func:`fedmeta.meta.meta_gradient`)
    and how their batches are drawn."""

    inner_steps: int = HP.inner_steps.field()
    meta_gradient: str = HP.meta_gradient.field()
    delta: float = HP.delta.field()
    num_directions: int = HP.num_directions.field()
    outer_batch_size: int = HP.outer_batch_size.field()
    batch_draws: str = HP.batch_draws.field()

    @property
    def outer_size(self) -> int:
        """Samples in the outer batch."""
        return self.outer_batch_size or self.batch_size  # type: ignore[attr-defined]

    def estimator(self) -> meta.MetaGradient:
        """The estimator of these settings, built once per config (kept in the instance's ``__dict__``, outside the
        dataclass fields): a compiled step (``vectorize="compile"``) then reads it as a constant."""
        est = self.__dict__.get("_estimator")
        if est is None:
            est = meta.meta_gradient(self.meta_gradient, delta=self.delta, num_directions=self.num_directions)
            object.__setattr__(self, "_estimator", est)
        return est


class MAMLAlgorithm(Algorithm):
    """An algorithm whose step needs a meta-gradient: vmapped unless its estimator is stochastic."""

    def vmap_refusal(self, hp: EstimatorConfig) -> str | None:
        if hp.estimator().vmappable:
            return None
        return (f"vectorize='vmap' supports meta_gradient in {list(VMAP_ESTIMATORS)}, got {hp.meta_gradient!r} "
                "(its random directions are drawn per client: use vectorize='auto' or 'loop')")

    def fast_refusal(self, hp: EstimatorConfig) -> str | None:
        return super().fast_refusal(hp) or fast.refusal(hp.estimator())

    def draws_once(self, hp: EstimatorConfig) -> bool:
        return hp.batch_draws == "per-round"

    def round_samples(self, hp: EstimatorConfig) -> int:
        """Samples the local steps of one round draw: 2N batches of ``batch_size`` and one outer batch per
        draw (:meth:`meta_batches`), one draw per step or one per round (:meth:`draws_once`)."""
        per_draw = 2 * hp.inner_steps * hp.batch_size + hp.outer_size  # type: ignore[attr-defined]
        return per_draw * (1 if self.draws_once(hp) else hp.local_steps)  # type: ignore[attr-defined]

    @staticmethod
    def meta_batches(sample: Sampler, hp: EstimatorConfig, *, order: str) -> Batches:
        """N inner and N Hessian batches of ``hp.batch_size`` and one outer batch of ``hp.outer_size``,
        returned as ``(inner, outer, hessian)`` and drawn in ``order`` (``"inner,outer,hessian"`` or
        ``"inner,hessian,outer"``: the papers differ)."""
        drawn: dict[str, Any] = {}
        for part in order.split(","):
            drawn[part] = (sample(hp.outer_size) if part == "outer"
                           else tuple(sample(hp.batch_size) for _ in range(hp.inner_steps)))  # type: ignore[attr-defined]
        return drawn["inner"], drawn["outer"], drawn["hessian"]


def as_meta_batches(batches: Batches) -> MetaBatches:
    """The ``(inner, outer, hessian)`` tuple of :meth:`MAMLAlgorithm.meta_batches` (a tuple, so that many
    clients' draws stack for ``vmap``) as :class:`~fedmeta.meta.MetaBatches`."""
    inner, outer, hessian = batches
    return MetaBatches(inner=tuple(inner), outer=outer, hessian=tuple(hessian))


__all__ = ["Algorithm", "Batch", "Batches", "EstimatorConfig", "MAMLAlgorithm", "RoundCost", "VMAP_ESTIMATORS", "as_meta_batches"]
