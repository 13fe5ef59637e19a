"""Algorithm hyper-parameters and the wire keys they travel under.

Every key that crosses the wire (train/evaluate ``ConfigRecord``, reply ``MetricRecord``,
``context.state``) is a kebab-case constant defined here, once. The hyper-parameters are parsed
into frozen dataclasses that validate on construction, so bad values fail with a message naming
the field and its allowed range before any work starts -- on the server (strategy construction)
and again on the client (nothing a server sends is trusted blindly).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

from fedmeta import settings as S
from fedmeta.meta import DEFAULT_DELTA, META_GRADIENTS
from fedmeta.tracking import TRACKS

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
OUTER_BATCH_SIZE = "outer-batch-size"
BATCH_DRAWS = "batch-draws"
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
NUM_PARTITIONS = "num-partitions"  # node config (Flower's): how many SuperNodes share the clients; query reply: the same
CLIENT_IDS = "client-ids"  # train/evaluate config (multi-client nodes): the node's clients to run; reply: the clients that ran
NUM_CLIENTS = "num-clients"  # query config: the number of clients n, so a node can tell which clients it hosts
WEIGHTING = "weighting"  # train config (multi-client nodes): how the node averages its clients' models
NUM_DIVERGED = "num-diverged"  # reply (multi-client nodes): clients left out because their training diverged
MEMORY_KEY = "memory-key"  # train config (server checkpoints): key the memory u by this name, load the version from before this round
PER_CLIENT = "per-client-"  # reply prefix (multi-client nodes): per-client lists aligned with client-ids
CLIENT_INFO = "client-info"  # reply ConfigRecord: identifiers (partition-id, client-ids, memory-*) and per-client- lists, never averaged
CLIENT_TIMING = "client-timing"  # reply ConfigRecord (optional): how long the handler took, for the run's time split
HANDLER_SECONDS = "handler-seconds"  # in client-timing: the handler's wall time from receiving the message to its reply

# --- Dif-MAML relay (fedmeta.strategies.DifMAML <-> fedmeta.clients.make_dif_maml_client_app) ----
DIF_MAML = "dif-maml"
AGENT = "agent"  # train config: the agent k the message is for (its node's partition-id)
NEIGHBOURHOOD = "neighbourhood"  # train config: the agents l whose phi_l the message carries (k itself included)
COMBINATION_WEIGHTS = "combination-weights"  # train config: a_lk for those agents, renormalised to sum to 1
PHI_PREFIX = "phi-"  # train message ArrayRecord keys: "phi-<l>", agent l's intermediate state phi_l
MODELS_UP = "models-up"  # round metric: models the agents sent up (replies with a model)
MODELS_DOWN = "models-down"  # round metric: models the relay sent down (one ArrayRecord per phi_l in a message)
DIF_MAML_OPTIMIZER = "dif-maml-optimizer"  # context.state: the agent's optimizer state (Adam moments; ArrayRecord)

# --- node-config keys (SuperNode --node-config) -----------------------------------------------
MEMORY_DIR = "memory-dir"  # keep the memory u on disk under this directory (DiskMemory), not in context.state

# --- context.state keys ----------------------------------------------------------------------
PERSONALIZED_MODEL = "personalized-model"  # LocalMOML memory u (ArrayRecord)
MEMORY_META = "personalized-model-meta"  # ConfigRecord: round the memory was written in

FEDAVG = "fedavg"
PER_FEDAVG = "per-fedavg"
LOCAL_MOML = "local-moml"
MEMORY_POLICIES = ("keep", "reset")
BATCH_DRAW_CHOICES = ("per-step", "per-round")


class HP:
    """The hyper-parameters several configs share, each declared once (:class:`fedmeta.settings.Setting`): the
    algorithms' configs, the evaluation's, the experiment's, the centralized runner's, Dif-MAML's and the
    strategies' checks all use these declarations."""

    inner_lr = S.number_at_least(0, symbol="alpha", default=0.01,
                                 help="step size of the adaptation step w - alpha grad f(w), in training and in personalized evaluation")
    meta_lr = S.number_above(0, symbol="Per-FedAvg beta", default=0.05, help="the local meta step size, per-fedavg eq. (8)")
    lr = S.number_above(0, symbol="LocalMOML eta", default=0.05,
                        help="the local meta step size, localmoml Algorithm 3 line 11 (FedAvg: the SGD step size)")
    momentum = S.fraction(symbol="LocalMOML beta", default=0.5,
                          help="weight of the fresh adapted model in the memory update, localmoml eq. (7); 1 makes it Per-FedAvg")
    local_steps = S.int_at_least(1, symbol="tau / H", default=4, help="local steps per round")
    batch_size = S.int_at_least(1, symbol="K", default=5, help="samples in each inner, outer and Hessian batch")
    init_batch_size = S.int_at_least(1, symbol="K0", default=5,
                                     help="samples in each batch S0 of LocalMOML's memory reset, localmoml Algorithm 3 line 5")
    inner_steps = S.int_at_least(1, symbol="N", default=1, help="inner SGD steps of the adaptation, multistep-maml-ggs eq. (6)")
    meta_gradient = S.choice(lambda: META_GRADIENTS, default="exact",
                             help="estimator of the meta-gradient: exact (HVPs through the inner loop), first_order, hessian_free "
                                  "(per-fedavg eq. 119), ggs (multistep-maml-ggs eq. 18), zeroth_order (eq. 17), fo_muml (fo-muml Algorithm 3)")
    delta = S.number_above(0, default=DEFAULT_DELTA,
                           help="finite-difference step of hessian_free (per-fedavg eq. 119) or Gaussian smoothing radius of ggs / "
                                "zeroth_order (multistep-maml-ggs eqs. 17-18); see fedmeta.meta.DEFAULT_DELTA")
    num_directions = S.int_at_least(1, symbol="U", default=10, help="Gaussian vectors per Hessian estimate (ggs, zeroth_order)")
    outer_batch_size = S.int_at_least(0, " (0 = batch-size)", default=0,
                                      help="samples in the outer (query) batch, Per-FedAvg's D' / LocalMOML's S3; 0: batch-size, as the "
                                           "papers have it (the localmoml authors' federated code uses 10 query beside 5 support points)")
    batch_draws = S.choice(lambda: BATCH_DRAW_CHOICES, default="per-step",
                           help="per-step: every local step draws fresh batches (per-fedavg Algorithm 1, localmoml Algorithm 3); "
                                "per-round: the first step's batches serve the round's local steps (the localmoml authors' federated code)")
    memory_policy = S.choice(lambda: MEMORY_POLICIES, default="keep",
                             help="LocalMOML's memory u: keep (carried over from the client's last round, localmoml Algorithm 3 line 7, "
                                  "cross-silo) or reset (rebuilt from w every round, line 5, cross-device)")
    eval_steps = S.int_at_least(0, default=1, help="personalized evaluation: fine-tuning steps (0 scores the meta-model as is)")
    eval_shots = S.int_at_least(0, " (0 = the whole train split)", default=0,
                                help="personalized evaluation: support-set size drawn from the client's train split")
    eval_lr = S.number_at_least(0, " (0 = inner-lr)", default=0.0, help="personalized evaluation: the fine-tuning step size")
    lr_decay = S.fraction(default=0.1, help="factor of each step-size decay of the lr-decay-at schedule")
    evaluate_every = S.int_at_least(0, " (0 = never)", default=50, help="evaluate all clients every this many rounds (and after the last)")
    seed = S.Setting(int, "an integer in [0, 2**63 - 1]", lambda v: v >= 0, default=0,
                     help="seeds the initial model, the client sampling and every client's batches")
    track = S.choice(lambda: TRACKS, default="none",
                     help="live tracking of the per-round values: tensorboard (event files; pip install 'fedmeta[tensorboard]'), "
                          "wandb (Weights & Biases, offline unless WANDB_MODE says otherwise; pip install 'fedmeta[wandb]') or none "
                          "(docs/tracking.md)")
    tracking_dir = S.text("where the tracker writes; empty: <results-dir>/tracking (./tracking for runners without a "
                          "results directory)", default="")


