"""LocalMOML (localmoml-memory-based-maml.txt Algorithm 3, eqs. 7-8), with an N-step inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta import validation as V
from fedmeta.algorithms.base import Batches, EstimatorConfig, MAMLAlgorithm, RoundCost, as_meta_batches
from fedmeta.config import WireConfig


@dataclass(frozen=True)
class LocalMOMLConfig(EstimatorConfig, WireConfig):
    """LocalMOML client hyper-parameters (localmoml Algorithm 3, eqs. 7-8)."""

    inner_lr: float = 0.01
    """alpha: step size of the adaptation step ``w - alpha grad f(w; S1)`` (>= 0)."""
    lr: float = 0.05
    """eta: the local meta step size, Algorithm 3 line 11 (> 0)."""
    momentum: float = 0.5
    """beta of LocalMOML: weight of the fresh adapted model in eq. (7), in (0, 1]."""
    local_steps: int = 4
    """H: local steps per round (>= 1)."""
    batch_size: int = 5
    """K: samples in each of S1, S2, S3 (>= 1)."""
    init_batch_size: int = 5
    """K0: samples in S0 for the memory reset, Algorithm 3 line 5 (>= 1)."""
    memory_policy: str = "keep"
    """``keep``: u carries over from the client's last participating round (line 7, cross-silo);
    ``reset``: u restarts from ``w - alpha grad f(w; S0)`` every round (line 5, cross-device)."""

    algorithm: ClassVar[str] = C.LOCAL_MOML
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("inner_lr", "lr")
    KEYS: ClassVar[dict[str, str]] = {
        "inner_lr": C.INNER_LR,
        "lr": C.LR,
        "momentum": C.MOMENTUM,
        "local_steps": C.LOCAL_STEPS,
        "batch_size": C.BATCH_SIZE,
        "init_batch_size": C.INIT_BATCH_SIZE,
        "memory_policy": C.MEMORY_POLICY,
        **EstimatorConfig.ESTIMATOR_KEYS,
    }

    def __post_init__(self) -> None:
        V.finite_nonneg("inner_lr (alpha)", self.inner_lr)
        V.finite_positive("lr (LocalMOML eta)", self.lr)
        V.in_unit_interval("momentum (LocalMOML beta)", self.momentum)
        V.positive_int("local_steps (H)", self.local_steps)
        V.positive_int("batch_size (K)", self.batch_size)
        V.positive_int("init_batch_size (K0)", self.init_batch_size)
        self._check_estimator()
        V.check_choice("memory_policy", self.memory_policy, C.MEMORY_POLICIES)


class LocalMOML(MAMLAlgorithm):
    """H local steps of eqs. (7)-(8) on the memory u (:func:`fedmeta.meta.local_moml_step`), each on
    2N + 1 fresh batches drawn in Algorithm 3's order S1 (inner, N), S2 (Hessian, N), S3 (outer).

    The state is the personalized model u. Under ``keep`` a client starts from the u of its last
    participating round (line 7); under ``reset``, and in a client's first round, u is rebuilt from
    the N-step inner loop on N fresh batches S0 of ``init_batch_size`` (line 5). One client's exact and
    first-order steps also run on plain autograd (:meth:`fast_step`: :func:`fedmeta.meta.local_moml_step` with
    ``ad=fedmeta.fast.PLAIN_AUTOGRAD``)."""

    name = C.LOCAL_MOML
    config = LocalMOMLConfig
    state_label = "personalized_model"

    def keeps_state(self, hp: LocalMOMLConfig) -> bool:
        return hp.memory_policy == "keep"

    def draw_init(self, sample, hp: LocalMOMLConfig) -> Batches:
        return tuple(sample(hp.init_batch_size) for _ in range(hp.inner_steps))

    def init_state(self, f, w, batches, hp: LocalMOMLConfig):
        return meta.local_moml_init_memory(f, w, list(batches), hp.inner_lr, hp.estimator())

    def draw(self, sample, hp: LocalMOMLConfig) -> Batches:
        return self.meta_batches(sample, hp, order="inner,hessian,outer")

    def step(self, f, w, state, batches, hp: LocalMOMLConfig, gen=None):
        return meta.local_moml_step(f, w, state, as_meta_batches(batches), hp.inner_lr, hp.lr, hp.momentum, hp.estimator(), gen)

    def fast_init_state(self, f, w, batches, hp: LocalMOMLConfig):
        return meta.local_moml_init_memory(f, w, list(batches), hp.inner_lr, hp.estimator(), ad=fast.PLAIN_AUTOGRAD)

    def fast_step(self, f, w, state, batches, hp: LocalMOMLConfig, gen=None):
        return meta.local_moml_step(f, w, state, as_meta_batches(batches), hp.inner_lr, hp.lr, hp.momentum, hp.estimator(), gen,
                                    ad=fast.PLAIN_AUTOGRAD)

    def train_loss(self, f, w, state, batches):
        return f(state, *batches[1])

    def cost(self, hp: LocalMOMLConfig, *, fresh_state: bool) -> RoundCost:
        init_samples, init = (hp.init_batch_size * hp.inner_steps, meta.Cost(gradients=hp.inner_steps)) if fresh_state else (0, meta.Cost())
        return RoundCost(init_samples + self.round_samples(hp),
                         init + hp.estimator().cost(hp.inner_steps) * hp.local_steps)
