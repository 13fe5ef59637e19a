"""Tests of fedmeta.data: image loaders (on generated torchvision-format fixtures), the Fallah,
Dirichlet and pathological partitions, real Fashion-MNIST, samplers and sinewave tasks."""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    decode,
    patch_cifar_md5,
    write_cifar10,
    write_cifar100,
    write_idx_dataset,
)
from torchvision import datasets as tvd

from fedmeta import data
from fedmeta import class_plans, datasets
from fedmeta.data import (
    DATASETS,
    IMAGE_SHAPES,
    NUM_CLASSES,
    PARTITION_DEFAULTS,
    ClientData,
    SinewaveData,
    client_data,
    dirichlet_plans,
    fallah_class_plan,
    fallah_class_roles,
    fallah_partitions,
    fallah_plans,
    fallah_split,
    load_dataset,
    load_fashion_mnist,
    locate_dataset,
    locate_fashion_mnist,
    partition_indices,
    partitions,
    pathological_classes,
    pathological_plans,
    sinewave_task,
    sinewave_tasks,
    split_by_plan,
)

FIRST = set(range(5))
LAST = set(range(5, 10))


def synthetic_labels(per_class: int = 200, num_classes: int = 10, seed: int = 123) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def counts_of(labels: np.ndarray) -> dict[int, int]:
    return dict(Counter(int(c) for c in labels))


def check_composition(
    labels_per_client: list[np.ndarray], a: int, num_classes: int = 10
) -> list[tuple[int, int]]:
    """Assert the per-fedavg Section 5 composition; return each skewed client's (first, last)."""
    n, h = len(labels_per_client), num_classes // 2
    skewed = []
    for i, labels in enumerate(labels_per_client):
        counts = counts_of(labels)
        if i < n // 2:
            assert counts == {c: a for c in range(h)}, f"balanced client {i}: {counts}"
        else:
            assert len(counts) == 2 and sorted(counts.values()) == [a // 2, 2 * a], f"skewed {i}: {counts}"
            first = next(c for c, k in counts.items() if k == a // 2)
            last = next(c for c, k in counts.items() if k == 2 * a)
            assert first < h <= last < num_classes, f"skewed client {i}: {counts}"
            skewed.append((first, last))
    return skewed


def assert_disjoint(parts: list[np.ndarray]) -> None:
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)


def same_split(a: tuple[list[np.ndarray], ...], b: tuple[list[np.ndarray], ...]) -> bool:
    return all(len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b))


def assert_bit_equal(a: ClientData, b: ClientData) -> None:
    """Same tensors bit for bit: dtypes, shapes, order and float bit patterns."""
    for name in ("x_train", "y_train", "x_test", "y_test"):
        u, v = getattr(a, name), getattr(b, name)
        assert u.dtype == v.dtype and u.shape == v.shape and u.device == v.device, name
        if u.is_floating_point():
            u, v = u.view(torch.int32), v.view(torch.int32)
        assert torch.equal(u, v), name


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


def test_fallah_plans_share_roles_between_train_and_test():
    train, test = fallah_plans(10, np.random.default_rng(3), a_train=6, a_test=2)
    assert [set(p) for p in train] == [set(p) for p in test]
    assert train == fallah_class_plan(10, 6, np.random.default_rng(3))
    roles = fallah_class_roles(10, np.random.default_rng(3))
    assert test == [r.counts(2) for r in roles]
    parts = split_by_plan(synthetic_labels(), test, np.random.default_rng(0))
    assert [len(p) for p in parts] == [sum(p.values()) for p in test]


