"""FedAvg (McMahan et al. 2017), the baseline of per-fedavg.txt Section 5: tau local SGD steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedmeta import config as C
from fedmeta import fast, meta
from fedmeta import validation as V
from fedmeta.algorithms.base import Algorithm, Batches, RoundCost
from fedmeta.config import WireConfig


@dataclass(frozen=True)
class FedAvgConfig(WireConfig):
    """FedAvg client hyper-parameters (the baseline of per-fedavg.txt Section 5): tau SGD steps."""

    inner_lr: float = 0.01
    """alpha: step size of personalized evaluation's fine-tuning (not used in training) (>= 0)."""
    lr: float = 0.05
    """Local SGD step size (> 0)."""
    local_steps: int = 4
    """tau: local SGD steps per round (>= 1)."""
    batch_size: int = 5
    """Samples per SGD step (>= 1)."""

    algorithm: ClassVar[str] = C.FEDAVG
    STEP_SIZES: ClassVar[tuple[str, ...]] = ("lr",)
    KEYS: ClassVar[dict[str, str]] = {"inner_lr": C.INNER_LR, "lr": C.LR, "local_steps": C.LOCAL_STEPS, "batch_size": C.BATCH_SIZE}

    def __post_init__(self) -> None:
        V.finite_nonneg("inner_lr (alpha)", self.inner_lr)
        V.finite_positive("lr", self.lr)
        V.positive_int("local_steps (tau)", self.local_steps)
        V.positive_int("batch_size", self.batch_size)


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