def _normalized(key: str) -> str:
    return key.strip().lower().replace("_", "-").replace(" ", "-")


class _Keys:
    """``KEYS`` of a wire config: attribute -> wire key (its name in kebab case), for every setting field."""

    def __get__(self, obj: Any, owner: type) -> dict[str, str]:
        return _keys(owner)


@functools.cache
def _keys(owner: type) -> dict[str, str]:
    return {name: S.kebab(name) for name in owner.settings()}


class WireConfig(S.Settings):
    """Base of the configs that travel in a ``ConfigRecord``: a frozen dataclass of settings
    (:class:`fedmeta.settings.Settings`) with a flat kebab-case dict form."""

    KEYS: ClassVar[dict[str, str]] = _Keys()  # type: ignore[assignment]
    STEP_SIZES: ClassVar[tuple[str, ...]] = ()
    """The fields that are step sizes: what a step-size schedule scales (``lr_decay_at`` of the strategies)."""

    def to_wire(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for attr, key in self.KEYS.items()}

    @classmethod
    def from_wire(cls, record: Mapping[str, Any]):
        """Parse and validate a received config (the client side: before any work).

        Keys that are not this class's are ignored (the record also carries ``server-round``, ``seed``
        and the user's own keys), except a differently spelled known key (``inner_lr``, ``Inner-LR``),
        which fails with the key to use. A bad value fails with one ``ValueError`` naming the wire key,
        the value and what is allowed."""
        keys = cls.KEYS
        wire_keys = set(keys.values())
        for key in record:
            if isinstance(key, str) and key not in wire_keys and _normalized(key) in wire_keys:
                raise ValueError(
                    f"unknown {cls.__name__} config key {key!r} (value {record[key]!r}); did you mean {_normalized(key)!r}? "
                    f"(keys: {', '.join(sorted(wire_keys))})"
                )
        kwargs = {attr: record[key] for attr, key in keys.items() if key in record}
        try:
            return cls(**kwargs)
        except ValueError as err:
            attr = str(err).split(" ", 1)[0]  # every message starts with the field
            if attr not in keys:
                raise
            raise ValueError(f"config key {keys[attr]!r} ({cls.__name__}): {err}") from None


