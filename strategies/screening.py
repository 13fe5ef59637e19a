"""Screening of client replies before aggregation, as pure functions testable without Flower grids.

A reply that fails a check is left out of the round's average instead of reaching Flower's
reply validation, which raises ``InconsistentMessageReplies`` and ends the whole run when a single
reply is malformed. Every check returns the reason a reply is rejected (a short sentence for the
log and the results file) or ``None`` when the reply passes; none of them raises on bad input.

What a multi-client node sends (``client-ids`` and ``per-client-`` lists aligned with them) is
described in :mod:`fedmeta.config`; ``sent`` below is always the clients the strategy asked that
node to run this round.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Collection, Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from fedmeta import config as C

NUM_REJECTED = "num-rejected"
"""Round metric: replies left out by screening (error replies are counted in ``num-failures``)."""
NUM_REJECTED_CLIENTS = "num-rejected-clients"
"""Round metric: clients the strategy sent to the nodes whose replies were rejected."""
NUM_ACCEPTED = "num-accepted"
NUM_MISSING = "num-missing"  # nodes sent a message that did not reply before the round timeout
"""Round metric: replies that passed screening."""
KEPT_GLOBAL_MODEL = "kept-global-model"
"""Round metric: 1 when too few replies passed screening and the previous global model is kept, else 0."""


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return _is_number(v) or (isinstance(v, list) and all(_is_number(x) for x in v))


def reply_view(content: RecordDict) -> dict[str, Any]:
    """What the strategy reads of a reply: its ``MetricRecord`` (quantities) with the identifiers of its
    ``client-info`` ``ConfigRecord`` (``partition-id``, ``client-ids``, ``memory-round``,
    ``memory-digest``, ``per-client-`` lists) over it. A client that sends its identifiers in the
    ``MetricRecord`` instead (the README's minimal contract, fedmeta before 0.3) is read the same way.
    Call after :func:`screen_structure`."""
    view = dict(next(iter(content.metric_records.values()))) if content.metric_records else {}
    info = content.config_records.get(C.CLIENT_INFO)
    if info is not None:
        view.update({k: v for k, v in info.items() if _numbers(v)})
    return view


def screen_structure(content: RecordDict, *, with_arrays: bool) -> str | None:
    """Exactly one ``MetricRecord`` and, when ``with_arrays`` (train replies), exactly one ``ArrayRecord``;
    a ``client-info`` ``ConfigRecord``, if any, holds only numbers and lists of numbers.

    These are the shape requirements of Flower's ``validate_message_reply_consistency``, checked
    per reply so that a bad reply is dropped instead of failing the round.
    """
    if with_arrays and len(content.array_records) != 1:
        return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    info = content.config_records.get(C.CLIENT_INFO)
    bad = sorted(k for k, v in (info or {}).items() if not _numbers(v))
    if bad:
        return f"{C.CLIENT_INFO} values {bad} must be numbers or lists of numbers"
    return None


def screen_clients(
    record: MetricRecord, sent: Sequence[int], *, expect_ids: bool, served: Collection[int] = ()
) -> str | None:
    """The clients a reply speaks for must be clients the strategy sent to that node this round.

    With ``client-ids`` in the reply (multi-client nodes): a non-empty list of distinct integers,
    each one of ``sent`` (a subset is fine: a node leaves out clients that diverged), and every
    ``per-client-`` value a list with one entry per id. ``served`` (the node's clients, optional)
    only sharpens the reason: a client the node does not serve at all, or one it serves but was not
    sampled for this round. Without ``client-ids``: rejected when ``expect_ids`` (the node was sent
    ``client-ids`` and must name the clients its average is over); otherwise a single-client reply,
    whose ``partition-id``, when present, must be the one client in ``sent``.
    """
    if C.CLIENT_IDS not in record:
        if expect_ids:
            return f"no {C.CLIENT_IDS} in the reply of a node that was sent clients {list(sent)}"
        if C.PARTITION_ID in record:
            pid = record[C.PARTITION_ID]
            if not _is_number(pid) or len(sent) != 1 or pid != sent[0]:
                return f"{C.PARTITION_ID}={pid!r} but the node was sent partition {list(sent)}"
        return None
    ids = record[C.CLIENT_IDS]
    if not isinstance(ids, list) or not ids or not all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
        return f"{C.CLIENT_IDS} must be a non-empty list of integers, got {ids!r}"
    if len(set(ids)) != len(ids):
        return f"{C.CLIENT_IDS} {ids} name a client twice"
    extra = sorted(set(ids) - set(sent))
    if extra:
        foreign = [c for c in extra if c not in served] if served else []
        if foreign:
            return f"{C.CLIENT_IDS} claim clients {foreign} that the node does not serve"
        return f"{C.CLIENT_IDS} claim clients {extra} that were not sampled for the node this round (sent {list(sent)})"
    bad = sorted(k for k in record if k.startswith(C.PER_CLIENT) and (not isinstance(record[k], list) or len(record[k]) != len(ids)))
    if bad:
        return f"metric lists {bad} do not have one value per client of {C.CLIENT_IDS} ({len(ids)})"
    return None


def screen_weights(record: MetricRecord, weighted_by_key: str, *, required: bool = True) -> str | None:
    """Every client's ``weighted_by_key`` (``num-examples``) is a finite number >= 0, summing to > 0.

    A single-client reply carries it as a scalar; a multi-client reply as the ``per-client-`` list
    (its alignment with ``client-ids`` is :func:`screen_clients`' check). Without ``required``
    (uniform weighting, where the average does not use it) a reply may leave it out, but a value it
    sends is checked all the same: a -5 or a NaN says the reply is not to be trusted.
    """
    key = C.PER_CLIENT + weighted_by_key if C.CLIENT_IDS in record else weighted_by_key
    if key not in record:
        return f"no {key} in the reply, needed to weight it" if required else None
    values = record[key] if isinstance(record[key], list) else [record[key]]
    if not all(_is_number(v) and math.isfinite(v) and v >= 0 for v in values) or not sum(values) > 0:
        return f"{key} must be finite numbers >= 0 with a positive sum, got {record[key]!r}"
    return None


def screen_arrays(arrays: ArrayRecord, reference: ArrayRecord) -> str | None:
    """The reply's arrays have exactly the names, shapes and dtypes of ``reference`` (the global
    model sent this round), can be read, and hold only finite values (no NaN, no +-Inf).

    Shapes and dtypes are those of the deserialized arrays (what averaging uses), not the
    ``Array`` header's claims.
    """
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"array names differ from the global model's: missing {missing}, unexpected {extra}"
    for key, ref in reference.items():
        try:
            value = arrays[key].numpy()
        except (TypeError, ValueError, OSError, EOFError) as exc:
            return f"array {key!r} cannot be read: {exc}"
        if str(value.dtype) != ref.dtype:
            return f"array {key!r} has dtype {value.dtype}, the global model's is {ref.dtype}"
        if tuple(value.shape) != tuple(ref.shape):
            return f"array {key!r} has shape {tuple(value.shape)}, the global model's is {tuple(ref.shape)}"
        if np.issubdtype(value.dtype, np.inexact):
            n_nan, n_inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
            if n_nan or n_inf:
                return f"array {key!r} has {n_nan} NaN and {n_inf} Inf values"
    return None


def screen_reply(
    content: RecordDict,
    reference: ArrayRecord,
    *,
    sent: Sequence[int],
    expect_ids: bool,
    served: Collection[int] = (),
    weighted_by_key: str | None = None,
    examples_key: str = C.NUM_EXAMPLES,
) -> str | None:
    """Why a train reply cannot be averaged, or ``None``: :func:`screen_structure`, then
    :func:`screen_clients`, :func:`screen_weights` (required when ``weighted_by_key`` is given, i.e.
    weighting by examples; else ``examples_key`` is checked when the reply has it) and
    :func:`screen_arrays` against ``reference``; the first failure wins.

    The update-norm check needs the other replies of the round: see :func:`norm_outliers`.
    """
    reason = screen_structure(content, with_arrays=True)
    if reason:
        return reason
    record = reply_view(content)
    reason = screen_clients(record, sent, expect_ids=expect_ids, served=served)
    if reason is None:
        reason = screen_weights(record, weighted_by_key or examples_key, required=weighted_by_key is not None)
    if reason is None:
        reason = screen_arrays(next(iter(content.array_records.values())), reference)
    return reason


def screen_evaluate_reply(
    content: RecordDict, *, sent: Sequence[int], expect_ids: bool, served: Collection[int] = (), numeric_keys: Sequence[str] = ()
) -> str | None:
    """Why an evaluate reply cannot be summarized, or ``None``: :func:`screen_structure` (no arrays
    needed), :func:`screen_clients`, ``num-examples`` (when present) as in :func:`screen_weights`, and
    at least one of ``numeric_keys`` present, each one present a finite number per client (a reply
    with no score, or a NaN score, would silently change the summary)."""
    reason = screen_structure(content, with_arrays=False)
    if reason:
        return reason
    record = reply_view(content)
    reason = screen_clients(record, sent, expect_ids=expect_ids, served=served) or screen_weights(record, C.NUM_EXAMPLES, required=False)
    if reason:
        return reason
    found = False
    for key in numeric_keys:
        wire = C.PER_CLIENT + key if C.CLIENT_IDS in record else key
        if wire in record:
            found = True
            values = record[wire] if C.CLIENT_IDS in record else [record[wire]]  # lists aligned by screen_clients
            if not all(_is_number(v) and math.isfinite(v) for v in values):
                return f"{wire} must be finite numbers, got {record[wire]!r}"
    if numeric_keys and not found:
        return f"no evaluation metric in the reply (expected one of {list(numeric_keys)}; it has {sorted(record)})"
    return None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """``||w_reply - w_global||_2`` over all arrays, accumulated in float64.

    Assumes ``arrays`` passed :func:`screen_arrays` against ``reference``.
    """
    total = 0.0
    for key, ref in reference.items():
        diff = arrays[key].numpy().astype(np.float64) - ref.numpy().astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def norm_outliers(norms: Sequence[float], ratio: float) -> list[int]:
    """Indices of ``norms`` greater than ``ratio`` times their median.

    With ``ratio > 1`` at least half of the replies (those at or below the median) are never
    outliers. A median of 0 (most replies did not move the model) makes every non-zero norm one.
    """
    if not norms:
        return []
    bound = ratio * float(np.median(np.asarray(norms, dtype=np.float64)))
    return [i for i, n in enumerate(norms) if n > bound]
