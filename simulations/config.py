"""One experiment's configuration: a frozen dataclass, parsed once, with the defaults in one place.

The same keys (kebab-case) are accepted from ``[tool.flwr.app.config]`` / ``flwr run
--run-config`` and, with dashes, from the command line (``--num-rounds 100``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from fedmeta import algorithms
from fedmeta import config as C
from fedmeta import settings as S
from fedmeta.algorithms import FedAvgConfig, LocalMOMLConfig, PerFedAvgConfig
from fedmeta.config import HP
from fedmeta.strategies.base import MetaStrategy
from fedmeta.batched import DEFAULT_CHUNK_SIZE, VECTORIZE, VMAP_ESTIMATORS
from fedmeta.data import IMAGE_SHAPES, NUM_CLASSES
from fedmeta.extras import MissingExtra
from fedmeta.flwr_partitions import DEFAULT_TEST_FRACTION, check_flwr_partition, is_flwr_partition
from fedmeta.models import MODELS, build_model
from fedmeta.strategies.aggregation import holdout_partitions
from fedmeta.strategies.nodes import AUTO_NODES
from fedmeta.tracking import TRACKING_DIR

DATASET_MODELS = {"fashion-mnist": "mlp-40-40", "mnist": "mlp-40-40", "cifar10": "cnn", "cifar100": "cnn", "sinewave": "sine-mlp"}
"""The default model of each dataset (the papers' MLPs; a small CNN for CIFAR)."""
PARTITIONS = ("fallah", "dirichlet", "pathological")
# AUTO_NODES (num-nodes = -1): one multi-client node per Ray actor slot (resolved when the simulation starts)
EVAL_PROTOCOLS = {"one-step": (1, 0), "5-shot-10-step": (10, 5)}
"""Named personalized-evaluation protocols: (fine-tuning steps, support-set size; 0 = whole train split).
``one-step``: per-fedavg.txt Section 5; ``5-shot-10-step``: localmoml Section 6.2."""


def _strategy_default(name: str) -> Any:
    """The default of strategy argument ``name``, defined once, in :class:`MetaStrategy`'s signature."""
    return inspect.signature(MetaStrategy.__init__).parameters[name].default


def _is_device(device: str) -> bool:
    if not device:
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


AlgorithmSettings = S.union("AlgorithmSettings", [PerFedAvgConfig, LocalMOMLConfig, FedAvgConfig], skip=("memory_policy",))
"""The built-in algorithms' hyper-parameters (alpha, beta, eta, tau/H, K, N, the estimator's settings, ...), each
declared once, in the algorithm's config (:mod:`fedmeta.algorithms`), with its range, paper symbol and default."""

_partition_size = S.int_at_least(1)


@dataclass(frozen=True)
class ExperimentConfig(AlgorithmSettings):  # type: ignore[misc, valid-type]
    """A federated meta-learning experiment on Flower's simulation engine: the data, the clients, the rounds, the
    evaluation, Ray's resources and the files, and (from :data:`AlgorithmSettings`) the algorithms'
    hyper-parameters. Every field is a :class:`fedmeta.settings.Setting`: its key (kebab case) in pyproject and
    ``--run-config``, its flag on the command line, its range and its help are declared here, once."""

    KEY_LABELS: ClassVar[bool] = True

    algorithm: str = S.choice(lambda: sorted(C.ALGORITHM_CONFIGS), default=C.LOCAL_MOML,
                              help="fedavg, per-fedavg, local-moml or a registered algorithm").field()
    dataset: str = S.choice(lambda: sorted(DATASET_MODELS), default="fashion-mnist",
                            help="fashion-mnist, mnist, cifar10, cifar100 (20 superclasses) or sinewave").field()
    partition: str = S.Setting(str, lambda: f"one of {list(PARTITIONS)} or 'flwr:<Partitioner>' (a Flower Datasets partitioner)",
                               lambda v: v in PARTITIONS or is_flwr_partition(v), choices=lambda: PARTITIONS,
                               help="image datasets: fallah (per-fedavg.txt Section 5), dirichlet, pathological, or "
                                    "flwr:<Partitioner> (flwr-datasets, e.g. flwr:DirichletPartitioner; docs/flwr-datasets.md)").field("fallah")
    partition_args: str = S.text("flwr:<Partitioner> partitions: the partitioner's arguments, key=value pairs separated by commas "
                                 "(alpha=0.5,min_partition_size=20) or a JSON object; num_partitions and seed come from "
                                 "num-clients + num-new-clients and seed, partition_by defaults to label").field("")
    test_fraction: float = S.Setting(float, "a number in (0, 1)", lambda v: 0 < v < 1,
                                     help="flwr:<Partitioner> partitions: share of each client's partition held out as its test "
                                          "data (stratified by label)").field(DEFAULT_TEST_FRACTION)
    a_train: int = S.int_at_least(2, " (samples per class)", help="Fallah split parameter a of the train split").field(68)
    a_test: int = S.Setting(int, "0 (the paper's value) or an integer >= 2 (samples per class)", lambda v: v == 0 or v >= 2,
                            help="Fallah split parameter a of the test split; 0: the paper's (34; 15 for CIFAR-100)").field(0)
    dirichlet_alpha: float = S.number_above(0, " (Dirichlet concentration)",
                                            help="Dirichlet partition: concentration of each client's class proportions").field(0.5)
    classes_per_client: int = S.int_at_least(1, help="pathological partition: classes per client").field(2)
    train_per_client: int = _partition_size.field(300, help="Dirichlet / pathological partitions: train samples per client")
    test_per_client: int = _partition_size.field(100, help="Dirichlet / pathological partitions: test samples per client")
    data_dir: str = S.text("data directory (default: FEDMETA_DATA or the cache directory)").field("")
    download: bool = S.flag("let torchvision download missing data sets (needs internet)").field(False)
    model: str = S.choice(lambda: sorted(MODELS), empty_ok=True,
                          help="model name; empty: the dataset's default (DATASET_MODELS)").field("")
    num_clients: int = S.int_at_least(1, symbol="n", help="training clients, one partition each").field(50)
    num_new_clients: int = S.int_at_least(0, help="held-out clients that never train, scored by new-client adaptation").field(0)
    clients_per_round: int = S.int_at_least(0, " (0 = all clients)", symbol="B",
                                            help="clients per round (cross-device); 0: all n (cross-silo); with "
                                                 "sampling-groups G > 1: B' per group").field(10)
    sampling_groups: int = S.int_at_least(1, symbol="G", help="G > 1: stratified sampling of B' clients from each of G groups "
                                                              "(localmoml Section 6.2: 4 GPUs)").field(1)
    num_rounds: int = S.int_at_least(1, help="communication rounds").field(500)
    lr_decay_at: str = S.text("step-size schedule: comma-separated fractions of num-rounds (e.g. 0.5,0.75) from which the "
                              "step sizes are multiplied by lr-decay; empty: constant").field("")
    lr_decay: float = HP.lr_decay.field()
    memory_policy: str = S.choice(lambda: C.MEMORY_POLICIES, empty_ok=True,
                                  help="LocalMOML's memory: keep / reset; empty: keep for cross-silo, reset for cross-device").field("")
    eval_protocol: str = S.choice(lambda: sorted(EVAL_PROTOCOLS), empty_ok=True,
                                  help="a named evaluation protocol (one-step, 5-shot-10-step); overrides eval-steps / eval-shots").field("")
    eval_steps: int = HP.eval_steps.field()
    eval_shots: int = HP.eval_shots.field()
    eval_lr: float = HP.eval_lr.field()
    evaluate_every: int = HP.evaluate_every.field()
    seed: int = HP.seed.field()
    num_cpus: float = S.number_above(0, help="CPUs per simulated node (Ray actor); 2 cores / 1.0 = 2 nodes in parallel").field(1.0)
    num_gpus: float = S.number_at_least(0, help="GPUs per simulated node (fractions allowed, e.g. 0.25)").field(0.0)
    device: str = S.Setting(str, "empty (CUDA when available, else CPU) or a torch device such as 'cpu', 'cuda' or 'cuda:1'",
                            _is_device, help="force the clients' device").field("")
    results_dir: str = S.text("where the results JSON is written").field("results")
    track: str = HP.track.field()
    tracking_dir: str = HP.tracking_dir.field()
    num_nodes: int = S.int_at_least(AUTO_NODES, " (-1 = one node per Ray actor slot, 0 = one node per client)",
                                    help="simulated SuperNodes. -1: one multi-client node per actor slot of the Ray cluster, resolved "
                                         "when the simulation starts (docs/cluster.md); under flwr run, the federation's SuperNodes. "
                                         "0: one node per client. Fewer than the clients: each node trains its sampled clients "
                                         "together (vectorized), with the numbers of one client per node").field(AUTO_NODES)
    chunk_size: int = S.int_at_least(1, help="multi-client nodes: clients per vectorized call (bounds memory)").field(DEFAULT_CHUNK_SIZE)
    vectorize: str = S.choice(lambda: VECTORIZE, help="multi-client nodes: auto (vmap; compiled where measured 1.5x faster on long rounds; loop where vmap cannot), vmap, compile (vmap under torch.compile) or loop").field("auto")
    memory_dir: str = S.text("directory of the clients' memories; empty: <checkpoint-dir>/memory when checkpointing, else a "
                             "temporary directory (multi-client nodes) or context.state (one client per node)").field("")
    ray_address: str = S.text("an existing Ray cluster (host:port of its head, or auto); empty: RAY_ADDRESS if set, else Ray "
                              "starts in this process. On a multi-node cluster the memories must be on a shared directory "
                              "(docs/cluster.md)").field("")
    max_update_norm_ratio: float = S.Setting(float, "0 (off) or a finite number > 1", lambda v: v == 0 or v > 1,
                                             help="update screening: reject a reply whose update norm exceeds this many times the "
                                                  "round's median").field(0.0)
    min_valid_replies: int = S.int_at_least(1, help="keep the previous global model when fewer valid train replies remain "
                                                    "in a round").field(_strategy_default("min_valid_replies"))
    max_failed_rounds: int = S.int_at_least(0, " (0 = never stop)", help="stop the run (exit non-zero) after this many consecutive "
                                                                        "rounds without a valid train reply").field(_strategy_default("max_failed_rounds"))
    check_data: bool = S.flag("before the first message, build client 0's data in the server's process (flwr run .); turn off "
                              "when the ServerApp's machine has no copy of the clients' data").field(True)
    round_timeout: float = S.number_above(0, help="seconds to wait for a round's replies; nodes that have not replied are "
                                                  "counted in num-missing").field(3600.0)
    checkpoint: bool = S.flag("write a checkpoint (model, round, history) after every round to checkpoint-dir").field(True)
    checkpoint_dir: str = S.text("where the checkpoint goes; empty: <results-dir>/checkpoints/<algorithm>-<dataset>-n<num-clients>"
                                 "-seed<seed>").field("")
    resume: bool = S.flag("continue the run in checkpoint-dir from its last completed round (same settings; num-rounds may "
                          "grow)").field(False)

    def __post_init__(self) -> None:
        """Validate every field before any work starts: one ``ValueError`` naming the key (kebab-case),
        the value and what is allowed. Types first, then each field's own range, then the constraints
        between fields, then the algorithm's own validation."""
        if self.algorithm == C.DIF_MAML:
            raise ValueError("algorithm 'dif-maml' is not an experiment of this config: it runs with `flwr run .` (its settings in "
                             "[tool.flwr.app.config.dif-maml]), fedmeta.simulations.dif_maml_app or fedmeta.dif_maml.simulate")
        super().__post_init__()
        self._check_cross_field()
        try:
            # the algorithm's own validation, before any work starts (num-nodes = -1: checked as the most nodes it can become)
            (self if self.num_nodes != AUTO_NODES else dataclasses.replace(self, num_nodes=0)).strategy_kwargs()
        except ValueError as err:  # (all caught above; kept so no rule of the dataclasses goes unchecked)
            raise ValueError(f"{S.kebab(str(err).split(' ', 1)[0])}: {err}") from None

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
        self._check_flwr_partition()
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
        if self.vectorize in ("vmap", "compile"):
            if algorithms.get(self.algorithm).vmap_refusal(self.algorithm_config()):
                raise _bad("vectorize", f"'auto' or 'loop' with meta-gradient={self.meta_gradient!r} ('{self.vectorize}' supports "
                                        f"meta-gradient in {list(VMAP_ESTIMATORS)})", self.vectorize)

    def _check_flwr_partition(self) -> None:
        """A ``flwr:`` partition's name and arguments, checked on a partitioner built without data (one error naming
        the partitioner or the argument; the missing extra named in one line)."""
        flwr = self.dataset != "sinewave" and is_flwr_partition(self.partition)
        if not flwr:
            if self.partition_args.strip() and not is_flwr_partition(self.partition):
                raise _bad("partition_args", f"empty unless partition is flwr:<Partitioner> (partition={self.partition!r})",
                           self.partition_args)
            return
        try:
            check_flwr_partition(self.partition, self.partition_args, self.num_partitions, self.seed)
        except MissingExtra as err:
            raise ValueError(str(err)) from None

    # --- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        """Parse kebab-case (or snake_case) keys, as from ``[tool.flwr.app.config]``, ``flwr run --run-config`` or the
        command line (:meth:`fedmeta.settings.Settings.from_mapping`); the ``dif-maml`` section is
        :mod:`fedmeta.simulations.dif_maml_app`'s."""
        return super().from_mapping(values, skip=lambda key: key == C.DIF_MAML or key.startswith(C.DIF_MAML + "."))

    def to_dict(self) -> dict[str, Any]:
        return {S.kebab(k): v for k, v in dataclasses.asdict(self).items()}

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
    def tracking_path(self) -> Path:
        """Where the run's tracker writes (the ``track`` setting): ``tracking-dir``, else ``<results-dir>/tracking``."""
        return Path(self.tracking_dir) if self.tracking_dir else Path(self.results_dir) / TRACKING_DIR

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
        if is_flwr_partition(self.partition):
            return dict(num_clients=self.num_partitions, seed=self.seed, partition=self.partition, root=self.data_dir or None,
                        download=self.download, partition_args=self.partition_args, test_fraction=self.test_fraction)
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

    def algorithm_config(self) -> Any:
        """The algorithm's config (:mod:`fedmeta.algorithms`) with this experiment's values of its fields (a user's
        algorithm may have others: their defaults); an empty memory-policy is the config's default here (the
        strategy picks keep or reset by cross-silo / cross-device)."""
        cls = algorithms.get(self.algorithm).config
        names = C.field_names(cls) & _FIELDS
        return cls(**{f: getattr(self, f) for f in names if f != "memory_policy" or self.memory_policy})

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the fedmeta strategy for this experiment."""
        hp_cfg = self.algorithm_config()
        hp = {f: getattr(hp_cfg, f) for f in C.field_names(type(hp_cfg)) & _FIELDS}
        if "memory_policy" in hp:
            hp["memory_policy"] = self.memory_policy or None  # empty: the strategy's default for cross-silo / cross-device
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
                                  "ray-address", "track", "tracking-dir"})


def _bad(name: str, allowed: str, value: Any) -> ValueError:
    """The one error format: ``<kebab-key> must be <allowed>, got <value>``."""
    return ValueError(f"{S.kebab(name)} must be {allowed}, got {value!r}")


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