@dataclass(frozen=True)
class EvalConfig(WireConfig):
    """Personalized evaluation: fine-tune the meta-model on the client's *train* split, score on its test split.

    Defaults follow per-fedavg.txt Section 5 (one gradient step on the client's data); the
    LocalMOML paper's protocol (Section 6.2) is ``eval_steps=10, eval_shots=5``.
    """

    inner_lr: float = HP.inner_lr.field(help="alpha of the fine-tuning steps")
    eval_steps: int = HP.eval_steps.field()
    eval_shots: int = HP.eval_shots.field()


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


class _AlgorithmConfigs(Mapping[str, type]):
    """Algorithm name -> its config class, read from the registry (:mod:`fedmeta.algorithms`) on
    every access, so an algorithm registered later (a user's own) is listed too."""

    def __getitem__(self, name: str) -> type:
        from fedmeta import algorithms

        if name not in algorithms.REGISTRY:
            raise KeyError(name)
        return algorithms.REGISTRY[name].config

    def __iter__(self) -> Iterator[str]:
        from fedmeta import algorithms

        return iter(list(algorithms.REGISTRY))

    def __len__(self) -> int:
        from fedmeta import algorithms

        return len(algorithms.REGISTRY)


ALGORITHM_CONFIGS: Mapping[str, type] = _AlgorithmConfigs()
"""Algorithm name -> config class (a view of :data:`fedmeta.algorithms.REGISTRY`)."""

_MOVED = {"FedAvgConfig": "fedavg", "PerFedAvgConfig": "per_fedavg", "LocalMOMLConfig": "local_moml"}


def __getattr__(name: str) -> Any:
    """The algorithms' config classes live in their units (:mod:`fedmeta.algorithms`); imported from
    here on first use (a lazy import: the units import this module)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"fedmeta.algorithms.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
