"""Label-skew partitions as class plans: how many samples of each class every client gets
(``fallah``, ``dirichlet``, ``pathological``; see :mod:`fedmeta.data`), and drawing each client's
sample indices from a plan (:func:`split_by_plan`, :func:`partition_indices`). Pure numpy, no files.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np



Plan = list[dict[int, int]]
"""Per client, ``{class: number of samples}``."""

PARTITION_DEFAULTS: dict[str, dict[str, Any]] = {
    "fallah": {"a_train": 68, "a_test": 34},
    "dirichlet": {"alpha": 0.5, "train_per_client": 300, "test_per_client": 100},
    "pathological": {"classes_per_client": 2, "train_per_client": 300, "test_per_client": 100},
}
"""The partitions of :func:`partitions` and their parameters' defaults."""

FALLAH_A_TEST: dict[str, int] = {"cifar100": 15}
"""Data sets whose default Fallah ``a_test`` is not 34 (localmoml Section 6.2)."""

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


def dirichlet_plans(num_clients: int, rng: np.random.Generator, num_classes: int = 10, alpha: float = 0.5,
                    train_per_client: int = 300, test_per_client: int = 100) -> tuple[Plan, Plan]:
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


def pathological_plans(num_clients: int, rng: np.random.Generator, num_classes: int = 10, classes_per_client: int = 2,
                       train_per_client: int = 300, test_per_client: int = 100) -> tuple[Plan, Plan]:
    """Train and test plans of the pathological partition: ``c`` classes per client.

    Client classes from :func:`pathological_classes`; each client has ``train_per_client // c``
    training and ``test_per_client // c`` test samples of each of its classes.

    Parameters
    ----------
    num_clients, rng, num_classes
        As for :func:`dirichlet_plans`.
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
