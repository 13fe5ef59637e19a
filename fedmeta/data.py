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

The partitions are written in numpy rather than taken from ``flwr-datasets`` (0.6.1): its
partitioners work on a ``datasets.Dataset``, and ``datasets`` pulls in pyarrow, pandas,
huggingface-hub, hf-xet and aiohttp (about 250 MB installed, none of it otherwise needed here,
in every simulation process). They also partition each split on its own, so a client's test
data would not share its training data's class distribution; their Dirichlet partitioner draws
per-class shares over clients (random client sizes) rather than per-client class proportions
with fixed sizes, and their pathological partitioner splits all of a class's samples between the
clients holding it (sizes depend on the data set).

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
import gzip
import math
import numbers
import os
import pickle
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedmeta.files import atomic_write

Batch = tuple[Tensor, Tensor]

Plan = list[dict[int, int]]
"""Per client, ``{class: number of samples}``."""

IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}
"""``(C, H, W)`` of each image data set."""

NUM_CLASSES: dict[str, int] = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 20}
"""Number of labels of each image data set (CIFAR-100: the 20 superclasses)."""

PARTITIONED_DATASETS: tuple[str, ...] = tuple(IMAGE_SHAPES)
"""Values accepted by :func:`load_dataset`'s ``name`` and :func:`partitions`'s ``dataset``."""

DATASETS: tuple[str, ...] = (*PARTITIONED_DATASETS, "sinewave")
"""Values accepted by :func:`client_data`'s ``dataset``."""

PARTITION_DEFAULTS: dict[str, dict[str, Any]] = {
    "fallah": {"a_train": 68, "a_test": 34},
    "dirichlet": {"alpha": 0.5, "train_per_client": 300, "test_per_client": 100},
    "pathological": {"classes_per_client": 2, "train_per_client": 300, "test_per_client": 100},
}
"""The partitions of :func:`partitions` and their parameters' defaults."""

FALLAH_A_TEST: dict[str, int] = {"cifar100": 15}
"""Data sets whose default Fallah ``a_test`` is not 34 (localmoml Section 6.2)."""

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the ``dataset-fashion-mnist`` system package installs the gzipped IDX files
(``FEDMETA_SYSTEM_DATA``, when set, replaces ``/usr/share/datasets``)."""

SYSTEM_DATA_ENV = "FEDMETA_SYSTEM_DATA"
"""Environment variable naming the directory of system data packages (default ``/usr/share/datasets``)."""

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
"""The Debian package that installs Fashion-MNIST under :data:`SYSTEM_FASHION_MNIST_DIR`."""


def system_fashion_mnist_dir() -> Path:
    """:data:`SYSTEM_FASHION_MNIST_DIR`, or ``$FEDMETA_SYSTEM_DATA/fashion-mnist`` when that is set."""
    base = os.environ.get(SYSTEM_DATA_ENV)
    return Path(base).expanduser() / "fashion-mnist" if base else SYSTEM_FASHION_MNIST_DIR

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""IDX files torchvision's ``MNIST`` / ``FashionMNIST`` read (decompressed) from ``<class>/raw``."""

_TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}

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
        return self.x_train[idx], self.y_train[idx]


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


# --------------------------------------------------------------------------- image files


def _resolve_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    for var in ("FEDMETA_DATA", "FEDMETA_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".cache" / "fedmeta"


def _torchvision_class(name: str) -> type:
    import torchvision.datasets

    return getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])


def _check_dataset(dataset: str, allowed: tuple[str, ...]) -> None:
    if dataset not in allowed:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, allowed))}, got {dataset!r}")


def _decompress(src: Path, dst: Path) -> None:
    # Atomic (temporary file, rename): concurrent processes (simulated clients) never see a
    # half-written file, and the last rename wins harmlessly.
    def copy(out) -> None:
        with gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)

    atomic_write(dst, copy, sync=False)