@pytest.mark.parametrize("seed", [0, 1])
def test_fallah_twenty_classes_train_and_test(seed):
    # CIFAR-100's 20 superclasses: first 10 vs last 10; the paper's odd test a = 15 gives a//2 = 7.
    y_train, y_test = synthetic_labels(300, 20, seed=1), synthetic_labels(250, 20, seed=2)
    n, a_train, a_test = 30, 10, 15
    train, test = partition_indices(
        "fallah", y_train, y_test, n, np.random.default_rng(seed), 20, a_train=a_train, a_test=a_test
    )
    assert_disjoint(train)
    assert_disjoint(test)
    train_skewed = check_composition([y_train[p] for p in train], a_train, 20)
    test_skewed = check_composition([y_test[p] for p in test], a_test, 20)
    assert train_skewed == test_skewed
    assert {f for f, _ in train_skewed} == set(range(10))  # 15 skewed clients cover all 10
    assert {l for _, l in train_skewed} == set(range(10, 20))
    assert [len(p) for p in test[n // 2 :]] == [7 + 30] * (n // 2)
    again = partition_indices(
        "fallah", y_train, y_test, n, np.random.default_rng(seed), 20, a_train=a_train, a_test=a_test
    )
    assert same_split((train, test), again)


@pytest.mark.parametrize(
    ("num_clients", "a", "field"),
    [(9, 6, "num_clients"), (0, 6, "num_clients"), (10, 1, "a"), (10, 0, "a"), (10, 2.0, "a")],
)
def test_fallah_split_rejects_bad_parameters(num_clients, a, field):
    with pytest.raises(ValueError, match=rf"^{field} must be an (even )?integer >= 2"):
        fallah_split(synthetic_labels(), num_clients, a, np.random.default_rng(0))


def test_fallah_split_too_few_samples_names_class():
    labels = synthetic_labels(per_class=200)
    labels[np.flatnonzero(labels == 2)[10:]] = 7  # leave class 2 with 10 samples
    # balanced clients need 5 * 6 = 30 samples of class 2 alone.
    msg = r"class 2 has too few samples .*needs \d+ but only 10 are available"
    with pytest.raises(ValueError, match=msg):
        fallah_split(labels, 10, 6, np.random.default_rng(0))


# --------------------------------------------------------------------------- Dirichlet partition


def test_largest_remainder_rounding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.dirichlet(np.full(7, 0.3))
        total = int(rng.integers(1, 500))
        counts = class_plans._largest_remainder(p, total)
        assert counts.sum() == total and counts.min() >= 0
        assert np.all(np.abs(counts - p * total) < 1)
    assert class_plans._largest_remainder(np.array([0.5, 0.25, 0.25]), 3).tolist() == [1, 1, 1]
    assert class_plans._largest_remainder(np.array([0.5, 0.3, 0.2]), 4).tolist() == [2, 1, 1]
    assert class_plans._largest_remainder(np.array([0.5, 0.5]), 1).tolist() == [1, 0]  # ties: lower class


def test_dirichlet_sizes_disjoint_matched_train_test():
    y_train, y_test = synthetic_labels(400), synthetic_labels(150, seed=4)
    n, n_tr, n_te = 20, 120, 40
    train, test = partition_indices(
        "dirichlet", y_train, y_test, n, np.random.default_rng(0), alpha=0.5,
        train_per_client=n_tr, test_per_client=n_te,
    )
    assert [len(p) for p in train] == [n_tr] * n and [len(p) for p in test] == [n_te] * n
    assert_disjoint(train)
    assert_disjoint(test)
    for tr, te in zip(train, test):
        f_tr = np.bincount(y_train[tr], minlength=10) / n_tr
        f_te = np.bincount(y_test[te], minlength=10) / n_te
        # Both are the largest-remainder rounding of the same proportions p_i.
        assert np.all(np.abs(f_tr - f_te) < 1 / n_tr + 1 / n_te)
    # The plans say the same thing as the drawn labels.
    plan_tr, plan_te = dirichlet_plans(
        n, np.random.default_rng(0), alpha=0.5, train_per_client=n_tr, test_per_client=n_te
    )
    assert [counts_of(y_train[p]) for p in train] == plan_tr
    assert [counts_of(y_test[p]) for p in test] == plan_te


def test_dirichlet_alpha_controls_skew_and_seed_determinism():
    def classes_per_client(alpha: float) -> float:
        plans, _ = dirichlet_plans(200, np.random.default_rng(1), alpha=alpha, train_per_client=100)
        return float(np.mean([len(p) for p in plans]))

    assert classes_per_client(0.05) < 3 < 9.5 < classes_per_client(100.0)
    near_uniform, _ = dirichlet_plans(50, np.random.default_rng(2), alpha=1e4, train_per_client=100)
    assert all(set(p.values()) == {10} for p in near_uniform)

    a = dirichlet_plans(10, np.random.default_rng(5))
    assert a == dirichlet_plans(10, np.random.default_rng(5))
    assert a != dirichlet_plans(10, np.random.default_rng(6))
    assert sum(a[0][0].values()) == PARTITION_DEFAULTS["dirichlet"]["train_per_client"]


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
        ({"alpha": "1"}, "alpha"),
        ({"train_per_client": 0}, "train_per_client"),
        ({"test_per_client": 2.5}, "test_per_client"),
        ({"train_per_client": True}, "train_per_client"),
        ({"num_clients": 0}, "num_clients"),
    ],
)
def test_dirichlet_rejects_bad_parameters(kw, field):
    kw = {"num_clients": 4, **kw}
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        dirichlet_plans(rng=np.random.default_rng(0), **kw)


def test_dirichlet_class_running_out_names_class_and_split():
    y_train = synthetic_labels(100)
    y_test = synthetic_labels(100, seed=9)
    y_test[np.flatnonzero(y_test == 3)[5:]] = 4  # class 3 keeps 5 test samples
    msg = r"class 3 has too few samples in the test split: .*needs 20 but only 5"
    with pytest.raises(ValueError, match=msg):
        # alpha -> infinity: every client has exactly 1 test sample of each class; 20 clients.
        partition_indices("dirichlet", y_train, y_test, 20, np.random.default_rng(0), alpha=1e6,
                          train_per_client=10, test_per_client=10)


# --------------------------------------------------------------------------- pathological partition


