"""FedAvg (McMahan et al. 2017), the baseline of per-fedavg.txt Section 5: tau local SGD steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta.algorithms.base import Algorithm, Batches, RoundCost
from fedmeta.config import HP, WireConfig


@dataclass(frozen=True)
class FedAvgConfig(WireConfig):
    """FedAvg client hyper-parameters (the baseline of per-fedavg.txt Section 5): tau SGD steps."""

    inner_lr: float = HP.inner_lr.field(help="step size of personalized evaluation's fine-tuning (not used in training)")
    lr: float = HP.lr.field(symbol="", help="local SGD step size")
    local_steps: int = HP.local_steps.field(symbol="tau", help="local SGD steps per round")
    batch_size: int = HP.batch_size.field(help="samples per SGD step")

    algorithm: ClassVar[str] = C.FEDAVG
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("lr",)


class FedAvg(Algorithm):
    """Local SGD: ``w <- w - lr grad f(w; D)`` on a fresh batch D of ``batch_size``, tau times (one client
    alone on plain autograd, :meth:`fast_step`; many clients vmapped by the executor)."""

    name = C.FEDAVG
    config = FedAvgConfig
    model_label = "model"

    def draw(self, sample, hp: FedAvgConfig) -> Batches:
        return (sample(hp.batch_size),)

    def step(self, f, w, state, batches, hp: FedAvgConfig, gen=None):
        return meta.adapt(f, w, batches[0], hp.lr), None

    def fast_step(self, f, w, state, batches, hp: FedAvgConfig, gen=None):
        return fast.descend_(w, fast.gradient(f, w, batches[0]), hp.lr), None

    def train_loss(self, f, w, state, batches):
        return f(w, *batches[0])

    def cost(self, hp: FedAvgConfig, *, fresh_state: bool) -> RoundCost:
        return RoundCost(hp.batch_size * hp.local_steps, meta.Cost(gradients=hp.local_steps))
