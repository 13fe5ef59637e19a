"""Client data sets of the two papers' experiments (no Flower here).

* Sinewave regression, localmoml-memory-based-maml.txt Section 6.1: 25 training tasks
  ``f(x) = A sin(x + phi)`` with ``A in {1, ..., 5}``, ``phi = i pi / 5``, ``i in {1, ..., 5}``;
  data "randomly sampled in an online manner", ``x ~ Unif(-5, 5)``.
* Image classification on MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 (labels: its 20
  superclasses, localmoml Section 6.2), read through torchvision's dataset classes from a data
  directory (:func:`locate_dataset`) and kept in memory as uint8 ``[N, C, H, W]``
  (:func:`load_dataset`). Only the samples handed to clients are converted to float32.
* Three label-skew partitions of an image data set over clients (:func:`partitions`), each giving
  every client a training set and a test set drawn with the same class distribution:

  - ``fallah``: per-fedavg.txt Section 5, reused by localmoml Section 6.2: half of the ``n``
    clients hold ``a`` images of each of the first half of the classes, the other half ``a/2``
    (rounded down) images of one first-half class and ``2a`` images of one second-half class
    (CIFAR-100: 10 + 10 superclasses). Test data is divided "with the same distribution as the
    one for the training data" (``a = 68`` for training; ``a = 34`` for test, ``a = 15`` for
    CIFAR-100's test set).
  - ``dirichlet``: client class proportions ``p_i ~ Dir(alpha 1_C)``.
  - ``pathological``: ``c`` classes per client, equally many samples of each.

These partitions are written in numpy rather than taken from ``flwr-datasets`` (0.6.1): its
partitioners work on a ``datasets.Dataset``, and ``datasets`` pulls in pyarrow, pandas,
huggingface-hub, hf-xet and aiohttp (about 250 MB installed, none of it otherwise needed here,
in every simulation process). They also partition each split on its own, so a client's test
data would not share its training data's class distribution; their Dirichlet partitioner draws
per-class shares over clients (random client sizes) rather than per-client class proportions
with fixed sizes, and their pathological partitioner splits all of a class's samples between the
clients holding it (sizes depend on the data set). Any of their partitioners is still available,
with the optional extra: ``partition="flwr:<PartitionerName>"`` (:mod:`fedmeta.flwr_partitions`)
partitions the train split and holds out a stratified share of each client's partition as its test
data, through the same caches and :func:`client_data`.

The files and their loading live in :mod:`fedmeta.datasets`, the class plans of the partitions in
:mod:`fedmeta.class_plans`; this module builds clients from them (and re-exports their public names).

:func:`client_data` builds one client's tensors on demand (a simulation process of 10,000
virtual clients holds the uint8 data set, the split's index plan and the clients it serves);
:func:`partitions` builds all of them.

Every client's data is a :class:`ClientData`; :meth:`ClientData.sample` is the ``Sampler`` the
meta-learning functions of :mod:`fedmeta.meta` draw their independent batches from. All
randomness comes from explicit ``numpy.random.Generator`` / ``torch.Generator`` objects.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmeta.class_plans import (  # noqa: F401  (re-exported: fedmeta.data is the public module)
    ClientRole,
    FALLAH_A_TEST,
    PARTITION_DEFAULTS,
    Plan,
    _PLANS,
    _is_int,
    _partition_params,
    dirichlet_plans,
    fallah_class_plan,
    fallah_class_roles,
    fallah_plans,
    fallah_split,
    partition_indices,
    pathological_classes,
    pathological_plans,
    split_by_plan,
)
from fedmeta import flwr_partitions
from fedmeta.datasets import (  # noqa: F401
    FASHION_MNIST_PACKAGE,
    IDX_FILES,
    IMAGE_SHAPES,
    NUM_CLASSES,
    PARTITIONED_DATASETS,
    SYSTEM_DATA_ENV,
    SYSTEM_FASHION_MNIST_DIR,
    _check_dataset,
    _load_dataset,
    load_dataset,
    load_fashion_mnist,
    locate_dataset,
    locate_fashion_mnist,
    system_fashion_mnist_dir,
)

Batch = tuple[Tensor, Tensor]

DATASETS: tuple[str, ...] = (*PARTITIONED_DATASETS, "sinewave")
"""Values accepted by :func:`client_data`'s ``dataset``."""

