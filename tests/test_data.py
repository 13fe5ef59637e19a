"""Tests of fedmeta.data: the Fallah et al. split, Fashion-MNIST files, samplers, sinewave tasks."""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta import data
from fedmeta.data import (
    ClientData,
    SinewaveData,
    client_data,
    fallah_class_plan,
    fallah_class_roles,
    fallah_partitions,
    fallah_split,
    fallah_split_with_plan,
    load_fashion_mnist,
    locate_fashion_mnist,
    sinewave_tasks,
)

FIRST = set(range(5))
LAST = set(range(5, 10))


def synthetic_labels(per_class: int = 200, num_classes: int = 10) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(123).permutation(labels)


def check_composition(labels_per_client: list[np.ndarray], a: int) -> list[tuple[int, int]]:
    """Assert the per-fedavg Section 5 composition; return each skewed client's (first, last)."""
    n = len(labels_per_client)
    skewed = []
    for i, labels in enumerate(labels_per_client):
        counts = Counter(int(c) for c in labels)
        if i < n // 2:
            assert counts == {c: a for c in FIRST}, f"balanced client {i}: {counts}"
        else:
            assert sorted(counts.values()) == [a // 2, 2 * a], f"skewed client {i}: {counts}"
            first = next(c for c, k in counts.items() if k == a // 2)
            last = next(c for c, k in counts.items() if k == 2 * a)
            assert first in FIRST and last in LAST, f"skewed client {i}: {counts}"
            skewed.append((first, last))
    return skewed


def assert_disjoint(parts: list[np.ndarray]) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)


# --------------------------------------------------------------------------- Fallah split


def test_fallah_split_composition_disjoint_and_balanced_assignment():
    labels = synthetic_labels()
    n, a = 10, 6
    parts = fallah_split(labels, n, a, np.random.default_rng(0))
    assert len(parts) == n
    assert_disjoint(parts)
    skewed = check_composition([labels[p] for p in parts], a)
    # 5 skewed clients over 5 first and 5 last classes: each class used exactly once.
    assert sorted(f for f, _ in skewed) == sorted(FIRST)
    assert sorted(l for _, l in skewed) == sorted(LAST)


def test_fallah_roles_balanced_beyond_one_round():
    # 50 clients -> 25 skewed over 5 classes: each class used by exactly ceil(25/5) = 5.
    roles = fallah_class_roles(50, np.random.default_rng(1))
    skewed = roles[25:]
    assert all(r.kind == "balanced" for r in roles[:25])
    assert Counter(r.first_class for r in skewed) == {c: 5 for c in FIRST}
    assert Counter(r.last_class for r in skewed) == {c: 5 for c in LAST}
    # 14 clients -> 7 skewed: no class used more than ceil(7/5) = 2 times.
    skewed = fallah_class_roles(14, np.random.default_rng(2))[7:]
    assert max(Counter(r.first_class for r in skewed).values()) <= 2
    assert max(Counter(r.last_class for r in skewed).values()) <= 2


def test_fallah_split_deterministic_per_seed():
    labels = synthetic_labels()
    a = fallah_split(labels, 10, 6, np.random.default_rng(7))
    b = fallah_split(labels, 10, 6, np.random.default_rng(7))
    c = fallah_split(labels, 10, 6, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_fallah_plan_shared_between_train_and_test():
    roles = fallah_class_roles(10, np.random.default_rng(3))
    train = [r.counts(6) for r in roles]
    test = [r.counts(2) for r in roles]
    assert [set(p) for p in train] == [set(p) for p in test]
    assert fallah_class_plan(10, 6, np.random.default_rng(3)) == train
    parts = fallah_split_with_plan(synthetic_labels(), test, np.random.default_rng(0))
    assert [len(p) for p in parts] == [sum(p.values()) for p in test]


@pytest.mark.parametrize(
    ("num_clients", "a", "field"),
    [(9, 6, "num_clients"), (0, 6, "num_clients"), (10, 5, "a"), (10, 0, "a")],
)
def test_fallah_split_rejects_bad_parameters(num_clients, a, field):
    with pytest.raises(ValueError, match=rf"^{field} .*even integer >= 2"):
        fallah_split(synthetic_labels(), num_clients, a, np.random.default_rng(0))


def test_fallah_split_too_few_samples_names_class():
    labels = synthetic_labels(per_class=200)
    labels[np.flatnonzero(labels == 2)[10:]] = 7  # leave class 2 with 10 samples
    # balanced clients need 5 * 6 = 30 samples of class 2 alone.
    with pytest.raises(ValueError, match=r"class 2 .*needs \d+ but only 10 are available"):
        fallah_split(labels, 10, 6, np.random.default_rng(0))


# --------------------------------------------------------------------------- IDX files


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x00000800 | array.ndim  # 0x08: unsigned byte
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(directory: Path, n_train: int = 12, n_test: int = 6) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(directory / f"{name}.gz", arr)
    return arrays


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nonexistent")
    monkeypatch.delenv("FEDMETA_DATA", raising=False)
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("subdir", ["", "FashionMNIST/raw"])
def test_locate_decompresses_and_torchvision_loads(tmp_path, no_system_data, subdir):
    from torchvision.datasets import FashionMNIST

    root = tmp_path / "root"
    arrays = write_fake_fashion_mnist(root / subdir)
    assert locate_fashion_mnist(root) == root
    for name in data.FASHION_MNIST_FILES:
        assert (root / "FashionMNIST" / "raw" / name).is_file()
    assert not list((root / "FashionMNIST" / "raw").glob(".*.tmp"))

    train = FashionMNIST(root, train=True, download=False)
    assert train.data.shape == (12, 28, 28)
    assert np.array_equal(train.data.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(train.targets.numpy(), arrays["train-labels-idx1-ubyte"])

    x_train, y_train, x_test, y_test = load_fashion_mnist(root)
    assert x_train.shape == (12, 784) and x_test.shape == (6, 784)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    expected = arrays["t10k-images-idx3-ubyte"].reshape(6, -1) / 255.0
    assert torch.allclose(x_test, torch.from_numpy(expected).float())
    assert np.array_equal(y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_locate_uses_system_dir_into_cache(tmp_path, no_system_data, monkeypatch):
    system = tmp_path / "system"
    write_fake_fashion_mnist(system)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", system)
    root = locate_fashion_mnist()
    assert root == tmp_path / "cache"
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    # FEDMETA_DATA takes precedence over the cache.
    monkeypatch.setenv("FEDMETA_DATA", str(tmp_path / "data"))
    assert locate_fashion_mnist() == tmp_path / "data"


def test_locate_missing_files_raises(tmp_path, no_system_data):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        locate_fashion_mnist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="FEDMETA_DATA"):
        locate_fashion_mnist()


# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fedmeta-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FEDMETA_DATA", raising=False)
        mp.setenv("FEDMETA_CACHE", str(cache))
        try:
            locate_fashion_mnist()
        except FileNotFoundError as err:
            msg = f"Fashion-MNIST is required for this test: {err}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg)
            pytest.skip(msg)
        yield cache


def test_fallah_partitions_fashion_mnist(fashion_cache):
    a_train, a_test, n = 68, 34, 50
    clients = fallah_partitions("fashion-mnist", n, a_train, a_test, seed=0)
    assert len(clients) == n
    train_skewed = check_composition([c.y_train.numpy() for c in clients], a_train)
    test_skewed = check_composition([c.y_test.numpy() for c in clients], a_test)
    assert train_skewed == test_skewed  # same classes per client in train and test
    for i, c in enumerate(clients):
        size = 5 if i < n // 2 else 2.5
        assert c.num_train == size * a_train and len(c.x_test) == size * a_test
        assert c.x_train.shape[1] == 784 and c.x_train.dtype == torch.float32
        assert 0.0 <= c.x_train.min() and c.x_train.max() <= 1.0

    # Train rows come from the 60k training split and test rows from the 10k test split,
    # and no two clients share a sample.
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    rng = np.random.default_rng(0)
    roles = fallah_class_roles(n, rng)
    train_idx = fallah_split_with_plan(y_train.numpy(), [r.counts(a_train) for r in roles], rng)
    test_idx = fallah_split_with_plan(y_test.numpy(), [r.counts(a_test) for r in roles], rng)
    assert_disjoint(train_idx)
    assert_disjoint(test_idx)
    for c, tr, te in zip(clients, train_idx, test_idx):
        assert torch.equal(c.x_train, x_train[torch.from_numpy(tr)])
        assert torch.equal(c.x_test, x_test[torch.from_numpy(te)])

    assert client_data("fashion-mnist", 3, n, 0) is clients[3]  # cached
    other = fallah_partitions("fashion-mnist", n, a_train, a_test, seed=1)
    assert not torch.equal(other[0].x_train, clients[0].x_train)


# --------------------------------------------------------------------------- client_data


def test_client_data_validation():
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 4\]"):
        client_data("sinewave", 5, 5, 0)
    with pytest.raises(ValueError, match="partition_id"):
        client_data("sinewave", -1, 5, 0)
    with pytest.raises(ValueError, match="'fashion-mnist', 'sinewave'"):
        client_data("mnist", 0, 5, 0)
    with pytest.raises(ValueError, match="'fashion-mnist'"):
        fallah_partitions("cifar-10")
    task = client_data("sinewave", 7, 25, 0)
    assert task.amplitude == 2.0 and task.phase == pytest.approx(3 * math.pi / 5)


# --------------------------------------------------------------------------- sampling


def make_client(n: int = 20) -> ClientData:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return ClientData(x, torch.arange(n), x[:4], torch.arange(4))


def test_sample_without_replacement_and_reproducible():
    client = make_client()
    g = torch.Generator().manual_seed(0)
    x, y = client.sample(8, g)
    assert x.shape == (8, 3) and y.shape == (8,)
    assert len(set(y.tolist())) == 8
    assert torch.equal(x[:, 0].long(), y)  # rows stay paired
    x2, y2 = client.sample(8, g)
    assert not torch.equal(y, y2)  # a second call is a new batch
    _, y3 = client.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(y, y3)


def test_sample_more_than_available_returns_all_shuffled():
    client = make_client(5)
    _, y = client.sample(50, torch.Generator().manual_seed(1))
    assert sorted(y.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="k"):
        client.sample(0, torch.Generator())


def test_to_same_device_returns_self():
    client = make_client()
    assert client.to("cpu") is client
    task = sinewave_tasks(1, 0)[0]
    assert task.to(torch.device("cpu")) is task
    assert isinstance(task, SinewaveData)


# --------------------------------------------------------------------------- sinewave


def test_sinewave_grid():
    tasks = sinewave_tasks(25, seed=0)
    for k, t in enumerate(tasks):  # A-major: A = k // 5 + 1, phi = (k % 5 + 1) pi / 5
        assert t.amplitude == k // 5 + 1
        assert t.phase == pytest.approx((k % 5 + 1) * math.pi / 5)
    assert tasks[4].phase == pytest.approx(math.pi) and tasks[5].amplitude == 2.0
    assert sorted({t.amplitude for t in tasks}) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert len({(t.amplitude, round(t.phase, 9)) for t in tasks}) == 25
    for t in tasks:
        assert t.x_train.shape == (10, 1) and t.x_test.shape == (100, 1)
        assert t.x_train.dtype == t.y_train.dtype == torch.float32
        assert t.x_train.abs().max() <= 5.0 and t.x_test.abs().max() <= 5.0
        assert torch.allclose(t.y_test, t.amplitude * torch.sin(t.x_test + t.phase))
        assert torch.allclose(t.y_train, t.amplitude * torch.sin(t.x_train + t.phase))


def test_sinewave_extra_tasks_and_determinism():
    tasks = sinewave_tasks(40, seed=3)
    assert [(t.amplitude, t.phase) for t in tasks[:25]] == [
        (t.amplitude, t.phase) for t in sinewave_tasks(25, seed=3)
    ]
    for t in tasks[25:]:
        assert 1.0 <= t.amplitude <= 5.0 and math.pi / 5 <= t.phase <= math.pi
    again = sinewave_tasks(40, seed=3)
    other = sinewave_tasks(40, seed=4)
    assert all(torch.equal(t.x_train, u.x_train) and t.phase == u.phase for t, u in zip(tasks, again))
    assert not torch.equal(tasks[0].x_test, other[0].x_test)
    assert tasks[30].amplitude != other[30].amplitude
    # A task does not depend on how many tasks were requested.
    assert torch.equal(sinewave_tasks(3, seed=3)[2].x_test, tasks[2].x_test)


def test_sinewave_sample_is_online_and_exact():
    task = sinewave_tasks(25, seed=0)[17]
    g = torch.Generator().manual_seed(5)
    x, y = task.sample(64, g)
    assert x.shape == y.shape == (64, 1) and x.dtype == y.dtype == torch.float32
    assert x.min() >= -5.0 and x.max() <= 5.0
    assert torch.allclose(y, task.amplitude * torch.sin(x + task.phase))
    assert not torch.isin(x, task.x_train).any()  # fresh points, not the pool
    x2, _ = task.sample(64, g)
    assert not torch.equal(x, x2)
    x3, _ = task.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(x, x3)
