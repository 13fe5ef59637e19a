"""Tensor helpers for running many clients at once: stacking on a leading client axis, the
weighted mean of a node's clients, and the settings of batched execution.

The batched local round itself is :func:`fedmeta.algorithms.executor.local_rounds`, which runs any
registered algorithm for many clients with ``torch.func.vmap`` (the LocalMOML experiments ran ~12
tasks per GPU the same way, localmoml Section 6.2). No Flower import here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from fedmeta.algorithms.base import VMAP_ESTIMATORS  # noqa: F401  (the vmapped estimators; re-exported)
from fedmeta.meta import Params

VECTORIZE = ("auto", "vmap", "compile", "loop")
"""Values of the ``vectorize`` setting (:mod:`fedmeta.algorithms.plan`)."""
DEFAULT_CHUNK_SIZE = 100
"""Clients per vectorized call (perf-anchors A2: vmap gains saturate near 100 clients for the MLPs)."""


def check_vectorize(vectorize: str, chunk_size: int) -> None:
    """Validate the batching settings; ``ValueError`` names the field and its allowed range."""
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {list(VECTORIZE)}, got {vectorize!r}")
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"chunk_size (clients per vectorized call) must be an integer >= 1, got {chunk_size!r}")


def stack(params: Sequence[Params]) -> Params:
    """Stack parameter dicts on a new leading (client) axis."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def stack_batches(per_client: Sequence[Any]) -> Any:
    """The clients' batches (tensors in equally shaped nested tuples) stacked leaf by leaf on a new
    leading axis, or ``None`` if the clients' tensors differ in shape (ragged batches)."""
    first = per_client[0]
    if isinstance(first, Tensor):
        if len({tuple(t.shape) for t in per_client}) != 1:
            return None
        return torch.stack(list(per_client))
    parts = [stack_batches([c[j] for c in per_client]) for j in range(len(first))]
    return None if any(p is None for p in parts) else tuple(parts)


def weighted_mean(stacked: Params, weights: Sequence[float] | Tensor) -> Params:
    """``sum_i weights_i * stacked_i / sum_i weights_i`` per key (over the leading client axis).

    Summed in the parameters' dtype with torch's cascade summation (relative error ~1e-7 for
    float32, independent of the number of clients to first order); the strategy then averages the
    nodes' means in float64.
    """
    wt = torch.as_tensor(weights, dtype=torch.float64)
    wt = (wt / wt.sum()).to(torch.float32)
    out = {}
    for k, v in stacked.items():
        shape = (-1,) + (1,) * (v.dim() - 1)
        out[k] = (v * wt.to(device=v.device, dtype=v.dtype).view(shape)).sum(0)
    return out


def nonfinite_rows(stacked: Params) -> list[int]:
    """Indices of the clients (rows) with a NaN or infinite value in any parameter.

    One summing pass per key: a row's sum is non-finite iff the row holds a NaN or an infinity
    (or sums past the dtype's range, which only a diverged model does).
    """
    bad = None
    for v in stacked.values():
        rows = ~torch.isfinite(v.reshape(v.shape[0], -1).sum(1))
        bad = rows if bad is None else bad | rows
    return [] if bad is None else torch.nonzero(bad).flatten().tolist()
