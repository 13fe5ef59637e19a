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


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation and 10th percentile across clients."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(np.percentile(v, 10))}