@pytest.mark.parametrize(("n", "c", "num_classes"), [(50, 2, 10), (7, 3, 10), (13, 4, 20), (5, 10, 10)])
def test_pathological_classes_distinct_and_balanced(n, c, num_classes):
    classes = pathological_classes(n, c, np.random.default_rng(0), num_classes)
    assert len(classes) == n
    assert all(len(set(cs)) == c and all(0 <= k < num_classes for k in cs) for cs in classes)
    usage = np.bincount(np.concatenate(classes), minlength=num_classes)
    assert usage.max() - usage.min() <= 1
    assert usage.sum() == n * c


def test_pathological_partition_composition():
    y_train, y_test = synthetic_labels(300), synthetic_labels(100, seed=4)
    n, c, n_tr, n_te = 20, 3, 61, 20  # 61 // 3 = 20, 20 // 3 = 6 per class
    train, test = partition_indices(
        "pathological", y_train, y_test, n, np.random.default_rng(0),
        classes_per_client=c, train_per_client=n_tr, test_per_client=n_te,
    )
    assert_disjoint(train)
    assert_disjoint(test)
    expected = pathological_classes(n, c, np.random.default_rng(0))
    for tr, te, cs in zip(train, test, expected):
        assert counts_of(y_train[tr]) == dict.fromkeys(cs, 20)
        assert counts_of(y_test[te]) == dict.fromkeys(cs, 6)
    # Clients differ: not every client holds the same pair of classes.
    assert len(set(expected)) > 1
    again = partition_indices(
        "pathological", y_train, y_test, n, np.random.default_rng(0),
        classes_per_client=c, train_per_client=n_tr, test_per_client=n_te,
    )
    other = partition_indices(
        "pathological", y_train, y_test, n, np.random.default_rng(1),
        classes_per_client=c, train_per_client=n_tr, test_per_client=n_te,
    )
    assert same_split((train, test), again)
    assert not same_split((train, test), other)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"classes_per_client": 0}, r"^classes_per_client must be an integer in \[1, 10\]"),
        ({"classes_per_client": 11}, r"^classes_per_client must be an integer in \[1, 10\]"),
        ({"classes_per_client": 3, "train_per_client": 2}, r"^train_per_client must be an integer >= 3"),
        ({"classes_per_client": 2, "test_per_client": 1}, r"^test_per_client must be an integer >= 2"),
        ({"num_clients": 0}, r"^num_clients must be an integer >= 1"),
    ],
)
def test_pathological_rejects_bad_parameters(kw, match):
    kw = {"num_clients": 4, **kw}
    with pytest.raises(ValueError, match=match):
        pathological_plans(rng=np.random.default_rng(0), **kw)


def test_pathological_plans_match_classes():
    train, test = pathological_plans(6, np.random.default_rng(2), classes_per_client=2)
    classes = pathological_classes(6, 2, np.random.default_rng(2))
    assert train == [dict.fromkeys(cs, 150) for cs in classes]
    assert test == [dict.fromkeys(cs, 50) for cs in classes]


# --------------------------------------------------------------------------- partition parameters


def test_partition_indices_rejects_unknown_partition_and_parameters():
    y = synthetic_labels(50)
    rng = np.random.default_rng(0)
    msg = "partition must be one of 'fallah', 'dirichlet', 'pathological', got 'iid'"
    with pytest.raises(ValueError, match=msg):
        partition_indices("iid", y, y, 4, rng)
    msg = "unknown parameter 'beta' of partition 'dirichlet'; allowed: alpha, train_per_client, test_per_client"
    with pytest.raises(ValueError, match=msg):
        partition_indices("dirichlet", y, y, 4, rng, beta=1.0)
    with pytest.raises(ValueError, match="unknown parameter 'a_train' of partition 'pathological'"):
        partition_indices("pathological", y, y, 4, rng, a_train=4)
    msg = "unknown parameter 'alpha' of partition 'fallah'; allowed: a_train, a_test"
    with pytest.raises(ValueError, match=msg):
        partition_indices("fallah", y, y, 4, rng, alpha=4)


def test_partitions_validates_before_touching_the_disk(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match="^alpha must be"):
        partitions("cifar10", "dirichlet", 4, root=empty, alpha=-1)
    with pytest.raises(ValueError, match="^a_test must be an integer >= 2"):
        partitions("mnist", "fallah", 4, root=empty, a_test=1)
    with pytest.raises(ValueError, match="^num_clients must be an even integer"):
        partitions("mnist", "fallah", 5, root=empty)
    with pytest.raises(ValueError, match="unknown parameter 'a' of partition 'fallah'"):
        client_data("mnist", 0, 4, 0, root=empty, a=3)
    msg = "^dataset must be one of 'mnist', 'fashion-mnist', 'cifar10', 'cifar100', got 'cifar-10'"
    with pytest.raises(ValueError, match=msg):
        partitions("cifar-10", root=empty)
    with pytest.raises(FileNotFoundError, match="mnist"):
        partitions("mnist", "pathological", 4, root=empty)


