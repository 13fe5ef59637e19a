"""Sampling and aggregation as free functions, testable without a running Flower app."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord


def sample_partitions(num_clients: int, clients_per_round: int | None, seed: int, server_round: int) -> list[int]:
    """Partitions that take part in ``server_round``, sorted.

    Cross-silo (``clients_per_round`` is ``None`` or equals ``num_clients``): every partition.
    Cross-device: exactly ``B = clients_per_round`` of ``n = num_clients``, uniformly without
    replacement, from a ``numpy`` generator seeded by ``(seed, server_round)``. The draw depends
    only on these numbers -- not on Flower's random node ids, on earlier rounds or on the global
    ``random`` module -- so a run is reproducible by partition and can be resumed at any round.
    """
    if clients_per_round is None or clients_per_round == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=clients_per_round, replace=False))


def sample_grouped(num_clients: int, groups: int, per_group: int, seed: int, server_round: int) -> list[int]:
    """Stratified cross-device sampling: ``per_group`` clients from each of ``groups`` groups.

    Clients ``0..num_clients-1`` are split into ``groups`` contiguous, near-equal groups, as the
    LocalMOML experiments split 50 tasks over 4 GPUs that each sample B' of the tasks they own
    (localmoml Section 6.2). Each group draws from its own stream seeded by
    ``(seed, server_round, group)``; ``B = groups * per_group`` clients train per round.
    """
    chosen: list[int] = []
    for g, members in enumerate(np.array_split(np.arange(num_clients), groups)):
        if not 1 <= per_group <= len(members):
            raise ValueError(f"per_group must be in [1, {len(members)}] (group {g} has {len(members)} clients), got {per_group}")
        rng = np.random.default_rng([seed, server_round, g])
        chosen.extend(int(i) for i in rng.choice(members, size=per_group, replace=False))
    return sorted(chosen)


def holdout_partitions(num_partitions: int, num_new: int, seed: int) -> list[int]:
    """``num_new`` partitions, drawn once from a generator seeded by ``seed``, that never train.

    Drawn at random rather than taking the last ids, so that splits whose client types depend on
    the id (the Fallah split's balanced first half, skewed second half) hold out both types.
    """
    if not 0 <= num_new < num_partitions:
        raise ValueError(f"num_new must be in [0, {num_partitions - 1}], got {num_new}")
    rng = np.random.default_rng([seed, 2**31 - 1])  # a stream apart from the per-round sampling
    return sorted(int(i) for i in rng.choice(num_partitions, size=num_new, replace=False))


def average_arrays(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """``sum_i weights_i * records_i / sum_i weights_i``, key by key, accumulated in float64.

    With equal weights this is the papers' uniform average over the sampled clients
    (per-fedavg.txt eq. 10, localmoml Algorithm 3 line 15).
    """
    if not records:
        raise ValueError("average_arrays needs at least one record")
    if len(records) != len(weights):
        raise ValueError(f"got {len(records)} records and {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: dict[str, Array] = {}
    for key in records[0]:
        first = records[0][key].numpy()
        acc = np.zeros(first.shape, dtype=np.float64)
        for rec, wt in zip(records, weights):
            acc += (wt / total) * rec[key].numpy().astype(np.float64)
        out[key] = Array(acc.astype(first.dtype))
    return ArrayRecord(out)


def average_metrics(records: Sequence[MetricRecord], weights: Sequence[float], skip: Sequence[str] = ()) -> MetricRecord:
    """Weighted mean of every scalar metric present in all records (keys in ``skip`` left out)."""
    total = float(sum(weights))
    keys = [k for k in records[0] if k not in skip and all(k in r for r in records)]
    out = {}
    for k in keys:
        if all(isinstance(r[k], (int, float)) for r in records):
            out[k] = float(sum(w * float(r[k]) for r, w in zip(records, weights)) / total)
    return MetricRecord(out)


def average_clients(records: Sequence[ArrayRecord], rows: Sequence[Sequence[dict]], weighted_by: str | None,
                    skip: Sequence[str] = ()) -> tuple[ArrayRecord, MetricRecord]:
    """The average over clients of replies whose arrays ``records[i]`` are the average over the clients of
    ``rows[i]`` (their metrics, one row per client): a reply weighs its clients (``weighted_by`` ``None``:
    uniform) or their ``weighted_by`` (``num-examples``); the metrics are averaged per client (keys in
    ``skip`` left out)."""
    flat = [r for rr in rows for r in rr]
    if weighted_by is None:
        weights, row_weights = [float(len(rr)) for rr in rows], [1.0] * len(flat)
    else:
        weights = [sum(float(r[weighted_by]) for r in rr) for rr in rows]
        row_weights = [float(r[weighted_by]) for r in flat]
    return average_arrays(records, weights), average_metrics([MetricRecord(r) for r in flat], row_weights, skip=skip)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and 10th percentile across clients."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(np.percentile(v, 10))}
