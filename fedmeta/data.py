"""Client data sets of the two papers' experiments (no Flower here).

* Sinewave regression, localmoml-memory-based-maml.txt Section 6.1: 25 training tasks
  ``f(x) = A sin(x + phi)`` with ``A in {1, ..., 5}``, ``phi = i pi / 5``, ``i in {1, ..., 5}``;
  data "randomly sampled in an online manner", ``x ~ Unif(-5, 5)``.
* The heterogeneous image split of per-fedavg.txt Section 5, reused by localmoml Section 6.2:
  half of the ``n`` clients hold ``a`` images of each of the first five classes, the other half
  ``a/2`` images of one of the first five classes and ``2a`` images of one of the last five.
  Test data is divided "with the same distribution as the one for the training data"
  (``a = 68`` for training, ``a = 34`` for test).

Every client's data is a :class:`ClientData`; :meth:`ClientData.sample` is the ``Sampler`` the
meta-learning functions of :mod:`fedmeta.meta` draw their independent batches from. All
randomness comes from explicit ``numpy.random.Generator`` / ``torch.Generator`` objects.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]

DATASETS = ("fashion-mnist", "sinewave")
"""Values accepted by :func:`client_data`'s ``dataset``."""

PARTITIONED_DATASETS = ("fashion-mnist",)
"""Values accepted by :func:`fallah_partitions`'s ``dataset``."""

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the ``dataset-fashion-mnist`` system package installs the gzipped IDX files."""

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The decompressed IDX files torchvision's ``FashionMNIST`` reads from ``ROOT/FashionMNIST/raw``."""

_TENSOR_FIELDS = ("x_train", "y_train", "x_test", "y_test")


# --------------------------------------------------------------------------- client data


@dataclass(frozen=True)
class ClientData:
    """One client's data.

    Attributes
    ----------
    x_train, x_test
        Inputs, float32, one sample per row.
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
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if train_points < 1 or test_points < 1:
        raise ValueError(
            f"train_points and test_points must be >= 1, got {train_points} and {test_points}"
        )
    params = list(SINEWAVE_GRID[:num_clients])
    extra = num_clients - len(params)
    if extra > 0:
        rng = np.random.default_rng(seed)
        amplitudes = rng.uniform(1.0, 5.0, size=extra)
        phases = rng.uniform(math.pi / 5, math.pi, size=extra)
        params += [(float(a), float(p)) for a, p in zip(amplitudes, phases)]

    low, high = SINEWAVE_X_RANGE
    tasks = []
    for i, (amplitude, phase) in enumerate(params):
        rng = np.random.default_rng((seed, i))
        x_train = torch.from_numpy(rng.uniform(low, high, size=(train_points, 1))).float()
        x_test = torch.from_numpy(rng.uniform(low, high, size=(test_points, 1))).float()
        task = SinewaveData(
            x_train=x_train,
            y_train=amplitude * torch.sin(x_train + phase),
            x_test=x_test,
            y_test=amplitude * torch.sin(x_test + phase),
            amplitude=amplitude,
            phase=phase,
        )
        tasks.append(task)
    return tasks


# --------------------------------------------------------------------------- Fashion-MNIST files


def _default_root() -> Path:
    for var in ("FEDMETA_DATA", "FEDMETA_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path.home() / ".cache" / "fedmeta"


def _decompress(src: Path, dst: Path) -> None:
    # Write to a temporary file in the destination directory and rename: concurrent processes
    # (simulated clients) never see a half-written file, and the last rename wins harmlessly.
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def locate_fashion_mnist(root: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Return a directory ``ROOT`` that ``torchvision.datasets.FashionMNIST(ROOT)`` can read.

    ``ROOT`` is ``root`` if given, else ``$FEDMETA_DATA``, else the cache directory
    (``$FEDMETA_CACHE`` or ``~/.cache/fedmeta``). If ``ROOT/FashionMNIST/raw`` lacks any of the
    decompressed IDX files, their ``.gz`` files are looked up in ``ROOT``,
    ``ROOT/FashionMNIST/raw`` and :data:`SYSTEM_FASHION_MNIST_DIR` (in that order) and
    decompressed into ``ROOT/FashionMNIST/raw`` (atomically, so concurrent processes are safe).

    Parameters
    ----------
    root
        Directory holding the data (see above).
    download
        If the files are nowhere to be found, let torchvision download them into ``ROOT``.

    Returns
    -------
    Path
        ``ROOT``.

    Raises
    ------
    FileNotFoundError
        If the files are missing and ``download`` is false.
    """
    base = Path(root).expanduser() if root is not None else _default_root()
    raw = base / "FashionMNIST" / "raw"
    missing = [name for name in FASHION_MNIST_FILES if not (raw / name).is_file()]
    if not missing:
        return base

    search = (base, raw, SYSTEM_FASHION_MNIST_DIR)
    sources = {}
    for name in missing:
        found = next((d / f"{name}.gz" for d in search if (d / f"{name}.gz").is_file()), None)
        if found is not None:
            sources[name] = found
    if len(sources) == len(missing):
        raw.mkdir(parents=True, exist_ok=True)
        for name, src in sources.items():
            _decompress(src, raw / name)
        return base

    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(base), train=True, download=True)
        return base

    not_found = ", ".join(f"{name}.gz" for name in missing if name not in sources)
    where = ", ".join(str(d) for d in search)
    raise FileNotFoundError(
        f"Fashion-MNIST not found: no {not_found} in {where}. Install it with "
        "`apt-get install dataset-fashion-mnist`, or set FEDMETA_DATA to a directory holding "
        "the four *-ubyte.gz files, or pass download=True to download it with torchvision."
    )