# --------------------------------------------------------------------------- loaders on fixtures


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nonexistent")
    monkeypatch.delenv("FEDMETA_SYSTEM_DATA", raising=False)
    monkeypatch.delenv("FEDMETA_DATA", raising=False)
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def mnist_root(tmp_path):
    root = tmp_path / "mnist-root"
    return root, write_idx_dataset(root / "MNIST" / "raw")


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    root = tmp_path / "cifar10-root"
    arrays = write_cifar10(root)
    patch_cifar_md5(monkeypatch, tvd.CIFAR10, root)
    return root, arrays


@pytest.fixture
def cifar100_root(tmp_path, monkeypatch):
    root = tmp_path / "cifar100-root"
    arrays = write_cifar100(root)
    patch_cifar_md5(monkeypatch, tvd.CIFAR100, root)
    return root, arrays


def test_dataset_tables():
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "cifar100", "sinewave")
    assert IMAGE_SHAPES == {
        "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)
    }
    assert NUM_CLASSES == {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 20}


def test_load_mnist_raw_idx(mnist_root, no_system_data):
    root, arrays = mnist_root
    x_train, y_train, x_test, y_test = load_dataset("mnist", root)
    assert x_train.shape == (120, 1, 28, 28) and x_test.shape == (60, 1, 28, 28)
    assert x_train.dtype == torch.uint8 and y_train.dtype == y_test.dtype == torch.int64
    assert np.array_equal(x_train[:, 0].numpy(), arrays["train_images"])
    assert np.array_equal(x_test[:, 0].numpy(), arrays["test_images"])
    assert np.array_equal(y_train.numpy(), arrays["train_labels"])
    assert np.array_equal(y_test.numpy(), arrays["test_labels"])
    assert load_dataset("mnist", root)[0] is x_train  # cached per process and directory
    assert torch.equal(tvd.MNIST(root, train=False).data, x_test[:, 0])


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_decoded_arrays_are_cached_beside_the_files_and_follow_them(request, name, no_system_data, monkeypatch):
    """A second process reads the data set from the array cache, without torchvision, bit for bit; a changed
    source file is decoded again."""
    root, _ = request.getfixturevalue(f"{name}_root")
    first = load_dataset(name, root)
    cache = root / datasets._SOURCE_DIRS[name] / datasets.ARRAY_CACHE
    assert sorted(p.name for p in cache.iterdir()) == ["source", "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    datasets._load_dataset.cache_clear()  # as in a new process
    with monkeypatch.context() as m:
        m.setattr(datasets, "_torchvision_class", lambda name: pytest.fail("torchvision used despite the cache"))
        again = load_dataset(name, root)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(first, again))
    if name == "mnist":  # a changed source file: the cache is stale and the data set is decoded again
        arrays = write_idx_dataset(root / "MNIST" / "raw", per_class_train=13)
        datasets._load_dataset.cache_clear()
        fresh = load_dataset(name, root)
        assert np.array_equal(fresh[0][:, 0].numpy(), arrays["train_images"]) and not torch.equal(fresh[0], first[0])


