"""Per-FedAvg (Fallah et al. 2020), per-fedavg.txt Algorithm 1, with an N-step inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta.algorithms.base import Batches, EstimatorConfig, MAMLAlgorithm, RoundCost, as_meta_batches
from fedmeta.config import HP


@dataclass(frozen=True)
class PerFedAvgConfig(EstimatorConfig):
    """Per-FedAvg client hyper-parameters (per-fedavg.txt Algorithm 1, eqs. 8-9): alpha, beta, tau and
    |D| = |D'| = |D''|, with the estimator's settings (:class:`~fedmeta.algorithms.base.EstimatorConfig`)."""

    inner_lr: float = HP.inner_lr.field()
    meta_lr: float = HP.meta_lr.field()
    local_steps: int = HP.local_steps.field(symbol="tau")
    batch_size: int = HP.batch_size.field()

    algorithm: ClassVar[str] = C.PER_FEDAVG
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("inner_lr", "meta_lr")


class PerFedAvg(MAMLAlgorithm):
    """tau local steps of eq. (8), ``w <- w - beta prod_j (I - alpha H(w_j; D_j)) grad f(w_N; T)``
    (:func:`fedmeta.meta.per_fedavg_step`; eq. (9) for N = 1), each on 2N + 1 fresh batches drawn as
    D (inner, N), D' (outer), D'' (Hessian, N). One client's exact and first-order steps also run on
    plain autograd (:meth:`fast_step`: :func:`fedmeta.meta.maml_gradient` with ``ad=fedmeta.fast.PLAIN_AUTOGRAD``,
    then the step in place)."""

    name = C.PER_FEDAVG
    config = PerFedAvgConfig

    def draw(self, sample, hp: PerFedAvgConfig) -> Batches:
        return self.meta_batches(sample, hp, order="inner,outer,hessian")

    def step(self, f, w, state, batches, hp: PerFedAvgConfig, gen=None):
        return meta.per_fedavg_step(f, w, as_meta_batches(batches), hp.inner_lr, hp.meta_lr, hp.estimator(), gen), None

    def fast_step(self, f, w, state, batches, hp: PerFedAvgConfig, gen=None):
        g, _ = meta.maml_gradient(f, w, as_meta_batches(batches), hp.inner_lr, hp.estimator(), gen, ad=fast.PLAIN_AUTOGRAD)
        return fast.descend_(w, g, hp.meta_lr), None  # eq. (8) in place

    def train_loss(self, f, w, state, batches):
        return f(w, *batches[1])

    def cost(self, hp: PerFedAvgConfig, *, fresh_state: bool) -> RoundCost:
        return RoundCost(self.round_samples(hp),
                         hp.estimator().cost(hp.inner_steps) * hp.local_steps)