def load_fashion_mnist(
    root: str | os.PathLike | None = None, download: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST as flat tensors (located by :func:`locate_fashion_mnist`).

    Loaded once per process and data directory; the returned tensors are shared between
    callers and must not be modified in place.

    Returns
    -------
    tuple[Tensor, Tensor, Tensor, Tensor]
        ``x_train`` float32 ``[60000, 784]`` in ``[0, 1]``, ``y_train`` int64 ``[60000]``,
        ``x_test`` float32 ``[10000, 784]``, ``y_test`` int64 ``[10000]``.
    """
    return _load_fashion_mnist(str(locate_fashion_mnist(root, download).resolve()))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from torchvision.datasets import FashionMNIST

    out: list[Tensor] = []
    for train in (True, False):
        # .data/.targets directly: the per-item PIL path of __getitem__ is slow.
        ds = FashionMNIST(root, train=train, download=False)
        out.append(ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0))
        out.append(ds.targets.to(torch.int64))
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- Fallah et al. split


@dataclass(frozen=True)
class ClientRole:
    """Which classes one client of the per-fedavg.txt Section 5 split holds.

    Attributes
    ----------
    kind
        ``"balanced"``: ``a`` samples of each first class; ``"skewed"``: ``a/2`` samples of
        ``first_class`` and ``2a`` samples of ``last_class``.
    first_class, last_class
        The skewed client's two classes (``None`` for balanced clients).
    """

    kind: Literal["balanced", "skewed"]
    first_class: int | None = None
    last_class: int | None = None

    def counts(self, a: int, num_classes: int = 10) -> dict[int, int]:
        """``{class: number of samples}`` of this client for a given ``a``."""
        _check_a(a)
        if self.kind == "balanced":
            return {c: a for c in range(num_classes // 2)}
        assert self.first_class is not None and self.last_class is not None
        return {self.first_class: a // 2, self.last_class: 2 * a}


def _check_a(a: int) -> None:
    if a < 2 or a % 2:
        raise ValueError(f"a (samples per class) must be an even integer >= 2, got {a}")


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
        If ``num_clients`` is not an even integer >= 2, or ``num_classes`` not even >= 2.
    """
    if num_clients < 2 or num_clients % 2:
        raise ValueError(f"num_clients must be an even integer >= 2, got {num_clients}")
    if num_classes < 2 or num_classes % 2:
        raise ValueError(f"num_classes must be an even integer >= 2, got {num_classes}")
    h = num_classes // 2
    perm1 = rng.permutation(h)
    perm2 = rng.permutation(h)
    half = num_clients // 2
    roles = [ClientRole("balanced") for _ in range(half)]
    roles += [ClientRole("skewed", int(perm1[j % h]), h + int(perm2[j % h])) for j in range(half)]
    return roles


def fallah_class_plan(
    num_clients: int, a: int, rng: np.random.Generator, num_classes: int = 10
) -> list[dict[int, int]]:
    """Per-client ``{class: count}`` of the per-fedavg.txt Section 5 split.

    ``[role.counts(a) for role in fallah_class_roles(num_clients, rng)]``; to give a test split
    the same classes, call :func:`fallah_class_roles` once and take ``counts`` for each ``a``.

    Raises
    ------
    ValueError
        If ``num_clients`` or ``a`` is not an even integer >= 2.
    """
    _check_a(a)
    roles = fallah_class_roles(num_clients, rng, num_classes)
    return [role.counts(a, num_classes) for role in roles]


def fallah_split_with_plan(
    labels: np.ndarray, plan: list[dict[int, int]], rng: np.random.Generator
) -> list[np.ndarray]:
    """Draw each client's samples of a class plan from ``labels``.

    Each class's indices are shuffled once (``rng``) and dealt out to the clients in order, so
    the clients' index sets are pairwise disjoint (sampling without replacement). Each client's
    indices are returned shuffled.

    Parameters
    ----------
    labels
        Class label of every sample, shape ``[N]``.
    plan
        Per client ``{class: count}``, e.g. from :func:`fallah_class_plan`.
    rng
        Source of randomness.

    Returns
    -------
    list[np.ndarray]
        Per client, int64 indices into ``labels``.

    Raises
    ------
    ValueError
        If a class has fewer samples than the plan needs.
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
                f"class {c} has too few samples: the split needs {needed[c]} "
                f"but only {len(available)} are available"
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
    """Split ``labels`` over clients as in per-fedavg.txt Section 5 / localmoml Section 6.2.

    Half of the clients hold ``a`` samples of each of the first ``num_classes / 2`` classes; the
    others ``a/2`` samples of one first class and ``2a`` of one last class (see
    :func:`fallah_class_roles` for how those classes are chosen).

    Parameters
    ----------
    labels
        Class label of every sample, shape ``[N]``.
    num_clients
        ``n``, even and >= 2.
    a
        Samples per class of a balanced client, even and >= 2.
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
        For an odd or too small ``num_clients`` / ``a``, or a class with too few samples.
    """
    return fallah_split_with_plan(labels, fallah_class_plan(num_clients, a, rng, num_classes), rng)


def _check_dataset(dataset: str, allowed: tuple[str, ...]) -> None:
    if dataset not in allowed:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, allowed))}, got {dataset!r}")


def fallah_partitions(
    dataset: str = "fashion-mnist",
    num_clients: int = 50,
    a_train: int = 68,
    a_test: int = 34,
    seed: int = 0,
    root: str | None = None,
) -> tuple[ClientData, ...]:
    """Every client's data under the per-fedavg.txt Section 5 split (localmoml Section 6.2).

    One ``numpy.random.default_rng(seed)`` draws the class roles, then the training indices
    (from the training split, ``a = a_train``), then the test indices (from the test split,
    ``a = a_test``); a client's train and test data have the same classes. Cached per process
    for each argument set and data directory (``cache_clear()`` empties the cache).

    Parameters
    ----------
    dataset
        Only ``"fashion-mnist"``.
    num_clients
        ``n`` (50 in localmoml Section 6.2), even.
    a_train, a_test
        ``a`` of the training and test splits (68 and 34 in localmoml Section 6.2), even.
    seed
        Seed of the split.
    root
        Data directory, see :func:`locate_fashion_mnist`.

    Returns
    -------
    tuple[ClientData, ...]
        Per client, ``x`` float32 ``[N, 784]`` in ``[0, 1]``, ``y`` int64, on the CPU:
        ``N = 5a`` for balanced clients, ``N = a/2 + 2a = 2.5a`` for skewed ones.
    """
    _check_dataset(dataset, PARTITIONED_DATASETS)
    # Resolve the directory before the cache lookup: with root=None it depends on the environment.
    resolved = str(locate_fashion_mnist(root).resolve())
    return _fallah_partitions(dataset, num_clients, a_train, a_test, seed, resolved)


@functools.lru_cache(maxsize=8)
def _fallah_partitions(
    dataset: str, num_clients: int, a_train: int, a_test: int, seed: int, root: str
) -> tuple[ClientData, ...]:
    _check_a(a_train)
    _check_a(a_test)
    x_train, y_train, x_test, y_test = load_fashion_mnist(root)
    rng = np.random.default_rng(seed)
    roles = fallah_class_roles(num_clients, rng)
    train_idx = fallah_split_with_plan(y_train.numpy(), [r.counts(a_train) for r in roles], rng)
    test_idx = fallah_split_with_plan(y_test.numpy(), [r.counts(a_test) for r in roles], rng)
    clients = []
    for tr, te in zip(train_idx, test_idx):
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        clients.append(ClientData(x_train[tr_t], y_train[tr_t], x_test[te_t], y_test[te_t]))
    return tuple(clients)


fallah_partitions.cache_clear = _fallah_partitions.cache_clear  # type: ignore[attr-defined]
fallah_partitions.cache_info = _fallah_partitions.cache_info  # type: ignore[attr-defined]


def client_data(
    dataset: str, partition_id: int, num_clients: int, seed: int, **kw: object
) -> ClientData:
    """One client's data: ``fallah_partitions(...)[partition_id]`` or a sinewave task.

    Parameters
    ----------
    dataset
        ``"fashion-mnist"`` (per-fedavg.txt Section 5 split, :func:`fallah_partitions`) or
        ``"sinewave"`` (localmoml Section 6.1, :func:`sinewave_tasks`).
    partition_id
        The client, ``0 <= partition_id < num_clients``.
    num_clients
        Number of clients.
    seed
        Seed of the split / tasks.
    **kw
        Passed on: ``a_train``, ``a_test``, ``root`` for Fashion-MNIST; ``train_points``,
        ``test_points`` for sinewave.
    """
    _check_dataset(dataset, DATASETS)
    if not 0 <= partition_id < num_clients:
        raise ValueError(
            f"partition_id must be in [0, {num_clients - 1}] (num_clients={num_clients}), "
            f"got {partition_id}"
        )
    if dataset == "sinewave":
        return sinewave_tasks(num_clients, seed, **kw)[partition_id]  # type: ignore[arg-type]
    return fallah_partitions(dataset, num_clients, seed=seed, **kw)[partition_id]  # type: ignore[arg-type]
