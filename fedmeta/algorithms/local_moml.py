"""LocalMOML (localmoml-memory-based-maml.txt Algorithm 3, eqs. 7-8), with an N-step inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta.algorithms.base import Batches, EstimatorConfig, MAMLAlgorithm, RoundCost, as_meta_batches
from fedmeta.config import HP


@dataclass(frozen=True)
class LocalMOMLConfig(EstimatorConfig):
    """LocalMOML client hyper-parameters (localmoml Algorithm 3, eqs. 7-8): alpha, eta, beta, H, K, K0 and the
    memory policy, with the estimator's settings (:class:`~fedmeta.algorithms.base.EstimatorConfig`)."""

    inner_lr: float = HP.inner_lr.field()
    lr: float = HP.lr.field()
    momentum: float = HP.momentum.field()
    local_steps: int = HP.local_steps.field(symbol="H")
    batch_size: int = HP.batch_size.field()
    init_batch_size: int = HP.init_batch_size.field()
    memory_policy: str = HP.memory_policy.field()

    algorithm: ClassVar[str] = C.LOCAL_MOML
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("inner_lr", "lr")


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