def _not_found(name: str, missing: list[str], where: list[Path], layout: str) -> FileNotFoundError:
    """One line: what is missing, where it was looked for, and each way to provide it."""
    fix = f"run `sudo apt-get install {FASHION_MNIST_PACKAGE}`, or " if name == "fashion-mnist" else ""
    return FileNotFoundError(
        f"{name} not found: missing {', '.join(missing)} (looked in "
        f"{', '.join(str(d) for d in where)}). To fix it, {fix}set FEDMETA_DATA (or data-dir) to a "
        f"directory holding {layout}, or pass download=True (--download true) to let torchvision "
        f"download it (needs internet)."
    )


def _locate_idx(name: str, base: Path, download: bool) -> Path:
    raw = base / _TORCHVISION_CLASSES[name] / "raw"
    missing = [f for f in IDX_FILES if not (raw / f).is_file()]
    if not missing:
        return base
    search = [base, raw] + ([system_fashion_mnist_dir()] if name == "fashion-mnist" else [])
    sources = {}
    for f in missing:
        found = next((d / f"{f}.gz" for d in search if (d / f"{f}.gz").is_file()), None)
        if found is not None:
            sources[f] = found
    if len(sources) == len(missing):
        raw.mkdir(parents=True, exist_ok=True)
        for f, src in sources.items():
            _decompress(src, raw / f)
        return base
    if download:
        _torchvision_class(name)(str(base), train=True, download=True)
        return base
    absent = [f"{f}[.gz]" for f in missing if f not in sources]
    layout = f"{_TORCHVISION_CLASSES[name]}/raw/ with the four IDX files (or their .gz files)"
    raise _not_found(name, absent, search, layout)


def _locate_cifar(name: str, base: Path, download: bool) -> Path:
    cls = _torchvision_class(name)
    folder = base / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return base
    if download:
        cls(str(base), train=True, download=True)
        return base
    raise _not_found(name, missing, [folder], f"{cls.base_folder}/ (extracted from {cls.filename})")


def locate_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """Return a directory ``ROOT`` that torchvision's dataset class for ``name`` can read.

    ``ROOT`` is ``root`` if given, else ``$FEDMETA_DATA``, else the cache directory
    (``$FEDMETA_CACHE`` or ``~/.cache/fedmeta``). torchvision's layout is expected below it:
    ``MNIST/raw`` / ``FashionMNIST/raw`` with the decompressed IDX files :data:`IDX_FILES`,
    ``cifar-10-batches-py`` / ``cifar-100-python`` with the pickled batches.

    For MNIST and Fashion-MNIST, missing IDX files are decompressed (atomically, so concurrent
    processes are safe) into ``ROOT/<class>/raw`` from their ``.gz`` files in ``ROOT`` or
    ``ROOT/<class>/raw``, and for Fashion-MNIST also :func:`system_fashion_mnist_dir` (the
    ``dataset-fashion-mnist`` system package). Only file presence is checked here; torchvision
    checks the CIFAR files' md5 sums when they are loaded.

    Parameters
    ----------
    name
        One of :data:`PARTITIONED_DATASETS`.
    root
        Data directory (see above).
    download
        If files are missing, let torchvision download them into ``ROOT`` (needs internet).

    Returns
    -------
    Path
        ``ROOT``.

    Raises
    ------
    FileNotFoundError
        If files are missing and ``download`` is false; the message names the data set, the
        directories looked in and how to provide the data.
    """
    _check_dataset(name, PARTITIONED_DATASETS)
    base = _resolve_root(root)
    if name in ("mnist", "fashion-mnist"):
        return _locate_idx(name, base, download)
    return _locate_cifar(name, base, download)


def locate_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """``locate_dataset("fashion-mnist", root, download)``, see :func:`locate_dataset`."""
    return locate_dataset("fashion-mnist", root, download)


