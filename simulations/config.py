"""One experiment's configuration: a frozen dataclass, parsed once, with the defaults in one place.

The same keys (kebab-case) are accepted from ``[tool.flwr.app.config]`` / ``flwr run
--run-config`` and, with dashes, from the command line (``--num-rounds 100``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import numbers
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from fedmeta import algorithms
from fedmeta import config as C
from fedmeta.algorithms import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig
from fedmeta.strategies.base import MetaStrategy
from fedmeta.batched import DEFAULT_CHUNK_SIZE, VECTORIZE, VMAP_ESTIMATORS
from fedmeta.data import IMAGE_SHAPES, NUM_CLASSES
from fedmeta.meta import META_GRADIENTS
from fedmeta.models import MODELS, build_model
from fedmeta.strategies.aggregation import holdout_partitions

DATASET_MODELS = {"fashion-mnist": "mlp-40-40", "mnist": "mlp-40-40", "cifar10": "cnn", "cifar100": "cnn", "sinewave": "sine-mlp"}
"""The default model of each dataset (the papers' MLPs; a small CNN for CIFAR)."""
PARTITIONS = ("fallah", "dirichlet", "pathological")
AUTO_NODES = -1
"""``num-nodes = -1``: one multi-client node per Ray actor slot (resolved when the simulation starts)."""
EVAL_PROTOCOLS = {"one-step": (1, 0), "5-shot-10-step": (10, 5)}
"""Named personalized-evaluation protocols: (fine-tuning steps, support-set size; 0 = whole train split).
``one-step``: per-fedavg.txt Section 5; ``5-shot-10-step``: localmoml Section 6.2."""


def _algorithm_default(name: str) -> Any:
    """The default of hyper-parameter ``name``, defined once, in the algorithms' config classes
    (every built-in algorithm that has the field gives it the same default)."""
    values = {f.default for cls in (FedAvgConfig, PerFedAvgConfig, LocalMOMLConfig) for f in fields(cls) if f.name == name}
    if len(values) != 1:
        raise AssertionError(f"the algorithms' configs disagree on the default of {name}: {sorted(map(repr, values))}")
    return values.pop()


def _strategy_default(name: str) -> Any:
    """The default of strategy argument ``name``, defined once, in :class:`MetaStrategy`'s signature."""
    return inspect.signature(MetaStrategy.__init__).parameters[name].default


@dataclass(frozen=True)
class ExperimentConfig:
    """A federated meta-learning experiment on Flower's simulation engine."""

    algorithm: str = C.LOCAL_MOML
    """``fedavg``, ``per-fedavg`` or ``local-moml``."""
    dataset: str = "fashion-mnist"
    """``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100`` (20 superclasses) or ``sinewave``."""
    partition: str = "fallah"
    """Image datasets: ``fallah`` (per-fedavg.txt Section 5), ``dirichlet`` or ``pathological``."""
    a_train: int = 68
    """Fallah split parameter a for the train split."""
    a_test: int = 0
    """Fallah split parameter a for the test split; 0: the paper's value (34; 15 for CIFAR-100, localmoml Section 6.2)."""
    dirichlet_alpha: float = 0.5
    """Dirichlet partition: concentration of each client's class proportions."""
    classes_per_client: int = 2
    """Pathological partition: classes per client."""
    train_per_client: int = 300
    """Dirichlet / pathological partitions: train samples per client."""
    test_per_client: int = 100
    """Dirichlet / pathological partitions: test samples per client."""
    data_dir: str = ""
    """Data directory (default: ``FEDMETA_DATA`` or the cache directory)."""
    download: bool = False
    """Let torchvision download missing data sets (needs internet)."""
    model: str = ""
    """Model name (``mlp-40-40``, ``mlp-80-60-elu``, ``sine-mlp``, ``cnn``); empty: the dataset's default."""
    num_clients: int = 50
    """n: training clients (simulated SuperNodes), one partition each."""
    num_new_clients: int = 0
    """Held-out clients (extra SuperNodes) that never train and are scored by new-client adaptation."""
    clients_per_round: int = 10
    """B: clients per round (cross-device); 0 means all n (cross-silo). With sampling-groups G > 1: B' per group."""
    sampling_groups: int = 1
    """G > 1: stratified sampling of B' clients from each of G groups (localmoml Section 6.2: 4 GPUs)."""
    num_rounds: int = 500
    """Communication rounds."""
    local_steps: int = _algorithm_default("local_steps")
    """tau (Per-FedAvg) / H (LocalMOML): local steps per round."""
    inner_lr: float = _algorithm_default("inner_lr")
    """alpha: adaptation step size (training and personalized evaluation)."""
    meta_lr: float = _algorithm_default("meta_lr")
    """Per-FedAvg's beta: local meta step size."""
    lr: float = _algorithm_default("lr")
    """LocalMOML's eta: local meta step size."""
    momentum: float = _algorithm_default("momentum")
    """LocalMOML's beta in (0, 1]."""
    batch_size: int = _algorithm_default("batch_size")
    """K: samples per batch (each of the three independent batches)."""
    init_batch_size: int = _algorithm_default("init_batch_size")
    """K0: samples for LocalMOML's memory reset."""
    inner_steps: int = _algorithm_default("inner_steps")
    """N: inner SGD steps of the adaptation (multistep-maml-ggs eq. 6)."""
    meta_gradient: str = _algorithm_default("meta_gradient")
    """Meta-gradient estimator: exact, first_order, hessian_free, ggs, zeroth_order or fo_muml."""
    delta: float = _algorithm_default("delta")
    """Finite-difference step (hessian_free) / Gaussian smoothing radius (ggs, zeroth_order)."""
    num_directions: int = _algorithm_default("num_directions")
    """U: Gaussian vectors per Hessian estimate (ggs, zeroth_order)."""
    outer_batch_size: int = _algorithm_default("outer_batch_size")
    """Samples in the outer (query) batch D' / S3; 0 = batch-size."""
    batch_draws: str = _algorithm_default("batch_draws")
    """``per-step``: fresh batches every local step; ``per-round``: one draw serves the round's local steps."""
    lr_decay_at: str = ""
    """Step-size schedule: comma-separated fractions of num-rounds (e.g. ``0.5,0.75``) from which the step sizes
    are multiplied by lr-decay; empty: constant."""
    lr_decay: float = _strategy_default("lr_decay")
    """Factor of each step-size decay, in (0, 1]."""
    memory_policy: str = ""
    """LocalMOML memory: ``keep`` / ``reset``; empty: keep for cross-silo, reset for cross-device."""
    eval_protocol: str = ""
    """Named protocol (``one-step`` or ``5-shot-10-step``); overrides eval-steps / eval-shots."""
    eval_steps: int = _strategy_default("eval_steps")
    """Personalized evaluation: fine-tuning steps on the client's train split."""
    eval_shots: int = _strategy_default("eval_shots")
    """Personalized evaluation: support-set size (0 = whole train split)."""
    eval_lr: float = 0.0
    """Personalized evaluation: fine-tuning step size (0 = inner-lr)."""
    evaluate_every: int = _strategy_default("evaluate_every")
    """Evaluate all clients every this many rounds (and after the last)."""
    seed: int = _strategy_default("seed")
    """Seeds the initial model, client sampling and every client's batch sampling."""
    num_cpus: float = 1.0
    """CPUs per simulated client (Ray actor); 2 cores / 1.0 = 2 clients in parallel."""
    num_gpus: float = 0.0
    """GPUs per simulated client (fractions allowed, e.g. 0.25)."""
    device: str = ""
    """Force the clients' device (``cpu``, ``cuda``); empty: CUDA when available, else CPU."""
    results_dir: str = "results"
    """Where the results JSON is written."""
    num_nodes: int = AUTO_NODES
    """Simulated SuperNodes. -1 (``AUTO_NODES``, the default): one multi-client node per actor slot of the Ray
    cluster (its CPUs / num-cpus, or GPUs / num-gpus), resolved by :func:`fedmeta.simulations.run.simulate`
    (docs/cluster.md); under ``flwr run``, as many nodes as the federation has SuperNodes. 0: one node per
    client (what a deployment of one SuperNode per client uses). Fewer than the clients: each node hosts a
    block of clients and trains its sampled clients together (vectorized, :mod:`fedmeta.batched`); the
    average over clients, each client's memory and the per-client sampling are those of one client per node."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    """Multi-client nodes: clients per vectorized call (bounds memory)."""
    vectorize: str = "auto"
    """Multi-client nodes: ``auto`` (vmap, loop where vmap cannot), ``vmap`` or ``loop``."""
    memory_dir: str = ""
    """Directory of the clients' memories (memory banks on multi-client nodes, a file per client otherwise);
    empty: ``<checkpoint-dir>/memory`` when checkpointing, else a temporary directory per run on
    multi-client nodes and ``context.state`` on single-client nodes."""
    ray_address: str = ""
    """An existing Ray cluster to run the clients on (``host:port`` of its head, or ``auto``); empty: the
    ``RAY_ADDRESS`` environment variable if set, else Ray starts inside this process. On a multi-node cluster
    the clients' memories must be on a directory every host mounts (checked before round 1; docs/cluster.md)."""
    max_update_norm_ratio: float = 0.0
    """Update screening: reject a reply whose update norm exceeds this many times the round's median; 0: off."""
    min_valid_replies: int = _strategy_default("min_valid_replies")
    """Keep the previous global model when fewer valid train replies remain in a round."""
    max_failed_rounds: int = _strategy_default("max_failed_rounds")
    """Stop the run (exit non-zero) after this many consecutive rounds without a valid train reply; 0: never stop."""
    check_data: bool = True
    """Before the first message, resolve the data set and build client 0's data in the server's process
    (``flwr run .``); turn off when the ServerApp's machine has no copy of the clients' data."""
    round_timeout: float = 3600.0
    """Seconds to wait for a round's replies; nodes that have not replied are counted in ``num-missing``."""
    checkpoint: bool = True
    """Write a checkpoint (model, round, history) after every round to ``checkpoint-dir``."""
    checkpoint_dir: str = ""
    """Where the checkpoint goes; empty: ``<results-dir>/checkpoints/<algorithm>-<dataset>-n<num-clients>-seed<seed>``."""
    resume: bool = False
    """Continue the run in ``checkpoint-dir`` from its last completed round (same settings; ``num-rounds`` may grow)."""

    def __post_init__(self) -> None:
        """Validate every field before any work starts: one ``ValueError`` naming the key (kebab-case),
        the value and what is allowed. Types first, then each field's own range, then the constraints
        between fields, then the algorithm's own validation."""
        for f in fields(self):
            object.__setattr__(self, f.name, _checked_type(f.name, getattr(self, f.name), type(f.default)))
        if self.algorithm == C.DIF_MAML:
            raise ValueError("algorithm 'dif-maml' is not an experiment of this config: it runs with `flwr run .` (its settings in "
                             "[tool.flwr.app.config.dif-maml]), fedmeta.simulations.dif_maml_app or fedmeta.dif_maml.simulate")
        for name, (options, empty_ok) in _CHOICES.items():
            _check_choice(name, getattr(self, name), options(), empty_ok)
        if self.device:
            _check_device(self.device)
        for name, (ok, allowed) in _RANGES.items():
            if not ok(getattr(self, name)):
                raise _bad(name, allowed, getattr(self, name))
        self._check_cross_field()
        try:
            # the algorithm's own validation, before any work starts (num-nodes = -1: checked as the most nodes it can become)
            (self if self.num_nodes != AUTO_NODES else dataclasses.replace(self, num_nodes=0)).strategy_kwargs()
        except ValueError as err:  # (all caught above; kept so no rule of the dataclasses goes unchecked)
            raise ValueError(f"{_kebab(str(err).split(' ', 1)[0])}: {err}") from None

    def _check_cross_field(self) -> None:
        n, new = self.num_clients, self.num_new_clients
        fallah = self.dataset != "sinewave" and self.partition == "fallah"
        if fallah and (n + new) % 2:
            raise _bad("num_clients", f"such that num-clients + num-new-clients is even for the Fallah split "
                                      f"(num-new-clients={new})", n)
        if self.sampling_groups > n:
            raise _bad("sampling_groups", f"an integer in [1, num-clients={n}]", self.sampling_groups)
        if self.sampling_groups > 1 and not 1 <= self.clients_per_round <= n // self.sampling_groups:
            raise _bad("clients_per_round", f"an integer in [1, {n // self.sampling_groups}] (clients per group) with "
                                            f"sampling-groups={self.sampling_groups} and num-clients={n}", self.clients_per_round)
        if self.clients_per_round > n:
            raise _bad("clients_per_round", f"an integer in [0, num-clients={n}] (0 = all clients)", self.clients_per_round)
        if self.num_nodes > self.num_partitions:
            raise _bad("num_nodes", f"an integer in [-1, {self.num_partitions}] (-1 = one node per Ray actor slot, 0 = one node "
                                    f"per client; at most num-clients + num-new-clients)", self.num_nodes)
        per_round = n if not self.clients_per_round else min(n, self.clients_per_round * self.sampling_groups)
        most = per_round if self.num_nodes == AUTO_NODES else min(per_round, self.num_supernodes)
        if self.min_valid_replies > most:
            raise _bad("min_valid_replies", f"an integer in [1, {most}] (at most the clients per round and the nodes)",
                       self.min_valid_replies)
        if self.model_name == "cnn" and self.dataset == "sinewave":
            raise _bad("model", "an MLP for dataset 'sinewave' (cnn needs images)", self.model)
        if self.dataset in NUM_CLASSES and self.partition == "pathological":
            c = NUM_CLASSES[self.dataset]
            if self.classes_per_client > c:
                raise _bad("classes_per_client", f"an integer in [1, {c}] (the classes of {self.dataset})", self.classes_per_client)
            for name in ("train_per_client", "test_per_client"):
                if getattr(self, name) < self.classes_per_client:
                    raise _bad(name, f"an integer >= classes-per-client={self.classes_per_client} (pathological partition)",
                               getattr(self, name))
        try:
            self.decay_fractions
        except ValueError:
            raise _bad("lr_decay_at", "empty or increasing comma-separated fractions in (0, 1), e.g. '0.5,0.75'", self.lr_decay_at) from None
        if self.resume and not self.checkpoint:
            raise _bad("resume", "false when checkpoint is false (there is no checkpoint to resume from)", self.resume)
        if self.vectorize == "vmap":
            algo = algorithms.get(self.algorithm)
            fields_ = C.field_names(algo.config)
            hp = algo.config(**{f: getattr(self, f) for f in fields_ if f in _FIELDS and f != "memory_policy"})
            if algo.vmap_refusal(hp):
                raise _bad("vectorize", f"'auto' or 'loop' with meta-gradient={self.meta_gradient!r} ('vmap' supports "
                                        f"meta-gradient in {list(VMAP_ESTIMATORS)})", self.vectorize)

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        """Parse kebab-case (or snake_case) keys, as from ``[tool.flwr.app.config]``, ``flwr run
        --run-config`` or the command line (string values are parsed with the field's type).

        Every problem is one ``ValueError`` naming the key, the value and what is allowed; an unknown
        key suggests the nearest valid one."""
        known = {f.name: type(f.default) for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in values.items():
            text = key if isinstance(key, str) else repr(key)
            if text == C.DIF_MAML or text.startswith(C.DIF_MAML + "."):
                continue  # the [tool.flwr.app.config.dif-maml] section: fedmeta.simulations.dif_maml_app's settings
            name = text.replace("-", "_")
            if name not in known:
                options = sorted(_kebab(k) for k in known)
                near = difflib.get_close_matches(_kebab(text), options, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown config key {text!r} (value {value!r}){hint} (valid keys: {', '.join(options)})")
            if name in spelled:
                raise ValueError(f"config key {_kebab(name)!r} is given twice, as {spelled[name]!r} and {text!r} (value {value!r})")
            spelled[name] = text
            kwargs[name] = _coerce(name, value, known[name])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)

    # --- what the experiment is made of ---------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]

    @property
    def num_partitions(self) -> int:
        """All clients (data partitions): the training clients plus the held-out new clients."""
        return self.num_clients + self.num_new_clients

    @property
    def num_supernodes(self) -> int:
        """Simulated SuperNodes: ``num_nodes``, or one per client (``num_nodes = -1`` must be resolved first)."""
        if self.num_nodes == AUTO_NODES:
            raise ValueError("num-nodes = -1 (one node per Ray actor slot) is resolved when a simulation starts "
                             "(fedmeta.simulations.run.simulate); elsewhere set num-nodes to a number")
        return self.num_nodes or self.num_partitions

    def with_nodes_for(self, slots: int) -> "ExperimentConfig":
        """``num_nodes = -1`` resolved to ``slots`` actor slots (at least 1, at most the clients); else unchanged."""
        if self.num_nodes != AUTO_NODES:
            return self
        return self.replace(num_nodes=max(1, min(slots, self.num_partitions)))

    @property
    def stem(self) -> str:
        """The experiment's file name stem: ``<algorithm>-<dataset>-n<num-clients>-seed<seed>``."""
        return f"{self.algorithm}-{self.dataset}-n{self.num_clients}-seed{self.seed}"

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint directory, or ``None`` when the run does not checkpoint."""
        if not self.checkpoint:
            return None
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.results_dir) / "checkpoints" / self.stem

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint: all but where files go, the
        number of rounds (a resumed run may extend it), the timeout and Ray's resources."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_FINGERPRINT}

    @property
    def eval_setting(self) -> tuple[int, int]:
        """(fine-tuning steps, support-set size) of personalized evaluation."""
        return EVAL_PROTOCOLS[self.eval_protocol] if self.eval_protocol else (self.eval_steps, self.eval_shots)

    @property
    def decay_fractions(self) -> tuple[float, ...]:
        """``lr-decay-at`` parsed: the fractions of num-rounds where the step sizes decay (``ValueError`` if malformed)."""
        out = tuple(float(m) for m in self.lr_decay_at.split(",")) if self.lr_decay_at.strip() else ()
        if not all(0 < m < 1 for m in out) or list(out) != sorted(set(out)):
            raise ValueError(self.lr_decay_at)
        return out

    def data_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fedmeta.data.client_data` (besides the partition id)."""
        if self.dataset == "sinewave":
            return dict(num_clients=self.num_partitions, seed=self.seed)
        params: dict[str, Any] = {
            "fallah": dict(a_train=self.a_train, **({"a_test": self.a_test} if self.a_test else {})),
            "dirichlet": dict(alpha=self.dirichlet_alpha, train_per_client=self.train_per_client, test_per_client=self.test_per_client),
            "pathological": dict(classes_per_client=self.classes_per_client, train_per_client=self.train_per_client,
                                 test_per_client=self.test_per_client),
        }[self.partition]
        return dict(num_clients=self.num_partitions, seed=self.seed, partition=self.partition, root=self.data_dir or None,
                    download=self.download, **params)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1,) if self.dataset == "sinewave" else IMAGE_SHAPES[self.dataset]

    @property
    def num_classes(self) -> int:
        """Model outputs: classes (superclasses for CIFAR-100), or 1 for regression."""
        return 1 if self.dataset == "sinewave" else NUM_CLASSES[self.dataset]

    def build_model(self) -> nn.Module:
        return build_model(self.model_name, self.input_shape, self.num_classes)

    @property
    def criterion(self):
        return nn.functional.mse_loss if self.dataset == "sinewave" else nn.functional.cross_entropy

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the fedmeta strategy for this experiment."""
        hp_cls = algorithms.get(self.algorithm).config
        # The algorithm's fields that the experiment sets (a user's algorithm may have others: their defaults).
        hp = {f: getattr(self, f) for f in C.field_names(hp_cls) if f in _FIELDS and f != "memory_policy"}
        if "memory_policy" in C.field_names(hp_cls):
            hp["memory_policy"] = self.memory_policy or None  # empty: the strategy's default for cross-silo / cross-device
        hp_cls(**{k: v for k, v in hp.items() if v is not None})  # validate now
        eval_steps, eval_shots = self.eval_setting
        return dict(
            num_clients=self.num_partitions,
            num_nodes=self.num_supernodes,
            new_clients=holdout_partitions(self.num_partitions, self.num_new_clients, self.seed),
            clients_per_round=self.clients_per_round or None,
            sampling_groups=self.sampling_groups,
            seed=self.seed,
            eval_steps=eval_steps,
            eval_shots=eval_shots,
            eval_lr=self.eval_lr or None,
            lr_decay_at=self.decay_fractions,
            lr_decay=self.lr_decay,
            evaluate_every=self.evaluate_every,
            max_update_norm_ratio=self.max_update_norm_ratio or None,
            min_valid_replies=self.min_valid_replies,
            max_failed_rounds=self.max_failed_rounds,
            **hp,
        )


_FIELDS = frozenset(f.name for f in fields(ExperimentConfig))

_NOT_IN_FINGERPRINT = frozenset({"num-rounds", "results-dir", "data-dir", "download", "memory-dir", "checkpoint", "checkpoint-dir",
                                  "resume", "round-timeout", "num-cpus", "num-gpus", "max-failed-rounds", "check-data",
                                  "ray-address"})


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _bad(name: str, allowed: str, value: Any) -> ValueError:
    """The one error format: ``<kebab-key> must be <allowed>, got <value>``."""
    return ValueError(f"{_kebab(name)} must be {allowed}, got {value!r}")


_INT64 = 2**63
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Parse a string value (command line, ``--run-config``) with the field's type; other values are
    passed on unchanged and type-checked by ``__post_init__`` (so ``True`` never becomes 1 and 2.5
    never becomes 2)."""
    if not isinstance(value, str) or kind is str:
        return value
    text = value.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise _bad(name, f"true or false (or one of {list(_TRUE[1:] + _FALSE[1:])})", value)
    if kind is int:
        try:
            return int(text, 10)
        except ValueError:
            raise _bad(name, "an integer", value) from None
    try:
        number = float(text)
    except ValueError:
        raise _bad(name, "a finite number", value) from None
    if not math.isfinite(number):
        raise _bad(name, "a finite number", value)
    return number


def _checked_type(name: str, value: Any, kind: type) -> Any:
    """``value`` as a plain ``kind`` (numpy scalars become Python ones), or a ``ValueError``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _bad(name, "true or false", value)
    if kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            if -_INT64 <= int(value) < _INT64:
                return int(value)
            raise _bad(name, "an integer that fits in 64 bits", value)
        raise _bad(name, _RANGES[name][1] if name in _RANGES else "an integer", value)
    if kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
        raise _bad(name, _RANGES[name][1] if name in _RANGES else "a finite number", value)
    if isinstance(value, str):
        return value
    if name in _CHOICES:
        options, empty_ok = _CHOICES[name]
        raise _bad(name, ("empty or " if empty_ok else "") + f"one of {list(options())}", value)
    raise _bad(name, "a string", value)


def _check_choice(name: str, value: str, options: Sequence[str], empty_ok: bool) -> None:
    if (empty_ok and value == "") or value in options:
        return
    near = difflib.get_close_matches(value, list(options), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"{_kebab(name)} must be {'empty or ' if empty_ok else ''}one of {list(options)}, got {value!r}{hint}")


def _check_device(device: str) -> None:
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise _bad("device", "empty (CUDA when available, else CPU) or a torch device such as 'cpu', 'cuda' or 'cuda:1'",
                   device) from None


_CHOICES: dict[str, tuple[Callable[[], Sequence[str]], bool]] = {
    # field: (its allowed values, whether empty means "the default")
    "algorithm": (lambda: sorted(C.ALGORITHM_CONFIGS), False),
    "dataset": (lambda: sorted(DATASET_MODELS), False),
    "partition": (lambda: PARTITIONS, False),
    "model": (lambda: sorted(MODELS), True),
    "meta_gradient": (lambda: META_GRADIENTS, False),
    "memory_policy": (lambda: C.MEMORY_POLICIES, True),
    "batch_draws": (lambda: C.BATCH_DRAW_CHOICES, False),
    "eval_protocol": (lambda: sorted(EVAL_PROTOCOLS), True),
    "vectorize": (lambda: VECTORIZE, False),
}
"""The fields with a fixed set of values."""


def _at_least(low: int, why: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"an integer >= {low}{why}"


_POSITIVE = ((lambda v: v > 0), "a finite number > 0")
_NONNEG = ((lambda v: v >= 0), "a finite number >= 0")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # field: (test of the type-checked value, what is allowed); constraints between fields are in _check_cross_field
    "a_train": _at_least(2, " (samples per class)"),
    "a_test": ((lambda v: v == 0 or v >= 2), "0 (the paper's value) or an integer >= 2 (samples per class)"),
    "dirichlet_alpha": ((lambda v: v > 0), "a finite number > 0 (Dirichlet concentration)"),
    "classes_per_client": _at_least(1),
    "train_per_client": _at_least(1),
    "test_per_client": _at_least(1),
    "num_clients": _at_least(1),
    "num_new_clients": _at_least(0),
    "clients_per_round": _at_least(0, " (0 = all clients)"),
    "sampling_groups": _at_least(1),
    "num_rounds": _at_least(1),
    "local_steps": _at_least(1),
    "inner_lr": _NONNEG,
    "meta_lr": _POSITIVE,
    "lr": _POSITIVE,
    "momentum": ((lambda v: 0 < v <= 1), "a finite number in (0, 1]"),
    "batch_size": _at_least(1),
    "init_batch_size": _at_least(1),
    "inner_steps": _at_least(1),
    "delta": _POSITIVE,
    "num_directions": _at_least(1),
    "eval_steps": _at_least(0),
    "eval_shots": _at_least(0, " (0 = the whole train split)"),
    "eval_lr": ((lambda v: v >= 0), "a finite number >= 0 (0 = inner-lr)"),
    "outer_batch_size": _at_least(0, " (0 = batch-size)"),
    "lr_decay": ((lambda v: 0 < v <= 1), "a finite number in (0, 1]"),
    "evaluate_every": _at_least(0, " (0 = never)"),
    "seed": ((lambda v: v >= 0), "an integer in [0, 2**63 - 1]"),
    "num_cpus": _POSITIVE,
    "num_gpus": _NONNEG,
    "num_nodes": _at_least(AUTO_NODES, " (-1 = one node per Ray actor slot, 0 = one node per client)"),
    "chunk_size": _at_least(1),
    "max_update_norm_ratio": ((lambda v: v == 0 or v > 1), "0 (off) or a finite number > 1"),
    "min_valid_replies": _at_least(1),
    "max_failed_rounds": _at_least(0, " (0 = never stop)"),
    "round_timeout": _POSITIVE,
}
"""Each field's own range (every field with one; the others are strings or booleans)."""


def parse_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown flag also names the nearest valid one
    (``fedmeta-sim: error: unrecognized arguments: --num-round 3; did you mean '--num-rounds'?``, exit 2)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")})
        flag = next((e for e in extra if e.startswith("-")), extra[0]).split("=", 1)[0]
        near = difflib.get_close_matches(flag, flags, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args
