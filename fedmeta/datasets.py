"""Image data sets on disk: where MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 are found (a data
directory, the cache, the ``dataset-fashion-mnist`` system package, or torchvision's download),
and reading them with torchvision into uint8 tensors (:func:`load_dataset`). No Flower here; the
client data built from them is :mod:`fedmeta.data`.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import shutil
from pathlib import Path

import torch
from torch import Tensor

from fedmeta.files import atomic_write

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


_CIFAR_FILES = {  # torchvision's CIFAR10 / CIFAR100: base_folder, train_list + test_list + meta file, archive
    "cifar10": ("cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
                "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train", "test", "meta"], "cifar-100-python.tar.gz"),
}
"""The files torchvision's CIFAR classes read (checked by a test against torchvision's own lists), so that
finding them needs no torchvision import."""


def _locate_cifar(name: str, base: Path, download: bool) -> Path:
    base_folder, files, archive = _CIFAR_FILES[name]
    folder = base / base_folder
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return base
    if download:
        _torchvision_class(name)(str(base), train=True, download=True)
        return base
    raise _not_found(name, missing, [folder], f"{base_folder}/ (extracted from {archive})")


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


_SOURCE_DIRS = {**{n: f"{_TORCHVISION_CLASSES[n]}/raw" for n in ("mnist", "fashion-mnist")},
                **{n: folder for n, (folder, _, _) in _CIFAR_FILES.items()}}
"""Where below ``ROOT`` torchvision reads each data set's files (the IDX ``raw`` folder, the CIFAR folder)."""
ARRAY_CACHE = "fedmeta-arrays-v1"
"""Directory beside a data set's files holding its decoded arrays (``.npy``), so that a process that needs
the data (every deployed ClientApp message starts one) reads them without importing torchvision."""
_ARRAY_NAMES = ("x_train", "y_train", "x_test", "y_test")


def _source_stamp(name: str, root: str) -> str:
    """Names, sizes and modification times of the files torchvision reads for ``name``: the key of its array cache."""
    folder = Path(root) / _SOURCE_DIRS[name]
    entries = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return repr(entries)


def _cached_arrays(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The decoded arrays from :data:`ARRAY_CACHE`, if written from the files as they are now."""
    import numpy as np

    cache = Path(root) / _SOURCE_DIRS[name] / ARRAY_CACHE
    try:
        if (cache / "source").read_text() != _source_stamp(name, root):
            return None
        arrays = [torch.from_numpy(np.load(cache / f"{a}.npy", allow_pickle=False)) for a in _ARRAY_NAMES]
    except (OSError, ValueError):
        return None
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _write_array_cache(name: str, root: str, arrays: tuple[Tensor, ...]) -> None:
    """Write :data:`ARRAY_CACHE` (atomically, file by file; the source stamp last). A read-only data directory
    is left alone: the data set is then decoded by torchvision in every process, as without the cache."""
    import numpy as np

    cache = Path(root) / _SOURCE_DIRS[name] / ARRAY_CACHE
    try:
        for a, t in zip(_ARRAY_NAMES, arrays):
            atomic_write(cache / f"{a}.npy", lambda fh, t=t: np.save(fh, t.numpy(), allow_pickle=False), sync=False)
        atomic_write(cache / "source", lambda fh: fh.write(_source_stamp(name, root).encode()), sync=False)
    except OSError:
        pass


@functools.lru_cache(maxsize=4)
def _load_dataset(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cached = _cached_arrays(name, root)
    if cached is not None:
        return cached
    arrays = _decode_dataset(name, root)
    _write_array_cache(name, root, arrays)
    return arrays


def _decode_dataset(name: str, root: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The data set's uint8 images and int64 labels, decoded by torchvision from its files under ``root``."""
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
