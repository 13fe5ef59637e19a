"""Algorithm hyper-parameters and the wire keys they travel under.

Every key that crosses the wire (train/evaluate ``ConfigRecord``, reply ``MetricRecord``,
``context.state``) is a kebab-case constant defined here, once. The hyper-parameters are parsed
into frozen dataclasses that validate on construction, so bad values fail with a message naming
the field and its allowed range before any work starts -- on the server (strategy construction)
and again on the client (nothing a server sends is trusted blindly).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from fedmeta import meta

# --- train/evaluate ConfigRecord keys (server -> client) -------------------------------------
ALGORITHM = "algorithm"
SERVER_ROUND = "server-round"  # injected by Flower's FedAvg
SEED = "seed"
INNER_LR = "inner-lr"
META_LR = "meta-lr"
LR = "lr"
MOMENTUM = "momentum"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
INIT_BATCH_SIZE = "init-batch-size"
META_GRADIENT = "meta-gradient"
INNER_STEPS = "inner-steps"
DELTA = "delta"
NUM_DIRECTIONS = "num-directions"
MEMORY_POLICY = "memory-policy"
EVAL_STEPS = "eval-steps"
EVAL_SHOTS = "eval-shots"

# --- reply MetricRecord keys (client -> server) ----------------------------------------------
NUM_EXAMPLES = "num-examples"  # size of the client's train split (Flower's weighting key)
NUM_SAMPLES = "num-samples"  # samples drawn this round
NUM_GRADIENTS = "num-gradients"  # gradient evaluations this round
NUM_HVPS = "num-hvps"  # Hessian-vector products this round
NUM_LOSS_EVALS = "num-loss-evals"  # forward-only loss evaluations this round (zeroth_order)
TRAIN_LOSS = "train-loss"
PARTITION_ID = "partition-id"
MEMORY_ROUND = "memory-round"  # round the loaded memory u was written in; -1: none (first round or reset)
MEMORY_DIGEST = "memory-digest"  # fedmeta.clients.memory.params_digest of the u the round started from; -1: none
LOSS_BEFORE = "loss-before"
LOSS_AFTER = "loss-after"
ACC_BEFORE = "accuracy-before"
ACC_AFTER = "accuracy-after"

# --- multi-client nodes (one node hosts a group of clients) --------------------------------------
CLIENT_IDS = "client-ids"  # train/evaluate config (multi-client nodes): the node's clients to run; reply: the clients that ran
NUM_CLIENTS = "num-clients"  # query config: the number of clients n, so a node can tell which clients it hosts
WEIGHTING = "weighting"  # train config (multi-client nodes): how the node averages its clients' models
NUM_DIVERGED = "num-diverged"  # reply (multi-client nodes): clients left out because their training diverged
MEMORY_KEY = "memory-key"  # train config (server checkpoints): key the memory u by this name, load the version from before this round
PER_CLIENT = "per-client-"  # reply prefix (multi-client nodes): per-client lists aligned with client-ids

# --- node-config keys (SuperNode --node-config) -----------------------------------------------
MEMORY_DIR = "memory-dir"  # keep the memory u on disk under this directory (DiskMemory), not in context.state

# --- context.state keys ----------------------------------------------------------------------
PERSONALIZED_MODEL = "personalized-model"  # LocalMOML memory u (ArrayRecord)
MEMORY_META = "personalized-model-meta"  # ConfigRecord: round the memory was written in

FEDAVG = "fedavg"
PER_FEDAVG = "per-fedavg"
LOCAL_MOML = "local-moml"
MEMORY_POLICIES = ("keep", "reset")


def _check(name: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    """``value`` must be one of ``options``; a near miss names the nearest option."""
    if isinstance(value, str) and value in options:
        return
    near = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"{name} must be one of {list(options)}, got {value!r}{hint}")


def _normalized(key: str) -> str:
    return key.strip().lower().replace("_", "-").replace(" ", "-")


def _positive_int(name: str, value: Any) -> None:
    _check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1", value)


def _nonneg_int(name: str, value: Any) -> None:
    _check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0", value)


def _finite(value: Any) -> bool:
    """A real number (not a bool) that is finite as a float (a huge int is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _finite_nonneg(name: str, value: Any) -> None:
    _check(name, _finite(value) and value >= 0, "a finite number >= 0", value)


def _finite_positive(name: str, value: Any) -> None:
    _check(name, _finite(value) and value > 0, "a finite number > 0", value)


class _Wire:
    """Mixin: round-trip a frozen dataclass through a flat kebab-case dict (a ``ConfigRecord``)."""

    KEYS: ClassVar[dict[str, str]]

    def to_wire(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for attr, key in self.KEYS.items()}

    @classmethod
    def from_wire(cls, record: Mapping[str, Any]):
        """Parse and validate a received config (the client side: before any work).

        Keys that are not this class's are ignored (the record also carries ``server-round``, ``seed``
        and the user's own keys), except a differently spelled known key (``inner_lr``, ``Inner-LR``),
        which fails with the key to use. A bad value fails with one ``ValueError`` naming the wire key,
        the value and what is allowed."""
        wire_keys = set(cls.KEYS.values())
        for key in record:
            if isinstance(key, str) and key not in wire_keys and _normalized(key) in wire_keys:
                raise ValueError(
                    f"unknown {cls.__name__} config key {key!r} (value {record[key]!r}); did you mean {_normalized(key)!r}? "
                    f"(keys: {', '.join(sorted(wire_keys))})"
                )
        kwargs = {attr: record[key] for attr, key in cls.KEYS.items() if key in record}
        try:
            return cls(**kwargs)
        except ValueError as err:
            attr = str(err).split(" ", 1)[0]  # every message starts with the field
            if attr not in cls.KEYS:
                raise
            raise ValueError(f"config key {cls.KEYS[attr]!r} ({cls.__name__}): {err}") from None

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FedAvgConfig(_Wire):
    """FedAvg client hyper-parameters (the baseline of per-fedavg.txt Section 5): tau SGD steps."""

    inner_lr: float = 0.01
    """alpha: step size of personalized evaluation's fine-tuning (not used in training) (>= 0)."""
    lr: float = 0.001
    """Local SGD step size (> 0)."""
    local_steps: int = 1
    """tau: local SGD steps per round (>= 1)."""
    batch_size: int = 5
    """Samples per SGD step (>= 1)."""

    algorithm: ClassVar[str] = FEDAVG
    KEYS: ClassVar[dict[str, str]] = {"inner_lr": INNER_LR, "lr": LR, "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE}

    def __post_init__(self) -> None:
        _finite_nonneg("inner_lr (alpha)", self.inner_lr)
        _finite_positive("lr", self.lr)
        _positive_int("local_steps (tau)", self.local_steps)
        _positive_int("batch_size", self.batch_size)


@dataclass(frozen=True)
class _Estimator:
    """The meta-gradient estimator fields shared by Per-FedAvg and LocalMOML (fedmeta.meta.meta_gradient)."""

    inner_steps: int = 1
    """N: inner SGD steps of the adaptation, multistep-maml-ggs eq. (6) (>= 1; 1 is the papers' setting)."""
    meta_gradient: str = "exact"
    """Estimator of the meta-gradient: ``exact`` (HVPs through the inner loop), ``first_order``,
    ``hessian_free`` (finite differences, per-fedavg eq. 119), ``ggs`` (eq. 18), ``zeroth_order``
    (eq. 17) or ``fo_muml`` (fo-muml Algorithm 3)."""
    delta: float = 1e-5
    """Finite-difference step of ``hessian_free`` (per-fedavg eq. 119) or smoothing radius of
    ``ggs`` / ``zeroth_order`` (eqs. 17-18) (> 0). See :data:`fedmeta.meta.DEFAULT_DELTA`."""
    num_directions: int = 10
    """U: Gaussian vectors per Hessian estimate (``ggs``, ``zeroth_order``) (>= 1)."""

    ESTIMATOR_KEYS: ClassVar[dict[str, str]] = {
        "inner_steps": INNER_STEPS,
        "meta_gradient": META_GRADIENT,
        "delta": DELTA,
        "num_directions": NUM_DIRECTIONS,
    }

    def _check_estimator(self) -> None:
        _check_choice("meta_gradient", self.meta_gradient, meta.META_GRADIENTS)
        _positive_int("inner_steps (N)", self.inner_steps)
        _finite_positive("delta (finite-difference step / smoothing radius)", self.delta)
        _positive_int("num_directions (U, Gaussian vectors per Hessian estimate)", self.num_directions)
        meta.check_meta_gradient(self.meta_gradient, self.inner_steps, self.delta, self.num_directions)

    def estimator(self) -> meta.MetaGradient:
        return meta.meta_gradient(self.meta_gradient, delta=self.delta, num_directions=self.num_directions)


@dataclass(frozen=True)
class PerFedAvgConfig(_Estimator, _Wire):
    """Per-FedAvg client hyper-parameters (per-fedavg.txt Algorithm 1, eqs. 8-9)."""

    inner_lr: float = 0.01
    """alpha: step size of the adaptation step ``w - alpha grad f(w; D)`` (>= 0)."""
    meta_lr: float = 0.001
    """beta of Per-FedAvg: the local meta step size in eq. (8) (> 0)."""
    local_steps: int = 1
    """tau: local meta steps per round (>= 1)."""
    batch_size: int = 5
    """|D| = |D'| = |D''|: samples in each of the three independent batches (>= 1)."""
    algorithm: ClassVar[str] = PER_FEDAVG
    KEYS: ClassVar[dict[str, str]] = {
        "inner_lr": INNER_LR,
        "meta_lr": META_LR,
        "local_steps": LOCAL_STEPS,
        "batch_size": BATCH_SIZE,
        **_Estimator.ESTIMATOR_KEYS,
    }

    def __post_init__(self) -> None:
        _finite_nonneg("inner_lr (alpha)", self.inner_lr)
        _finite_positive("meta_lr (Per-FedAvg beta)", self.meta_lr)
        _positive_int("local_steps (tau)", self.local_steps)
        _positive_int("batch_size", self.batch_size)
        self._check_estimator()


@dataclass(frozen=True)
class LocalMOMLConfig(_Estimator, _Wire):
    """LocalMOML client hyper-parameters (localmoml Algorithm 3, eqs. 7-8)."""

    inner_lr: float = 0.01
    """alpha: step size of the adaptation step ``w - alpha grad f(w; S1)`` (>= 0)."""
    lr: float = 0.001
    """eta: the local meta step size, Algorithm 3 line 11 (> 0)."""
    momentum: float = 0.5
    """beta of LocalMOML: weight of the fresh adapted model in eq. (7), in (0, 1]."""
    local_steps: int = 1
    """H: local steps per round (>= 1)."""
    batch_size: int = 5
    """K: samples in each of S1, S2, S3 (>= 1)."""
    init_batch_size: int = 5
    """K0: samples in S0 for the memory reset, Algorithm 3 line 5 (>= 1)."""
    memory_policy: str = "keep"
    """``keep``: u carries over from the client's last participating round (line 7, cross-silo);
    ``reset``: u restarts from ``w - alpha grad f(w; S0)`` every round (line 5, cross-device)."""

    algorithm: ClassVar[str] = LOCAL_MOML
    KEYS: ClassVar[dict[str, str]] = {
        "inner_lr": INNER_LR,
        "lr": LR,
        "momentum": MOMENTUM,
        "local_steps": LOCAL_STEPS,
        "batch_size": BATCH_SIZE,
        "init_batch_size": INIT_BATCH_SIZE,
        "memory_policy": MEMORY_POLICY,
        **_Estimator.ESTIMATOR_KEYS,
    }

    def __post_init__(self) -> None:
        _finite_nonneg("inner_lr (alpha)", self.inner_lr)
        _finite_positive("lr (LocalMOML eta)", self.lr)
        m = self.momentum
        ok = isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m <= 1
        _check("momentum (LocalMOML beta)", ok, "a number in (0, 1]", m)
        _positive_int("local_steps (H)", self.local_steps)
        _positive_int("batch_size (K)", self.batch_size)
        _positive_int("init_batch_size (K0)", self.init_batch_size)
        self._check_estimator()
        _check_choice("memory_policy", self.memory_policy, MEMORY_POLICIES)


@dataclass(frozen=True)
class EvalConfig(_Wire):
    """Personalized evaluation: fine-tune the meta-model on the client's *train* split, score on its test split.

    Defaults follow per-fedavg.txt Section 5 (one gradient step on the client's data); the
    LocalMOML paper's protocol (Section 6.2) is ``eval_steps=10, eval_shots=5``.
    """

    inner_lr: float = 0.01
    """alpha used for the fine-tuning steps (>= 0)."""
    eval_steps: int = 1
    """k: fine-tuning steps (>= 0; 0 scores the meta-model as is)."""
    eval_shots: int = 0
    """Size of the support set drawn from the train split; 0 means the whole train split."""

    KEYS: ClassVar[dict[str, str]] = {"inner_lr": INNER_LR, "eval_steps": EVAL_STEPS, "eval_shots": EVAL_SHOTS}

    def __post_init__(self) -> None:
        _finite_nonneg("inner_lr (alpha)", self.inner_lr)
        _nonneg_int("eval_steps", self.eval_steps)
        _nonneg_int("eval_shots", self.eval_shots)


ALGORITHM_CONFIGS: dict[str, type[FedAvgConfig] | type[PerFedAvgConfig] | type[LocalMOMLConfig]] = {
    FEDAVG: FedAvgConfig,
    PER_FEDAVG: PerFedAvgConfig,
    LOCAL_MOML: LocalMOMLConfig,
}


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}