def load_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An image data set's train and test splits, read with torchvision.

    The directory is found by :func:`locate_dataset`. Loaded once per process and resolved
    directory; the returned tensors are shared between callers and must not be modified in
    place. Images stay uint8 (a float32 copy of CIFAR-10 would take 740 MB in every process).

    Parameters
    ----------
    name
        One of :data:`PARTITIONED_DATASETS`. For ``"cifar100"`` the labels are the 20 coarse
        superclasses (localmoml Section 6.2), read from the ``coarse_labels`` of the same pickle
        files torchvision's ``CIFAR100`` takes the images (and fine labels) from.
    root, download
        See :func:`locate_dataset`.

    Returns
    -------
    tuple[Tensor, Tensor, Tensor, Tensor]
        ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8 ``[N, C, H, W]`` with
        ``(C, H, W) = IMAGE_SHAPES[name]``, labels int64 ``[N]`` in ``[0, NUM_CLASSES[name])``.

    Raises
    ------
    FileNotFoundError
        See :func:`locate_dataset`.
    RuntimeError
        If torchvision rejects the files (e.g. a CIFAR md5 mismatch).
    """
    return _load_dataset(name, str(locate_dataset(name, root, download).resolve()))


def load_fashion_mnist(
    root: str | os.PathLike | None = None, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``load_dataset("fashion-mnist", root, download)``: uint8 ``[N, 1, 28, 28]`` images."""
    return load_dataset("fashion-mnist", root, download)


@functools.lru_cache(maxsize=4)
def _load_dataset(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cls = _torchvision_class(name)
    out: list[Tensor] = []
    for train in (True, False):
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError as err:
            raise RuntimeError(
                f"torchvision rejected the {name} files in {root} ({err}); they are incomplete "
                "or corrupted: replace them, or delete them and pass download=True"
            ) from err
        # .data/.targets directly: the per-item PIL path of __getitem__ is slow.
        if name in ("mnist", "fashion-mnist"):
            x = ds.data.unsqueeze(1)
            y = ds.targets.to(torch.int64)
        else:
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision: HWC
            y = torch.as_tensor(ds.targets, dtype=torch.int64)
        if name == "cifar100":
            files = cls.train_list if train else cls.test_list
            y = _cifar100_coarse_labels(Path(root) / cls.base_folder, files)
        if tuple(x.shape[1:]) != IMAGE_SHAPES[name] or len(y) != len(x):
            raise ValueError(
                f"{name} in {root}: expected images {IMAGE_SHAPES[name]} with one label each, got "
                f"images {tuple(x.shape)} and {len(y)} labels"
            )
        out += [x, y]
    return out[0], out[1], out[2], out[3]


def _cifar100_coarse_labels(folder: Path, files: list[list[str]]) -> Tensor:
    labels: list[int] = []
    for file_name, _ in files:
        with open(folder / file_name, "rb") as f:
            labels.extend(pickle.load(f, encoding="latin1")["coarse_labels"])
    return torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------- class plans


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None = None, why: str = "") -> None:
    if _is_int(value) and low <= value and (high is None or value <= high):
        return
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {allowed}{why}, got {value!r}")


def _check_a(a: int, name: str = "a") -> None:
    _check_int(name, a, 2, why=" (samples per class)")