_TENSOR_FIELDS = ("x_train", "y_train", "x_test", "y_test")


# --------------------------------------------------------------------------- client data


@dataclass(frozen=True)
class ClientData:
    """One client's data.

    Attributes
    ----------
    x_train, x_test
        Inputs, float32, one sample per row: images ``[N, C, H, W]`` in ``[0, 1]``, sinewave
        ``[N, 1]``.
    y_train, y_test
        Targets: int64 class labels ``[N]`` for classification, float32 ``[N, 1]`` for
        regression.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> ClientData:
        """Return this data with every tensor on ``device`` (``self`` if all already are).

        Meant to be called once per client, so :meth:`sample` only indexes on the device.
        """
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        if all(moved[name] is getattr(self, name) for name in _TENSOR_FIELDS):
            return self
        return dataclasses.replace(self, **moved)

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    def sample(self, k: int, generator: torch.Generator) -> Batch:
        """Draw a batch of ``k`` training samples without replacement.

        The samples of one batch are distinct; separate calls are independent batches (the
        three batches ``D, D', D''`` of per-fedavg.txt eq. 9 / localmoml Algorithm 3 are three
        calls). If ``k >= num_train`` all training samples are returned in a random order.

        Parameters
        ----------
        k
            Batch size (>= 1).
        generator
            Source of randomness; the permutation is drawn on ``generator.device`` and the
            indices then moved to the data's device.

        Returns
        -------
        Batch
            ``(x, y)`` with ``min(k, num_train)`` rows, on the data's device.
        """
        _check_batch_size(k)
        perm = torch.randperm(self.num_train, generator=generator, device=generator.device)
        idx = perm[:k].to(self.x_train.device)
        return self.x_train.index_select(0, idx), self.y_train.index_select(0, idx)  # = x_train[idx], half the cost


@dataclass(frozen=True)
class SinewaveData(ClientData):
    """One sinewave task ``f(x) = A sin(x + phi)``, localmoml Section 6.1.

    ``x_train``/``y_train`` is a fixed pool of points (the "10-shot" data personalized
    evaluation adapts on), ``x_test``/``y_test`` the fixed points the adapted model is scored on
    (100 in the paper). :meth:`sample` does not touch the pool: training data is "sampled in an
    online manner", so each call draws fresh ``x ~ Unif(-5, 5)``.

    Attributes
    ----------
    amplitude
        ``A``.
    phase
        ``phi`` (radians).
    """

    amplitude: float = 1.0
    phase: float = 0.0

    def target(self, x: Tensor) -> Tensor:
        """``A sin(x + phi)``."""
        return self.amplitude * torch.sin(x + self.phase)

    def sample(self, k: int, generator: torch.Generator) -> Batch:
        """Draw ``k`` fresh points of the task: ``x ~ Unif(-5, 5)`` of shape ``[k, 1]``.

        Parameters
        ----------
        k
            Batch size (>= 1).
        generator
            Source of randomness; ``x`` is drawn on ``generator.device`` and then moved to the
            data's device.

        Returns
        -------
        Batch
            ``(x, A sin(x + phi))``, float32 ``[k, 1]`` each, on the data's device.
        """
        _check_batch_size(k)
        u = torch.rand(k, 1, generator=generator, device=generator.device, dtype=torch.float32)
        x = (10.0 * u - 5.0).to(self.x_train.device)
        return x, self.target(x)


def _check_batch_size(k: int) -> None:
    if k < 1:
        raise ValueError(f"k (batch size) must be >= 1, got {k}")


# --------------------------------------------------------------------------- sinewave


SINEWAVE_X_RANGE = (-5.0, 5.0)
"""``x ~ Unif(-5, 5)`` (localmoml Section 6.1)."""

SINEWAVE_GRID: tuple[tuple[float, float], ...] = tuple(
    (float(amplitude), i * math.pi / 5) for amplitude in range(1, 6) for i in range(1, 6)
)
"""The 25 training tasks ``(A, phi)`` of localmoml Section 6.1, A-major."""


def sinewave_tasks(
    num_clients: int, seed: int, train_points: int = 10, test_points: int = 100
) -> list[SinewaveData]:
    """The sinewave tasks of localmoml Section 6.1, one per client.

    The first 25 tasks are the paper's grid :data:`SINEWAVE_GRID` (``A in {1,...,5}``,
    ``phi = i pi / 5``, A-major). Tasks beyond 25 are drawn like the paper's unseen test tasks,
    ``A ~ Unif(1, 5)``, ``phi ~ Unif(pi/5, pi)``, from ``numpy.random.default_rng(seed)``.
    Task ``i``'s pool and test points come from ``numpy.random.default_rng((seed, i))``, so a
    task does not change when ``num_clients`` does.

    Builds every task; :func:`sinewave_task` builds one (what :func:`client_data` uses).

    Parameters
    ----------
    num_clients
        Number of tasks (>= 1).
    seed
        Seed of all randomness.
    train_points
        Size of each task's fixed pool (``x_train``) used for personalized adaptation (10 shots
        in the paper).
    test_points
        Number of fixed test points per task (100 in the paper).

    Returns
    -------
    list[SinewaveData]
        ``num_clients`` tasks on the CPU, ``x``/``y`` float32 ``[N, 1]``.
    """
    _check_sinewave(num_clients, train_points, test_points)
    return [_sinewave_task(i, num_clients, seed, train_points, test_points) for i in range(num_clients)]


def sinewave_task(
    task: int, num_clients: int, seed: int, train_points: int = 10, test_points: int = 100
) -> SinewaveData:
    """Task ``task`` of :func:`sinewave_tasks`, built alone: ``sinewave_tasks(...)[task]``.

    Only the ``(A, phi)`` of all ``num_clients`` tasks are drawn (cached per process, a few
    microseconds per task); the task's points and tensors are made for this task only.

    Raises
    ------
    ValueError
        For ``num_clients < 1``, ``train_points`` / ``test_points < 1`` or ``task`` outside
        ``[0, num_clients - 1]``.
    """
    _check_sinewave(num_clients, train_points, test_points)
    if not _is_int(task) or not 0 <= task < num_clients:
        raise ValueError(f"task must be an integer in [0, {num_clients - 1}], got {task!r}")
    return _sinewave_task(task, num_clients, seed, train_points, test_points)


def _check_sinewave(num_clients: int, train_points: int, test_points: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if train_points < 1 or test_points < 1:
        raise ValueError(
            f"train_points and test_points must be >= 1, got {train_points} and {test_points}"
        )


@functools.lru_cache(maxsize=4)
def _sinewave_params(num_clients: int, seed: int) -> tuple[tuple[float, float], ...]:
    """``(A, phi)`` of tasks ``0 .. num_clients - 1``."""
    params = list(SINEWAVE_GRID[:num_clients])
    extra = num_clients - len(params)
    if extra > 0:
        rng = np.random.default_rng(seed)
        amplitudes = rng.uniform(1.0, 5.0, size=extra)
        phases = rng.uniform(math.pi / 5, math.pi, size=extra)
        params += [(float(a), float(p)) for a, p in zip(amplitudes, phases)]
    return tuple(params)


def _sinewave_task(
    i: int, num_clients: int, seed: int, train_points: int, test_points: int
) -> SinewaveData:
    amplitude, phase = _sinewave_params(num_clients, seed)[i]
    low, high = SINEWAVE_X_RANGE
    rng = np.random.default_rng((seed, i))
    x_train = torch.from_numpy(rng.uniform(low, high, size=(train_points, 1))).float()
    x_test = torch.from_numpy(rng.uniform(low, high, size=(test_points, 1))).float()
    return SinewaveData(
        x_train=x_train,
        y_train=amplitude * torch.sin(x_train + phase),
        x_test=x_test,
        y_test=amplitude * torch.sin(x_test + phase),
        amplitude=amplitude,
        phase=phase,
    )


# --------------------------------------------------------------------------- client partitions


def partitions(
    dataset: str,
    partition: str = "fallah",
    num_clients: int = 50,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
    **params: Any,
) -> tuple[ClientData, ...]:
    """Every client's data of an image data set under a label-skew partition.

    ``partition_indices(partition, y_train, y_test, num_clients,
    numpy.random.default_rng(seed), NUM_CLASSES[dataset], **params)`` on
    :func:`load_dataset`'s labels; each client's images are converted to float32 in ``[0, 1]``
    (the full data set stays uint8). Cached per process for each data directory and complete
    parameter set (``partitions.cache_clear()`` empties this cache and :func:`client_data`'s):
    all clients of a simulation process share one split. This materializes every client; a
    process that needs only some of many clients should use :func:`client_data`.

    Parameters
    ----------
    dataset
        One of :data:`PARTITIONED_DATASETS`.
    partition
        ``"fallah"`` (per-fedavg.txt Section 5, localmoml Section 6.2), ``"dirichlet"``,
        ``"pathological"`` or ``"flwr:<PartitionerName>"`` (a Flower Datasets partitioner,
        :mod:`fedmeta.flwr_partitions`).
    num_clients
        Number of clients (even for ``fallah``; 50 in localmoml Section 6.2).
    seed
        Seed of the split.
    root, download
        Data directory and whether torchvision may download missing data, see
        :func:`locate_dataset`.
    **params
        ``fallah``: ``a_train`` (68), ``a_test`` (34; 15 for CIFAR-100, localmoml Section 6.2).
        ``dirichlet``: ``alpha`` (0.5), ``train_per_client`` (300), ``test_per_client`` (100).
        ``pathological``: ``classes_per_client`` (2), ``train_per_client`` (300),
        ``test_per_client`` (100). See :func:`fallah_plans`, :func:`dirichlet_plans`,
        :func:`pathological_plans`. ``flwr:<Name>``: ``partition_args`` (the partitioner's
        arguments, :func:`fedmeta.flwr_partitions.parse_partition_args`), ``test_fraction`` (0.25).

    Returns
    -------
    tuple[ClientData, ...]
        Per client, ``x`` float32 ``[N, C, H, W]`` in ``[0, 1]``, ``y`` int64 ``[N]``, on the CPU.

    Raises
    ------
    ValueError
        For an unknown data set, partition or parameter, an invalid value (naming the parameter
        and its allowed range), or a class with too few samples.
    FileNotFoundError
        If the data set is missing, see :func:`locate_dataset`.
    """
    key = _split_key(dataset, partition, num_clients, seed, root, download, params)
    return _partitions(*key)


SplitKey = tuple[str, str, int, int, str, tuple[tuple[str, Any], ...]]
"""``(dataset, partition, num_clients, seed, resolved root, sorted complete params)``."""


def _split_key(
    dataset: str,
    partition: str,
    num_clients: int,
    seed: int,
    root: str | os.PathLike | None,
    download: bool,
    params: Mapping[str, Any],
) -> SplitKey:
    """Validate a split's arguments (before touching the disk), locate the data: the cache key."""
    _check_dataset(dataset, PARTITIONED_DATASETS)
    # Validate before touching the disk: plans (and partitioners without data) are cheap, the data set is not.
    if flwr_partitions.is_flwr_partition(partition):
        full = tuple(sorted(flwr_partitions.flwr_params(params).items()))
        flwr_partitions.check_flwr_partition(partition, dict(full)["partition_args"], num_clients, seed)
    else:
        full = tuple(sorted(_partition_params(partition, params, dataset).items()))
        _validate_plan(partition, num_clients, seed, NUM_CLASSES[dataset], full)
    resolved = str(locate_dataset(dataset, root, download).resolve())
    return dataset, partition, num_clients, seed, resolved, full


_VALID_PLANS: set[tuple[Any, ...]] = set()
"""Argument sets :func:`_validate_plan` accepted (with their types, so ``True`` is not ``1``)."""


def _validate_plan(
    partition: str, num_clients: int, seed: int, num_classes: int, params: tuple[tuple[str, Any], ...]
) -> None:
    """Run the class plan once to validate its arguments; remembered per process.

    :func:`client_data` validates on every call, and a plan over 10,000 clients takes ~0.1 s.
    """
    typed = (partition, num_classes, *((v, type(v)) for v in (num_clients, seed)))
    typed += tuple((k, v, type(v)) for k, v in params)
    try:
        if typed in _VALID_PLANS:
            return
    except TypeError:  # an unhashable value: not cacheable, validate (and very likely reject)
        typed = None
    _PLANS[partition](num_clients, np.random.default_rng(seed), num_classes, **dict(params))
    if typed is not None:
        _VALID_PLANS.add(typed)


@functools.lru_cache(maxsize=4)
def _partition_plan(dataset: str, partition: str, num_clients: int, seed: int, root: str,
                    params: tuple[tuple[str, Any], ...]) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Every client's train and test indices (:func:`partition_indices`; a ``flwr:`` partition's both into the train
    split, :func:`fedmeta.flwr_partitions.partition_indices`); not to be modified."""
    _, y_train, _, y_test = _load_dataset(dataset, root)
    if flwr_partitions.is_flwr_partition(partition):
        train_idx, test_idx = flwr_partitions.partition_indices(partition, y_train.numpy(), num_clients, seed, **dict(params))
        return tuple(train_idx), tuple(test_idx)
    train_idx, test_idx = partition_indices(partition, y_train.numpy(), y_test.numpy(), num_clients, np.random.default_rng(seed),
                                            NUM_CLASSES[dataset], **dict(params))
    return tuple(train_idx), tuple(test_idx)


def _materialize(dataset: str, root: str, train_idx: np.ndarray, test_idx: np.ndarray, partition: str) -> ClientData:
    """One client's float32 data from its indices into the cached uint8 data set (a ``flwr:`` partition's test
    indices are rows of the train split)."""
    x_train, y_train, x_test, y_test = _load_dataset(dataset, root)
    if flwr_partitions.is_flwr_partition(partition):
        x_test, y_test = x_train, y_train
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ClientData(_to_unit(x_train[tr]), y_train[tr], _to_unit(x_test[te]), y_test[te])


@functools.lru_cache(maxsize=4)
def _partitions(dataset: str, partition: str, num_clients: int, seed: int, root: str,
                params: tuple[tuple[str, Any], ...]) -> tuple[ClientData, ...]:
    train_idx, test_idx = _partition_plan(dataset, partition, num_clients, seed, root, params)
    return tuple(_materialize(dataset, root, tr, te, partition) for tr, te in zip(train_idx, test_idx))


CLIENT_CACHE_SIZE = 20_000
"""How many materialized clients :func:`client_data` keeps per process (least recently used
dropped). Clients of one split are disjoint, so the cache never holds more than a float32 copy
of the data set per split (188 MB for Fashion-MNIST, 737 MB for CIFAR-10), however many clients:
the limit is large enough that a node hosting thousands of clients builds each one once, not
every round (bench/bench_scale.py measured 90 ms per round of rebuilding with a 256-client cache)."""


@functools.lru_cache(maxsize=CLIENT_CACHE_SIZE)
def _client(
    dataset: str,
    partition: str,
    num_clients: int,
    seed: int,
    root: str,
    params: tuple[tuple[str, Any], ...],
    partition_id: int,
) -> ClientData:
    train_idx, test_idx = _partition_plan(dataset, partition, num_clients, seed, root, params)
    return _materialize(dataset, root, train_idx[partition_id], test_idx[partition_id], partition)


def _cache_clear() -> None:
    """Empty the caches of :func:`partitions` and :func:`client_data` (not :func:`load_dataset`'s)."""
    _partitions.cache_clear()
    _client.cache_clear()
    _partition_plan.cache_clear()
    _sinewave_params.cache_clear()
    _VALID_PLANS.clear()


partitions.cache_clear = _cache_clear  # type: ignore[attr-defined]
partitions.cache_info = _partitions.cache_info  # type: ignore[attr-defined]


def _to_unit(images: Tensor) -> Tensor:
    return images.to(torch.float32).div_(255.0)


def fallah_partitions(
    dataset: str = "fashion-mnist",
    num_clients: int = 50,
    a_train: int = 68,
    a_test: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[ClientData, ...]:
    """Every client's data under the per-fedavg.txt Section 5 split (localmoml Section 6.2).

    ``partitions(dataset, "fallah", num_clients, seed, root, download, a_train=a_train,
    a_test=a_test)``; ``a_test=None`` takes the data set's default (34; 15 for CIFAR-100).
    A balanced client has ``N = (C/2) a`` samples, a skewed one ``N = a // 2 + 2a``.
    """
    params: dict[str, Any] = {"a_train": a_train}
    if a_test is not None:
        params["a_test"] = a_test
    return partitions(dataset, "fallah", num_clients, seed, root, download, **params)


def client_data(
    dataset: str, partition_id: int, num_clients: int, seed: int, **kw: Any
) -> ClientData:
    """One client's data: equal to ``partitions(...)[partition_id]`` or a sinewave task.

    Builds only this client's tensors, so a process simulating a few of many (10,000) clients
    holds the uint8 data set (:func:`load_dataset`), the split's index plan
    (:func:`partition_indices`, cached per process like :func:`partitions`) and the clients it
    was asked for: the last :data:`CLIENT_CACHE_SIZE` clients are cached, so a repeated call
    returns the same object. The tensors equal ``partitions(...)[partition_id]``'s bit for bit
    (same values, dtypes and order) but are separate objects. A sinewave task is
    :func:`sinewave_task` (not cached; it takes microseconds).

    Parameters
    ----------
    dataset
        One of :data:`DATASETS`: an image data set (:func:`partitions`) or ``"sinewave"``
        (localmoml Section 6.1, :func:`sinewave_tasks`).
    partition_id
        The client, ``0 <= partition_id < num_clients``.
    num_clients
        Number of clients.
    seed
        Seed of the split / tasks.
    **kw
        Passed on: ``partition``, ``root``, ``download`` and the partition's parameters for image
        data sets (see :func:`partitions`); ``train_points``, ``test_points`` for sinewave.

    Raises
    ------
    ValueError
        As :func:`partitions` (checked before the data set is read), or for ``partition_id``
        outside ``[0, num_clients - 1]``.
    FileNotFoundError
        If the data set is missing, see :func:`locate_dataset`.
    """
    _check_dataset(dataset, DATASETS)
    if not _is_int(partition_id) or not 0 <= partition_id < num_clients:
        raise ValueError(
            f"partition_id must be in [0, {num_clients - 1}] (num_clients={num_clients}), "
            f"got {partition_id}"
        )
    if dataset == "sinewave":
        return sinewave_task(partition_id, num_clients, seed, **kw)
    partition = kw.pop("partition", "fallah")
    root = kw.pop("root", None)
    download = kw.pop("download", False)
    key = _split_key(dataset, partition, num_clients, seed, root, download, kw)
    return _client(*key, int(partition_id))


client_data.cache_clear = _cache_clear  # type: ignore[attr-defined]
client_data.cache_info = _client.cache_info  # type: ignore[attr-defined]
