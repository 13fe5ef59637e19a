"""One experiment's configuration: a frozen dataclass, parsed once, with the defaults in one place.

The same keys (kebab-case) are accepted from ``[tool.flwr.app.config]`` / ``flwr run
--run-config`` and, with dashes, from the command line (``--num-rounds 100``).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Mapping

from torch import nn

from fedmeta import config as C
from fedmeta.data import IMAGE_SHAPES, NUM_CLASSES
from fedmeta.models import MODELS, build_model
from fedmeta.strategies.aggregation import holdout_partitions

DATASET_MODELS = {"fashion-mnist": "mlp-40-40", "mnist": "mlp-40-40", "cifar10": "cnn", "cifar100": "cnn", "sinewave": "sine-mlp"}
"""The default model of each dataset (the papers' MLPs; a small CNN for CIFAR)."""
PARTITIONS = ("fallah", "dirichlet", "pathological")
EVAL_PROTOCOLS = {"one-step": (1, 0), "5-shot-10-step": (10, 5)}
"""Named personalized-evaluation protocols: (fine-tuning steps, support-set size; 0 = whole train split).
``one-step``: per-fedavg.txt Section 5; ``5-shot-10-step``: localmoml Section 6.2."""


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
    local_steps: int = 4
    """tau (Per-FedAvg) / H (LocalMOML): local steps per round."""
    inner_lr: float = 0.01
    """alpha: adaptation step size (training and personalized evaluation)."""
    meta_lr: float = 0.05
    """Per-FedAvg's beta: local meta step size."""
    lr: float = 0.05
    """LocalMOML's eta: local meta step size."""
    momentum: float = 0.5
    """LocalMOML's beta in (0, 1]."""
    batch_size: int = 5
    """K: samples per batch (each of the three independent batches)."""
    init_batch_size: int = 5
    """K0: samples for LocalMOML's memory reset."""
    inner_steps: int = 1
    """N: inner SGD steps of the adaptation (multistep-maml-ggs eq. 6)."""
    meta_gradient: str = "exact"
    """Meta-gradient estimator: exact, first_order, hessian_free, ggs, zeroth_order or fo_muml."""
    delta: float = 1e-5
    """Finite-difference step (hessian_free) / Gaussian smoothing radius (ggs, zeroth_order)."""
    num_directions: int = 10
    """U: Gaussian vectors per Hessian estimate (ggs, zeroth_order)."""
    memory_policy: str = ""
    """LocalMOML memory: ``keep`` / ``reset``; empty: keep for cross-silo, reset for cross-device."""
    eval_protocol: str = ""
    """Named protocol (``one-step`` or ``5-shot-10-step``); overrides eval-steps / eval-shots."""
    eval_steps: int = 1
    """Personalized evaluation: fine-tuning steps on the client's train split."""
    eval_shots: int = 0
    """Personalized evaluation: support-set size (0 = whole train split)."""
    evaluate_every: int = 50
    """Evaluate all clients every this many rounds (and after the last)."""
    seed: int = 0
    """Seeds the initial model, client sampling and every client's batch sampling."""
    num_cpus: float = 1.0
    """CPUs per simulated client (Ray actor); 2 cores / 1.0 = 2 clients in parallel."""
    num_gpus: float = 0.0
    """GPUs per simulated client (fractions allowed, e.g. 0.25)."""
    device: str = ""
    """Force the clients' device (``cpu``, ``cuda``); empty: CUDA when available, else CPU."""
    results_dir: str = "results"
    """Where the results JSON is written."""
    num_nodes: int = 0
    """Simulated SuperNodes. 0: one per client. Fewer than the clients: each node hosts a block of
    clients and trains its sampled clients together (vectorized, :mod:`fedmeta.batched`)."""
    chunk_size: int = 100
    """Multi-client nodes: clients per vectorized call (bounds memory)."""
    vectorize: str = "auto"
    """Multi-client nodes: ``auto`` (vmap, loop where vmap cannot), ``vmap`` or ``loop``."""
    memory_dir: str = ""
    """Multi-client nodes: directory of the clients' memory banks; empty: a temporary directory per run."""

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")

        if self.algorithm not in C.ALGORITHM_CONFIGS:
            raise bad("algorithm", f"one of {sorted(C.ALGORITHM_CONFIGS)}")
        if self.dataset not in DATASET_MODELS:
            raise bad("dataset", f"one of {sorted(DATASET_MODELS)}")
        if self.model and self.model not in MODELS:
            raise bad("model", f"one of {sorted(MODELS)}")
        if self.partition not in PARTITIONS:
            raise bad("partition", f"one of {list(PARTITIONS)}")
        if self.eval_protocol and self.eval_protocol not in EVAL_PROTOCOLS:
            raise bad("eval_protocol", f"empty or one of {sorted(EVAL_PROTOCOLS)}")
        if self.num_new_clients < 0:
            raise bad("num_new_clients", "an integer >= 0")
        fallah = self.dataset != "sinewave" and self.partition == "fallah"
        if self.num_clients < 1 or (fallah and (self.num_clients + self.num_new_clients) % 2):
            raise bad("num_clients", "an integer >= 1 (num-clients + num-new-clients even for the Fallah split)")
        if not 1 <= self.sampling_groups <= self.num_clients:
            raise bad("sampling_groups", f"in [1, {self.num_clients}]")
        if self.sampling_groups > 1 and not 1 <= self.clients_per_round <= self.num_clients // self.sampling_groups:
            raise bad("clients_per_round", f"in [1, {self.num_clients // self.sampling_groups}] (clients per group) with {self.sampling_groups} groups")
        if not 0 <= self.clients_per_round <= self.num_clients:
            raise bad("clients_per_round", f"in [0, {self.num_clients}] (0 = all clients)")
        for name in ("num_rounds",):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.evaluate_every < 0:
            raise bad("evaluate_every", "an integer >= 0")
        if not self.num_cpus > 0 or self.num_gpus < 0:
            raise bad("num_cpus" if not self.num_cpus > 0 else "num_gpus", "> 0 (num-cpus) / >= 0 (num-gpus)")
        if not 0 <= self.num_nodes <= self.num_partitions:
            raise bad("num_nodes", f"in [0, {self.num_partitions}] (0 = one node per client; clients incl. new clients)")
        from fedmeta.batched import check_vectorize

        check_vectorize(self.vectorize, self.chunk_size)
        if self.memory_policy not in ("", *C.MEMORY_POLICIES):
            raise bad("memory_policy", f"empty or one of {list(C.MEMORY_POLICIES)}")
        self.strategy_kwargs()  # the algorithm's own validation, before any work starts

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        """Parse kebab-case (or snake_case) keys; unknown keys fail with the nearest valid key."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                options = [k.replace("_", "-") for k in known]
                near = difflib.get_close_matches(key.replace("_", "-"), options, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown config key {key!r}{hint} (valid keys: {', '.join(sorted(options))})")
            kwargs[name] = _coerce(name, value, type(getattr(cls, name)))
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
        """Simulated SuperNodes: ``num_nodes``, or one per client."""
        return self.num_nodes or self.num_partitions

    @property
    def eval_setting(self) -> tuple[int, int]:
        """(fine-tuning steps, support-set size) of personalized evaluation."""
        return EVAL_PROTOCOLS[self.eval_protocol] if self.eval_protocol else (self.eval_steps, self.eval_shots)

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
        hp_cls = C.ALGORITHM_CONFIGS[self.algorithm]
        hp = {f: getattr(self, f) for f in C.field_names(hp_cls) if f != "memory_policy"}
        if self.algorithm == C.LOCAL_MOML:
            hp["memory_policy"] = self.memory_policy or None
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
            evaluate_every=self.evaluate_every,
            **hp,
        )


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Values from the command line arrive as strings; ints must not silently become floats."""
    try:
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value, 10)
        if kind is float:
            return float(value)
        return str(value)
    except ValueError:
        raise ValueError(f"{name.replace('_', '-')} must be a {kind.__name__}, got {value!r}") from None