@dataclass(frozen=True)
class ClientRole:
    """Which classes one client of the per-fedavg.txt Section 5 split holds.

    Attributes
    ----------
    kind
        ``"balanced"``: ``a`` samples of each first-half class; ``"skewed"``: ``a // 2`` samples
        of ``first_class`` and ``2a`` samples of ``last_class``.
    first_class, last_class
        The skewed client's two classes (``None`` for balanced clients).
    """

    kind: Literal["balanced", "skewed"]
    first_class: int | None = None
    last_class: int | None = None

    def counts(self, a: int, num_classes: int = 10) -> dict[int, int]:
        """``{class: number of samples}`` of this client for a given ``a``.

        The papers' ``a/2`` is rounded down: localmoml Section 6.2 uses the odd ``a = 15`` for
        CIFAR-100's test sets.
        """
        _check_a(a)
        if self.kind == "balanced":
            return {c: a for c in range(num_classes // 2)}
        assert self.first_class is not None and self.last_class is not None
        return {self.first_class: a // 2, self.last_class: 2 * a}


def _check_fallah_clients(num_clients: int, num_classes: int) -> None:
    if not _is_int(num_clients) or num_clients < 2 or num_clients % 2:
        raise ValueError(f"num_clients must be an even integer >= 2, got {num_clients!r}")
    if not _is_int(num_classes) or num_classes < 2 or num_classes % 2:
        raise ValueError(f"num_classes must be an even integer >= 2, got {num_classes!r}")


def fallah_class_roles(
    num_clients: int, rng: np.random.Generator, num_classes: int = 10
) -> list[ClientRole]:
    """The classes of every client in the per-fedavg.txt Section 5 split (localmoml Sec. 6.2).

    Clients ``0 .. n/2 - 1`` are balanced (all first classes ``0 .. h - 1``, ``h =
    num_classes // 2``); skewed client ``j`` (``j = 0 .. n/2 - 1``, client ``n/2 + j``) holds
    first class ``perm1[j % h]`` and last class ``h + perm2[j % h]`` with ``perm1, perm2 =
    rng.permutation(h), rng.permutation(h)``. The papers only say "one of" the classes; this
    deals them out evenly, so each class has at most ``ceil((n/2) / h)`` skewed clients and no
    class runs out of samples by chance.

    The roles do not depend on ``a``, so the train and test splits of one client share them.

    Raises
    ------
    ValueError
        If ``num_clients`` or ``num_classes`` is not an even integer >= 2.
    """
    _check_fallah_clients(num_clients, num_classes)
    h = num_classes // 2
    perm1 = rng.permutation(h)
    perm2 = rng.permutation(h)
    half = num_clients // 2
    roles = [ClientRole("balanced") for _ in range(half)]
    roles += [ClientRole("skewed", int(perm1[j % h]), h + int(perm2[j % h])) for j in range(half)]
    return roles


def fallah_class_plan(
    num_clients: int, a: int, rng: np.random.Generator, num_classes: int = 10
) -> Plan:
    """Per-client ``{class: count}`` of the per-fedavg.txt Section 5 split for one ``a``.

    ``[role.counts(a) for role in fallah_class_roles(num_clients, rng)]``; for a train and a
    test plan with the same classes use :func:`fallah_plans`.

    Raises
    ------
    ValueError
        If ``num_clients`` is not an even integer >= 2 or ``a`` not an integer >= 2.
    """
    _check_a(a)
    roles = fallah_class_roles(num_clients, rng, num_classes)
    return [role.counts(a, num_classes) for role in roles]


def fallah_plans(
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int = 10,
    a_train: int = 68,
    a_test: int = 34,
) -> tuple[Plan, Plan]:
    """Train and test plans of the per-fedavg.txt Section 5 split (localmoml Section 6.2).

    One :func:`fallah_class_roles` draw, counted with ``a = a_train`` and ``a = a_test``.

    Parameters
    ----------
    num_clients
        ``n`` (50 in localmoml Section 6.2), even and >= 2.
    rng
        Source of randomness.
    num_classes
        Number of classes, even: the first half are the "first" classes (10 for MNIST and
        CIFAR-10, 20 superclasses for CIFAR-100).
    a_train, a_test
        ``a`` of the training and test splits, integers >= 2 (localmoml Section 6.2: 68 and 34;
        15 for CIFAR-100's test split).

    Returns
    -------
    tuple[Plan, Plan]
        Per client ``{class: count}`` for the training and for the test split.
    """
    _check_a(a_train, "a_train")
    _check_a(a_test, "a_test")
    roles = fallah_class_roles(num_clients, rng, num_classes)
    train = [r.counts(a_train, num_classes) for r in roles]
    return train, [r.counts(a_test, num_classes) for r in roles]


def _largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``p * total`` (largest-remainder method)."""
    exact = p / p.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
    return counts


def _check_sizes(train_per_client: int, test_per_client: int, low: int = 1, why: str = "") -> None:
    _check_int("train_per_client", train_per_client, low, why=why)
    _check_int("test_per_client", test_per_client, low, why=why)


def dirichlet_plans(
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int = 10,
    alpha: float = 0.5,
    train_per_client: int = 300,
    test_per_client: int = 100,
) -> tuple[Plan, Plan]:
    """Train and test plans of the Dirichlet label-skew partition.

    Client ``i``'s class proportions ``p_i ~ Dir(alpha 1_C)`` are drawn once (one
    ``rng.dirichlet`` call for all clients); its train and test counts are both the
    largest-remainder rounding of ``p_i`` to ``train_per_client`` and ``test_per_client``
    samples, so each count is within 1 of ``p_ic * size`` and a client's train and test class
    distributions agree up to that rounding (a multinomial draw would add sampling noise).
    Classes with a zero count are left out of a client's plan.

    Parameters
    ----------
    num_clients
        Number of clients, >= 1.
    rng
        Source of randomness.
    num_classes
        ``C``.
    alpha
        Concentration, > 0: small values give few classes per client, large ones near uniform.
    train_per_client, test_per_client
        Samples per client in each split, >= 1.

    Returns
    -------
    tuple[Plan, Plan]
        Per client ``{class: count}`` for the training and for the test split.
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("num_classes", num_classes, 1)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise ValueError(
            f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha!r}"
        )
    _check_sizes(train_per_client, test_per_client)
    proportions = rng.dirichlet(np.full(num_classes, float(alpha)), size=num_clients)

    def plan(size: int) -> Plan:
        out = []
        for p in proportions:
            counts = _largest_remainder(p, size)
            out.append({int(c): int(counts[c]) for c in np.flatnonzero(counts)})
        return out

    return plan(train_per_client), plan(test_per_client)


def pathological_classes(
    num_clients: int, classes_per_client: int, rng: np.random.Generator, num_classes: int = 10
) -> list[tuple[int, ...]]:
    """The classes of every client of the pathological partition.

    Clients are assigned in order; each takes the ``classes_per_client`` least-used classes so
    far, ties broken by a fresh ``rng.permutation(num_classes)``. So every client holds distinct
    classes and the number of clients per class differs by at most one between classes.

    Returns
    -------
    list[tuple[int, ...]]
        Per client, its classes in increasing order.
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("num_classes", num_classes, 1)
    _check_int("classes_per_client", classes_per_client, 1, num_classes)
    usage = np.zeros(num_classes, dtype=np.int64)
    out = []
    for _ in range(num_clients):
        order = rng.permutation(num_classes)
        chosen = np.sort(order[np.argsort(usage[order], kind="stable")[:classes_per_client]])
        usage[chosen] += 1
        out.append(tuple(int(c) for c in chosen))
    return out


def pathological_plans(
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int = 10,
    classes_per_client: int = 2,
    train_per_client: int = 300,
    test_per_client: int = 100,
) -> tuple[Plan, Plan]:
    """Train and test plans of the pathological partition: ``c`` classes per client.

    Client classes from :func:`pathological_classes`; each client has ``train_per_client // c``
    training and ``test_per_client // c`` test samples of each of its classes.

    Parameters
    ----------
    num_clients
        Number of clients, >= 1.
    rng
        Source of randomness.
    num_classes
        ``C``.
    classes_per_client
        ``c``, in ``[1, C]``.
    train_per_client, test_per_client
        Samples per client in each split (rounded down to a multiple of ``c``), >= ``c``.

    Returns
    -------
    tuple[Plan, Plan]
        Per client ``{class: count}`` for the training and for the test split.
    """
    _check_int("num_classes", num_classes, 1)
    _check_int("classes_per_client", classes_per_client, 1, num_classes)
    _check_sizes(train_per_client, test_per_client, classes_per_client, " (>= classes_per_client)")
    classes = pathological_classes(num_clients, classes_per_client, rng, num_classes)
    k_train = train_per_client // classes_per_client
    k_test = test_per_client // classes_per_client
    train = [dict.fromkeys(cs, k_train) for cs in classes]
    return train, [dict.fromkeys(cs, k_test) for cs in classes]


_PLANS: dict[str, Callable[..., tuple[Plan, Plan]]] = {
    "fallah": fallah_plans,
    "dirichlet": dirichlet_plans,
    "pathological": pathological_plans,
}


# --------------------------------------------------------------------------- index splits


def split_by_plan(
    labels: np.ndarray, plan: Plan, rng: np.random.Generator, split: str = "labels"
) -> list[np.ndarray]:
    """Draw each client's samples of a class plan from ``labels``, without replacement.

    Each class's indices are shuffled once (``rng``) and dealt out to the clients in order, so
    the clients' index sets are pairwise disjoint. Each client's indices are returned shuffled.

    Parameters
    ----------
    labels
        Class label of every sample, shape ``[N]``.
    plan
        Per client ``{class: count}``, e.g. from :func:`fallah_plans`.
    rng
        Source of randomness.
    split
        Name of ``labels`` in error messages (``"the train split"``).

    Returns
    -------
    list[np.ndarray]
        Per client, int64 indices into ``labels``.

    Raises
    ------
    ValueError
        If a class has fewer samples than the plan needs (naming the class and both numbers).
    """
    labels = np.asarray(labels)
    needed: dict[int, int] = {}
    for counts in plan:
        for c, k in counts.items():
            needed[c] = needed.get(c, 0) + k
    pools: dict[int, np.ndarray] = {}
    for c in sorted(needed):
        available = np.flatnonzero(labels == c)
        if len(available) < needed[c]:
            raise ValueError(
                f"class {c} has too few samples in {split}: the partition needs {needed[c]} "
                f"but only {len(available)} are available (use fewer clients or fewer samples "
                "per client)"
            )
        pools[c] = rng.permutation(available)
    taken = dict.fromkeys(pools, 0)
    out = []
    for counts in plan:
        parts = []
        for c, k in counts.items():
            parts.append(pools[c][taken[c] : taken[c] + k])
            taken[c] += k
        idx = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        out.append(rng.permutation(idx).astype(np.int64))
    return out


def fallah_split(
    labels: np.ndarray, num_clients: int, a: int, rng: np.random.Generator, num_classes: int = 10
) -> list[np.ndarray]:
    """Split one set of ``labels`` over clients as in per-fedavg.txt Section 5.

    ``split_by_plan(labels, fallah_class_plan(num_clients, a, rng, num_classes), rng)``.

    Parameters
    ----------
    labels
        Class label of every sample, shape ``[N]``.
    num_clients
        ``n``, even and >= 2.
    a
        Samples per class of a balanced client, >= 2.
    rng
        Source of randomness (class roles, then sampling).
    num_classes
        Number of classes, even.

    Returns
    -------
    list[np.ndarray]
        Per client, pairwise disjoint int64 indices into ``labels``.

    Raises
    ------
    ValueError
        For an invalid ``num_clients`` / ``a``, or a class with too few samples.
    """
    return split_by_plan(labels, fallah_class_plan(num_clients, a, rng, num_classes), rng)


def _partition_params(
    partition: str, params: Mapping[str, Any], dataset: str | None = None
) -> dict[str, Any]:
    """``params`` completed with the defaults; ValueError for an unknown partition or name."""
    if partition not in PARTITION_DEFAULTS:
        allowed = ", ".join(map(repr, PARTITION_DEFAULTS))
        raise ValueError(f"partition must be one of {allowed}, got {partition!r}")
    defaults = dict(PARTITION_DEFAULTS[partition])
    if partition == "fallah" and dataset in FALLAH_A_TEST:
        defaults["a_test"] = FALLAH_A_TEST[dataset]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter {unknown[0]!r} of partition {partition!r}; allowed: "
            f"{', '.join(defaults)}"
        )
    return {**defaults, **params}


def partition_indices(
    partition: str,
    y_train: np.ndarray,
    y_test: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int = 10,
    **params: Any,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split a data set's train and test labels over clients with one partition scheme.

    ``rng`` draws the plans (:func:`fallah_plans`, :func:`dirichlet_plans` or
    :func:`pathological_plans`), then the training indices, then the test indices
    (:func:`split_by_plan`). A client's train and test sets have the same class distribution
    (for ``dirichlet`` up to rounding each count to an integer).

    Parameters
    ----------
    partition
        ``"fallah"``, ``"dirichlet"`` or ``"pathological"``.
    y_train, y_test
        Labels of the training and test split.
    num_clients
        Number of clients.
    rng
        Source of randomness.
    num_classes
        Number of classes.
    **params
        The partition's parameters (:data:`PARTITION_DEFAULTS`); missing ones take the defaults.

    Returns
    -------
    tuple[list[np.ndarray], list[np.ndarray]]
        Per client, int64 indices into ``y_train`` and into ``y_test``; pairwise disjoint within
        each split.

    Raises
    ------
    ValueError
        For an unknown partition or parameter, an invalid value (naming the parameter and its
        allowed range), or a class with too few samples.
    """
    params = _partition_params(partition, params)
    train_plan, test_plan = _PLANS[partition](num_clients, rng, num_classes, **params)
    train_idx = split_by_plan(y_train, train_plan, rng, "the train split")
    test_idx = split_by_plan(y_test, test_plan, rng, "the test split")
    return train_idx, test_idx


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
        ``"fallah"`` (per-fedavg.txt Section 5, localmoml Section 6.2), ``"dirichlet"`` or
        ``"pathological"``.
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
        :func:`pathological_plans`.

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
    full = tuple(sorted(_partition_params(partition, params, dataset).items()))
    # Validate before touching the disk: plans are cheap, the data set is not.
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
def _partition_plan(
    dataset: str,
    partition: str,
    num_clients: int,
    seed: int,
    root: str,
    params: tuple[tuple[str, Any], ...],
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Every client's train and test indices (:func:`partition_indices`); not to be modified."""
    _, y_train, _, y_test = _load_dataset(dataset, root)
    train_idx, test_idx = partition_indices(
        partition,
        y_train.numpy(),
        y_test.numpy(),
        num_clients,
        np.random.default_rng(seed),
        NUM_CLASSES[dataset],
        **dict(params),
    )
    return tuple(train_idx), tuple(test_idx)


def _materialize(dataset: str, root: str, train_idx: np.ndarray, test_idx: np.ndarray) -> ClientData:
    """One client's float32 data from its indices into the cached uint8 data set."""
    x_train, y_train, x_test, y_test = _load_dataset(dataset, root)
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return ClientData(_to_unit(x_train[tr]), y_train[tr], _to_unit(x_test[te]), y_test[te])


@functools.lru_cache(maxsize=4)
def _partitions(
    dataset: str,
    partition: str,
    num_clients: int,
    seed: int,
    root: str,
    params: tuple[tuple[str, Any], ...],
) -> tuple[ClientData, ...]:
    train_idx, test_idx = _partition_plan(dataset, partition, num_clients, seed, root, params)
    return tuple(_materialize(dataset, root, tr, te) for tr, te in zip(train_idx, test_idx))


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
    return _materialize(dataset, root, train_idx[partition_id], test_idx[partition_id])


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