def test_the_cifar_file_table_is_torchvisions():
    for name, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        folder, files, archive = datasets._CIFAR_FILES[name]
        assert (folder, archive) == (cls.base_folder, cls.filename) and datasets._SOURCE_DIRS[name] == folder
        assert files == [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def test_load_mnist_decompresses_gz_from_root(tmp_path, no_system_data):
    root = tmp_path / "root"
    arrays = write_idx_dataset(root, compress=True)
    assert locate_dataset("mnist", root) == root
    for name in data.IDX_FILES:
        assert (root / "MNIST" / "raw" / name).is_file()
    assert not list((root / "MNIST" / "raw").glob(".*.tmp"))
    x_train, y_train, _, _ = load_dataset("mnist", root)
    assert np.array_equal(x_train[:, 0].numpy(), arrays["train_images"])
    assert np.array_equal(y_train.numpy(), arrays["train_labels"])


def test_load_cifar10_pixels_and_labels(cifar10_root, no_system_data):
    root, arrays = cifar10_root
    x_train, y_train, x_test, y_test = load_dataset("cifar10", root)
    assert x_train.shape == (120, 3, 32, 32) and x_test.shape == (60, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    # The pickles store CHW rows; torchvision keeps HWC; we return CHW.
    assert np.array_equal(x_train.numpy(), arrays["x_train"].reshape(-1, 3, 32, 32))
    assert np.array_equal(x_test.numpy(), arrays["x_test"].reshape(-1, 3, 32, 32))
    hwc = tvd.CIFAR10(root, train=True).data
    assert hwc.shape == (120, 32, 32, 3)
    assert np.array_equal(x_train.permute(0, 2, 3, 1).numpy(), hwc)
    assert np.array_equal(y_train.numpy(), arrays["y_train"])
    assert np.array_equal(y_test.numpy(), arrays["y_test"])


def test_load_cifar100_coarse_labels(cifar100_root, no_system_data):
    root, arrays = cifar100_root
    x_train, y_train, x_test, y_test = load_dataset("cifar100", root)
    assert x_train.shape == (240, 3, 32, 32) and x_test.shape == (120, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_test.dtype == torch.int64
    assert np.array_equal(y_train.numpy(), arrays["y_train"])
    assert np.array_equal(y_test.numpy(), arrays["y_test"])
    assert set(y_train.tolist()) == set(range(20))
    # torchvision's own targets are the fine labels, which we do not return.
    assert tvd.CIFAR100(root, train=True).targets == arrays["fine_train"].tolist()
    assert not np.array_equal(arrays["fine_train"], arrays["y_train"])
    assert np.array_equal(x_test.numpy(), arrays["x_test"].reshape(-1, 3, 32, 32))
    assert np.array_equal(x_train.permute(0, 2, 3, 1).numpy(), tvd.CIFAR100(root, train=True).data)


def test_cifar_integrity_is_checked(tmp_path, no_system_data):
    # Without the md5 patch torchvision's real checksums do not match the fixture: rejected.
    root = tmp_path / "corrupt"
    write_cifar10(root)
    with pytest.raises(RuntimeError, match=rf"cifar10 files in {root}.*corrupted.*download=True"):
        load_dataset("cifar10", root)


@pytest.mark.parametrize(
    ("name", "looked_in"),
    [
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
    ],
)
def test_missing_data_message(tmp_path, no_system_data, name, looked_in):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root)
    msg = str(err.value)
    assert msg.startswith(f"{name} not found")
    assert str(root / looked_in) in msg
    assert "FEDMETA_DATA" in msg and "download=True" in msg
    assert ("apt-get install dataset-fashion-mnist" in msg) == (name == "fashion-mnist")


def test_root_from_environment(cifar10_root, tmp_path, monkeypatch, no_system_data):
    root, _ = cifar10_root
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache")):
        load_dataset("cifar10")  # FEDMETA_CACHE
    monkeypatch.setenv("FEDMETA_DATA", str(root))
    assert locate_dataset("cifar10") == root
    assert load_dataset("cifar10")[0].shape == (120, 3, 32, 32)


def test_download_is_passed_to_torchvision(tmp_path, monkeypatch, no_system_data):
    calls = []

    def fake_mnist_download(self):
        calls.append(self.raw_folder)
        write_idx_dataset(Path(self.raw_folder))

    def fake_cifar_download(self):
        calls.append(self.root)
        write_cifar10(Path(self.root))
        patch_cifar_md5(monkeypatch, tvd.CIFAR10, Path(self.root))

    monkeypatch.setattr(tvd.MNIST, "download", fake_mnist_download)
    monkeypatch.setattr(tvd.CIFAR10, "download", fake_cifar_download)
    root = tmp_path / "dl"
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist", root)
    assert calls == []
    assert load_dataset("mnist", root, download=True)[0].shape == (120, 1, 28, 28)
    assert load_dataset("cifar10", root, download=True)[2].shape == (60, 3, 32, 32)
    assert calls == [str(root / "MNIST" / "raw"), str(root)]
    load_dataset("mnist", root, download=True)  # present now: no second download
    assert len(calls) == 2


# --------------------------------------------------------------------------- partitions on fixtures


SMALL_PARAMS = {
    "fallah": lambda c: {"a_train": 4, "a_test": 2},
    "dirichlet": lambda c: {"alpha": 1e4, "train_per_client": 2 * c, "test_per_client": c},
    "pathological": lambda c: {"classes_per_client": 2, "train_per_client": 4, "test_per_client": 2},
}


@pytest.mark.parametrize("partition", ["fallah", "dirichlet", "pathological"])
@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_partitions_on_fixtures(request, no_system_data, name, partition):
    root, _ = request.getfixturevalue(f"{name}_root")
    n, num_classes = 4, NUM_CLASSES[name]
    params = SMALL_PARAMS[partition](num_classes)
    clients = partitions(name, partition, n, seed=0, root=root, **params)
    assert len(clients) == n
    x_train, y_train, x_test, y_test = load_dataset(name, root)
    expected = partition_indices(
        partition, y_train.numpy(), y_test.numpy(), n, np.random.default_rng(0), num_classes, **params
    )
    seen_train, seen_test = [], []
    for c, tr, te in zip(clients, *expected):
        for x, y, full_x, full_y, idx, split, seen in (
            (c.x_train, c.y_train, x_train, y_train, tr, 0, seen_train),
            (c.x_test, c.y_test, x_test, y_test, te, 1, seen_test),
        ):
            assert x.shape == (len(idx), *IMAGE_SHAPES[name]) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and 0.0 <= x.min() and x.max() <= 1.0
            rows, splits = decode(x)
            assert (splits == split).all()  # train rows from the train files, test from test
            assert np.array_equal(rows, idx)
            assert torch.equal(y, full_y[torch.from_numpy(rows)])
            assert torch.equal(x, full_x[torch.from_numpy(rows)].float() / 255)
            seen.append(rows)
        assert set(c.y_train.tolist()) == set(c.y_test.tolist())  # same classes in both splits
    assert_disjoint(seen_train)
    assert_disjoint(seen_test)
    if partition == "fallah":
        check_composition([c.y_train.numpy() for c in clients], 4, num_classes)
        check_composition([c.y_test.numpy() for c in clients], 2, num_classes)
    assert partitions(name, partition, n, seed=0, root=root, **params) is clients  # cached
    for pid in range(n):  # one client built alone == the same client of partitions()
        one = client_data(name, pid, n, 0, partition=partition, root=root, **params)
        assert_bit_equal(one, clients[pid])
        assert one is client_data(name, pid, n, 0, partition=partition, root=root, **params)
    other = partitions(name, partition, n, seed=1, root=root, **params)
    assert any(not torch.equal(a.x_train, b.x_train) for a, b in zip(clients, other))


def test_client_data_materializes_only_the_requested_client(mnist_root, no_system_data, monkeypatch):
    root, _ = mnist_root
    kw = {"partition": "pathological", "root": root, "train_per_client": 4, "test_per_client": 2}
    partitions.cache_clear()
    built = []
    real = data._materialize
    monkeypatch.setattr(data, "_materialize", lambda *a: built.append(a) or real(*a))
    one = client_data("mnist", 3, 6, 0, **kw)
    assert [(len(b[2]), len(b[3])) for b in built] == [(4, 2)]  # client 3's rows only
    assert data._partitions.cache_info().currsize == 0  # partitions() never ran
    assert client_data("mnist", 3, 6, 0, **kw) is one and len(built) == 1  # cached
    other = client_data("mnist", 4, 6, 0, **kw)
    assert len(built) == 2
    assert client_data.cache_info().maxsize == data.CLIENT_CACHE_SIZE >= 10_000  # a node hosting thousands of clients
    # partitions() reuses the cached index plan and gives bit-identical tensors.
    clients = partitions("mnist", "pathological", 6, 0, root, train_per_client=4, test_per_client=2)
    assert data._partition_plan.cache_info().misses == 1
    assert_bit_equal(one, clients[3])
    assert_bit_equal(other, clients[4])
    assert one is not clients[3]
    partitions.cache_clear()  # empties client_data's cache too
    assert client_data("mnist", 3, 6, 0, **kw) is not one


def test_client_data_validates_before_touching_the_disk(tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ValueError, match=r"^test_per_client must be an integer >= 2"):
        client_data("mnist", 0, 4, 0, partition="pathological", root=empty, test_per_client=1)
    with pytest.raises(ValueError, match=r"^alpha must be a finite number > 0"):
        client_data("cifar10", 0, 4, 0, partition="dirichlet", root=empty, alpha=0)
    with pytest.raises(ValueError, match=r"^num_clients must be an even integer"):
        client_data("mnist", 0, 5, 0, root=empty)
    with pytest.raises(ValueError, match=r"^partition_id must be in \[0, 3\] \(num_clients=4\)"):
        client_data("mnist", 4, 4, 0, root=empty)
    with pytest.raises(ValueError, match=r"^partition_id must be in \[0, 3\]"):
        client_data("mnist", 1.0, 4, 0, root=empty)
    # Accepted parameters are remembered (by value and type: True is not 1).
    for _ in range(2):
        with pytest.raises(FileNotFoundError, match="mnist not found"):
            client_data("mnist", 0, 4, 0, partition="dirichlet", root=empty, train_per_client=1)
    with pytest.raises(ValueError, match=r"^train_per_client must be an integer >= 1"):
        client_data("mnist", 0, 4, 0, partition="dirichlet", root=empty, train_per_client=True)


def test_plans_scale_to_10000_clients():
    # Fashion-MNIST's class sizes: 6000 training and 1000 test samples per class.
    y_train, y_test = synthetic_labels(6000), synthetic_labels(1000, seed=5)
    n = 10_000  # a plan quadratic in n would not finish: the suite's hang guard would report it
    train, test = partition_indices(
        "pathological", y_train, y_test, n, np.random.default_rng(0),
        classes_per_client=1, train_per_client=5, test_per_client=1,
    )  # fmt: skip
    assert [len(p) for p in train] == [5] * n and [len(p) for p in test] == [1] * n
    assert_disjoint(train)
    assert np.array_equal(np.sort(np.concatenate(test)), np.arange(len(y_test)))  # all used
    assert all(y_test[te[0]] == y_train[tr[0]] for tr, te in zip(train, test))
    # Two classes per client need >= 2 test samples each: 2000 clients per class x 1 > 1000.
    pathological_plans(n, np.random.default_rng(0), classes_per_client=2, train_per_client=4, test_per_client=2)
    with pytest.raises(ValueError, match=r"too few samples in the test split: the partition needs 2000 but only 1000"):
        partition_indices(
            "pathological", y_train, y_test, n, np.random.default_rng(0),
            classes_per_client=2, train_per_client=4, test_per_client=2,
        )  # fmt: skip
    # Dirichlet: 5 training samples per client fit; 1 test sample per client takes the whole test
    # split, which random class proportions cannot match class by class.
    rng = np.random.default_rng(0)
    train_plan, test_plan = dirichlet_plans(n, rng, alpha=0.5, train_per_client=5, test_per_client=1)
    parts = split_by_plan(y_train, train_plan, rng)
    assert [len(p) for p in parts] == [5] * n
    assert_disjoint(parts)
    with pytest.raises(ValueError, match="too few samples in the test split"):
        split_by_plan(y_test, test_plan, rng, "the test split")


def test_fallah_partitions_wrapper_and_cifar100_default_a_test(cifar100_root, no_system_data):
    root, _ = cifar100_root
    # CIFAR-100's default a_test is the paper's 15 (localmoml Section 6.2): the fixture's 6 test
    # images per superclass are too few for 2 balanced clients x 15.
    msg = r"class \d+ has too few samples in the test split: the partition needs 3\d but only 6"
    with pytest.raises(ValueError, match=msg):
        fallah_partitions("cifar100", 4, 4, root=root)
    clients = fallah_partitions("cifar100", 4, 4, 2, seed=3, root=root)
    assert clients is partitions("cifar100", "fallah", 4, 3, root, a_train=4, a_test=2)
    assert [c.num_train for c in clients] == [40, 40, 10, 10]


# --------------------------------------------------------------------------- Fashion-MNIST files


@pytest.mark.parametrize("subdir", ["", "FashionMNIST/raw"])
def test_locate_fashion_mnist_decompresses_and_loads(tmp_path, no_system_data, subdir):
    root = tmp_path / "root"
    arrays = write_idx_dataset(root / subdir, compress=True)
    assert locate_fashion_mnist(root) == root
    for name in data.IDX_FILES:
        assert (root / "FashionMNIST" / "raw" / name).is_file()
    assert not list((root / "FashionMNIST" / "raw").glob(".*.tmp"))

    train = tvd.FashionMNIST(root, train=True, download=False)
    assert np.array_equal(train.data.numpy(), arrays["train_images"])

    x_train, y_train, x_test, y_test = load_fashion_mnist(root)
    assert x_train.shape == (120, 1, 28, 28) and x_test.shape == (60, 1, 28, 28)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    assert np.array_equal(x_test[:, 0].numpy(), arrays["test_images"])
    assert np.array_equal(y_test.numpy(), arrays["test_labels"])


def test_locate_uses_system_dir_into_cache(tmp_path, no_system_data, monkeypatch):
    system = tmp_path / "system"
    write_idx_dataset(system, compress=True)
    monkeypatch.setattr(datasets, "SYSTEM_FASHION_MNIST_DIR", system)
    root = locate_fashion_mnist()
    assert root == tmp_path / "cache"
    assert (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    # FEDMETA_DATA takes precedence over the cache.
    monkeypatch.setenv("FEDMETA_DATA", str(tmp_path / "data"))
    assert locate_fashion_mnist() == tmp_path / "data"
    # MNIST has no system package to fall back on.
    with pytest.raises(FileNotFoundError, match="mnist not found"):
        locate_dataset("mnist")


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
        assert c.x_train.shape[1:] == (1, 28, 28) and c.x_train.dtype == torch.float32
        assert 0.0 <= c.x_train.min() and c.x_train.max() <= 1.0

    # Train rows come from the 60k training split and test rows from the 10k test split,
    # and no two clients share a sample.
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert x_train.dtype == torch.uint8
    train_idx, test_idx = partition_indices(
        "fallah", y_train.numpy(), y_test.numpy(), n, np.random.default_rng(0), a_train=a_train, a_test=a_test
    )
    assert_disjoint(train_idx)
    assert_disjoint(test_idx)
    for c, tr, te in zip(clients, train_idx, test_idx):
        assert torch.equal(c.x_train, x_train[torch.from_numpy(tr)].float() / 255)
        assert torch.equal(c.x_test, x_test[torch.from_numpy(te)].float() / 255)

    one = client_data("fashion-mnist", 3, n, 0)
    assert_bit_equal(one, clients[3])
    assert client_data("fashion-mnist", 3, n, 0, partition="fallah", a_train=68) is one  # cached
    other = fallah_partitions("fashion-mnist", n, a_train, a_test, seed=1)
    assert not torch.equal(other[0].x_train, clients[0].x_train)


@pytest.mark.parametrize("partition", ["dirichlet", "pathological"])
def test_default_partitions_fashion_mnist(fashion_cache, partition):
    clients = partitions("fashion-mnist", partition)
    assert len(clients) == 50
    assert all(c.num_train == 300 and len(c.y_test) == 100 for c in clients)
    for c in clients:
        assert set(c.y_train.tolist()) >= set(c.y_test.tolist())
    if partition == "pathological":
        assert all(len(set(c.y_train.tolist())) == 2 for c in clients)
    for pid in (0, 17, 49):
        assert_bit_equal(client_data("fashion-mnist", pid, 50, 0, partition=partition), clients[pid])


def test_client_data_10000_clients_fashion_mnist(fashion_cache):
    n = 10_000
    params = {"classes_per_client": 1, "train_per_client": 5, "test_per_client": 1}
    partitions.cache_clear()
    clients = {pid: client_data("fashion-mnist", pid, n, 0, partition="pathological", **params) for pid in (0, 1, n - 1)}
    # What makes 10,000 clients cheap: the three requested clients were built, not the 10,000-client split
    assert data._partitions.cache_info().currsize == 0 and data._client.cache_info().currsize == 3
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    train_idx, test_idx = partition_indices(
        "pathological", y_train.numpy(), y_test.numpy(), n, np.random.default_rng(0), **params
    )
    for pid, c in clients.items():
        tr, te = torch.from_numpy(train_idx[pid]), torch.from_numpy(test_idx[pid])
        expected = ClientData(x_train[tr].float() / 255, y_train[tr], x_test[te].float() / 255, y_test[te])
        assert_bit_equal(c, expected)
        assert c.num_train == 5 and len(c.y_test) == 1 and len(set(c.y_train.tolist())) == 1


def test_pathological_20_clients_pfllib_workload_fashion_mnist(fashion_cache):
    # The PFLlib comparison: 2 classes per client, 20 clients, so 4 clients per class.
    _, y_train, _, y_test = load_fashion_mnist()
    y_train, y_test = y_train.numpy(), y_test.numpy()

    def split(train_per_client, test_per_client):
        return partition_indices(
            "pathological", y_train, y_test, 20, np.random.default_rng(0), classes_per_client=2,
            train_per_client=train_per_client, test_per_client=test_per_client,
        )  # fmt: skip

    train, test = split(2625, 500)
    assert [len(p) for p in train] == [2624] * 20  # rounded down to 1312 per class
    assert [len(p) for p in test] == [500] * 20
    c = client_data("fashion-mnist", 7, 20, 0, partition="pathological", train_per_client=2625, test_per_client=500)
    assert sorted(Counter(c.y_train.tolist()).values()) == [1312, 1312]
    assert sorted(Counter(c.y_test.tolist()).values()) == [250, 250]
    # Largest sizes that fit: 4 x 1500 of 6000 training and 4 x 250 of 1000 test samples per class.
    train, test = split(3001, 501)
    assert {len(p) for p in train} == {3000} and {len(p) for p in test} == {500}
    with pytest.raises(ValueError, match=r"train split: the partition needs 6004 but only 6000"):
        split(3002, 500)
    with pytest.raises(ValueError, match=r"test split: the partition needs 1004 but only 1000"):
        split(2625, 502)


# --------------------------------------------------------------------------- client_data


def test_client_data_validation():
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 4\]"):
        client_data("sinewave", 5, 5, 0)
    with pytest.raises(ValueError, match="partition_id"):
        client_data("sinewave", -1, 5, 0)
    with pytest.raises(ValueError, match="'cifar100', 'sinewave', got 'emnist'"):
        client_data("emnist", 0, 5, 0)
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


def test_sinewave_task_alone_equals_the_full_list():
    tasks = sinewave_tasks(40, seed=3)
    for i in (0, 24, 25, 39):
        for one in (sinewave_task(i, 40, 3), client_data("sinewave", i, 40, 3)):
            assert (one.amplitude, one.phase) == (tasks[i].amplitude, tasks[i].phase)
            assert_bit_equal(one, tasks[i])
    small = client_data("sinewave", 2, 40, 3, train_points=4, test_points=7)
    assert small.x_train.shape == (4, 1) and small.x_test.shape == (7, 1)
    assert torch.equal(small.x_train, sinewave_tasks(3, 3, train_points=4, test_points=7)[2].x_train)
    with pytest.raises(ValueError, match=r"^task must be an integer in \[0, 39\], got 40"):
        sinewave_task(40, 40, 3)
    with pytest.raises(ValueError, match="train_points"):
        sinewave_task(0, 40, 3, train_points=0)


def test_sinewave_10000_tasks_one_at_a_time_is_cheap(monkeypatch):
    built = []  # the tasks whose points and tensors are made: only the ten requested (sinewave_tasks builds all)
    build = data._sinewave_task
    monkeypatch.setattr(data, "_sinewave_task", lambda task, *a: built.append(task) or build(task, *a))
    last = [client_data("sinewave", i, 10_000, 0) for i in range(9_990, 10_000)]
    assert built == list(range(9_990, 10_000))
    rng = np.random.default_rng(0)
    amplitudes = rng.uniform(1.0, 5.0, size=10_000 - 25)
    phases = rng.uniform(math.pi / 5, math.pi, size=10_000 - 25)
    assert [(t.amplitude, t.phase) for t in last] == list(zip(amplitudes[-10:], phases[-10:]))


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
