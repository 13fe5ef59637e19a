"""Small generated image data sets in torchvision's on-disk formats (for tests/test_data.py).

Every image carries its own identity in its first three values (channel 0, row 0, columns
0..2): ``index // 256``, ``index % 256`` and the split (0 train, 1 test), so a client's samples
can be traced back to the rows of the generated files (:func:`decode`). The other pixels are
random.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def balanced_labels(per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """``per_class`` labels of each class, shuffled."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def tagged_images(n: int, shape: tuple[int, ...], split: int, seed: int) -> np.ndarray:
    """Random uint8 images ``[n, *shape]`` whose first three values encode (index, split)."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) // 256
    flat[:, 1] = np.arange(n) % 256
    flat[:, 2] = split
    return x


def decode(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(index, split)`` of images ``[N, C, H, W]`` (uint8, or float32 in [0, 1])."""
    if x.dtype != torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    first = x[:, 0, 0, :3].to(torch.int64).numpy()
    return first[:, 0] * 256 + first[:, 1], first[:, 2]


# --------------------------------------------------------------------------- MNIST (IDX)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file of unsigned bytes (``.gz``-compressed if ``compress``)."""
    magic = 0x00000800 | array.ndim  # 0x08: unsigned byte
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_dataset(
    directory: Path, per_class_train: int = 12, per_class_test: int = 6, compress: bool = False
) -> dict[str, np.ndarray]:
    """The four (Fashion-)MNIST IDX files in ``directory``; returns the arrays by :data:`IDX_NAMES` key.

    For torchvision's ``MNIST`` uncompressed in ``ROOT/MNIST/raw``; ``FashionMNIST`` reads
    ``ROOT/FashionMNIST/raw``.
    """
    y_train = balanced_labels(per_class_train, 10, seed=1)
    y_test = balanced_labels(per_class_test, 10, seed=2)
    arrays = {
        "train_images": tagged_images(len(y_train), (28, 28), 0, seed=3),
        "train_labels": y_train.astype(np.uint8),
        "test_images": tagged_images(len(y_test), (28, 28), 1, seed=4),
        "test_labels": y_test.astype(np.uint8),
    }
    for key, arr in arrays.items():
        name = IDX_NAMES[key] + (".gz" if compress else "")
        write_idx(directory / name, arr, compress)
    return arrays


# --------------------------------------------------------------------------- CIFAR (pickles)


def _dump(path: Path, obj: dict) -> None:
    # The real files are Python 2 pickles with str keys; torchvision reads them with
    # encoding="latin1", which yields these str keys and numpy arrays.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_class_train: int = 12, per_class_test: int = 6) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``, ``batches.meta``.

    ``data`` is uint8 ``[N, 3072]`` (1024 red, 1024 green, 1024 blue values, each row-major
    32x32), ``labels`` a list of ints. Returns the train/test ``data`` (train concatenated over
    the five batches) and labels.
    """
    folder = root / "cifar-10-batches-py"
    y_train = balanced_labels(per_class_train, 10, seed=5)
    y_test = balanced_labels(per_class_test, 10, seed=6)
    x_train = tagged_images(len(y_train), (3, 32, 32), 0, seed=7).reshape(len(y_train), 3072)
    x_test = tagged_images(len(y_test), (3, 32, 32), 1, seed=8).reshape(len(y_test), 3072)
    for b, rows in enumerate(np.array_split(np.arange(len(y_train)), 5), start=1):
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": [int(v) for v in y_train[rows]],
                "data": x_train[rows],
                "filenames": [f"img_{i}.png" for i in rows],
            },
        )
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in y_test],
            "data": x_test,
            "filenames": [f"test_{i}.png" for i in range(len(y_test))],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": len(y_train) // 5,
            "label_names": [f"c{i}" for i in range(10)],
            "num_vis": 3072,
        },
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_cifar100(root: Path, per_class_train: int = 12, per_class_test: int = 6) -> dict[str, np.ndarray]:
    """``root/cifar-100-python``: ``train`` and ``test`` (``data``, ``fine_labels``,
    ``coarse_labels``) and ``meta`` (``fine_label_names``, ``coarse_label_names``).

    ``per_class_*`` count per coarse superclass; fine label ``5 * coarse + k`` with random ``k``.
    Returns ``data`` and both label kinds per split.
    """
    folder = root / "cifar-100-python"
    out: dict[str, np.ndarray] = {}
    for split, per_class, seed in (("train", per_class_train, 9), ("test", per_class_test, 10)):
        coarse = balanced_labels(per_class, 20, seed=seed)
        fine = 5 * coarse + np.random.default_rng(seed).integers(0, 5, size=len(coarse))
        x = tagged_images(len(coarse), (3, 32, 32), int(split == "test"), seed=seed + 10)
        x = x.reshape(len(coarse), 3072)
        _dump(
            folder / split,
            {
                "filenames": [f"{split}_{i}.png" for i in range(len(coarse))],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": [int(v) for v in fine],
                "coarse_labels": [int(v) for v in coarse],
                "data": x,
            },
        )
        out.update({f"x_{split}": x, f"y_{split}": coarse, f"fine_{split}": fine})
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return out


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def patch_cifar_md5(monkeypatch, cls: type, root: Path) -> None:
    """Point ``cls``'s expected md5 sums (``train_list``, ``test_list``, ``meta``) at the fixture files.

    torchvision's own integrity check and loading code then run unchanged on the fixtures.
    """
    folder = root / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[f, md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
