"""Per-FedAvg (Fallah et al. 2020), per-fedavg.txt Algorithm 1, with an N-step inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta import validation as V
from fedmeta.algorithms.base import Batches, EstimatorConfig, MAMLAlgorithm, RoundCost, as_meta_batches
from fedmeta.config import WireConfig


@dataclass(frozen=True)
class PerFedAvgConfig(EstimatorConfig, WireConfig):
    """Per-FedAvg client hyper-parameters (per-fedavg.txt Algorithm 1, eqs. 8-9)."""

    inner_lr: float = 0.01
    """alpha: step size of the adaptation step ``w - alpha grad f(w; D)`` (>= 0)."""
    meta_lr: float = 0.05
    """beta of Per-FedAvg: the local meta step size in eq. (8) (> 0)."""
    local_steps: int = 4
    """tau: local meta steps per round (>= 1)."""
    batch_size: int = 5
    """|D| = |D'| = |D''|: samples in each of the three independent batches (>= 1)."""
    algorithm: ClassVar[str] = C.PER_FEDAVG
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("inner_lr", "meta_lr")
    KEYS: ClassVar[dict[str, str]] = {
        "inner_lr": C.INNER_LR,
        "meta_lr": C.META_LR,
        "local_steps": C.LOCAL_STEPS,
        "batch_size": C.BATCH_SIZE,
        **EstimatorConfig.ESTIMATOR_KEYS,
    }

    def __post_init__(self) -> None:
        V.finite_nonneg("inner_lr (alpha)", self.inner_lr)
        V.finite_positive("meta_lr (Per-FedAvg beta)", self.meta_lr)
        V.positive_int("local_steps (tau)", self.local_steps)
        V.positive_int("batch_size", self.batch_size)
        self._check_estimator()


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
