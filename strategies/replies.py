"""A round's replies: what was sent (:class:`SentRound`), screening before aggregation (the checks are
:mod:`fedmeta.strategies.screening`), error replies counted by distinct error
(:mod:`fedmeta.strategies.failures`), missing nodes, and per-client rows. :class:`ReplyScreening` is the
collaborator a strategy holds as ``screening``."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from fedmeta import config as C
from fedmeta.strategies.failures import ClientFailures
from fedmeta.strategies.screening import norm_outliers, reply_view, screen_evaluate_reply, screen_reply, update_norm

logger = logging.getLogger("fedmeta")

EVAL_KEYS = (C.ACC_BEFORE, C.ACC_AFTER, C.LOSS_BEFORE, C.LOSS_AFTER)
"""The personalized-evaluation metrics of a reply."""
FLOWER_EVAL_KEYS = ("eval_loss", "eval_acc", "loss", "accuracy")
"""The evaluation metrics of Flower's quickstart clients, summarised when a reply has them."""
SUMMARY_KEYS = EVAL_KEYS + FLOWER_EVAL_KEYS


@dataclass(frozen=True)
class SentRound:
    """What the strategy sent in one round, against which the replies are screened."""

    reference: ArrayRecord | None
    """The global model sent (train rounds); ``None`` for evaluation."""
    clients: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Node id -> the clients it was asked to run (a single-client node: its partition id)."""
    with_ids: bool = False
    """Whether the messages named the clients under ``client-ids`` (multi-client nodes)."""


def client_rows(record: MetricRecord) -> list[dict[str, Any]]:
    """One reply's metrics per client: a multi-client node's ``per-client-`` lists, or the record itself."""
    if C.CLIENT_IDS not in record:
        return [dict(record)]
    ids = list(record[C.CLIENT_IDS])
    keys = [k for k in record if k.startswith(C.PER_CLIENT)]
    bad = [k for k in keys if not isinstance(record[k], list) or len(record[k]) != len(ids)]
    if bad:
        raise ValueError(f"reply lists {bad} do not have one value per client of {C.CLIENT_IDS} ({len(ids)})")
    return [{C.PARTITION_ID: c, **{k[len(C.PER_CLIENT):]: record[k][i] for k in keys}} for i, c in enumerate(ids)]


@dataclass
class Screened:
    """A round's replies after :meth:`ReplyScreening.screen`."""

    sent: SentRound
    accepted: list[Message]
    """The replies that passed screening, in arrival order."""
    rejected: list[dict[str, Any]]
    """One rejection record per reply left out (see :attr:`ReplyScreening.rejections`)."""
    errors: list[Message]
    missing: int
    """Nodes sent a message that did not reply before the round's timeout."""

    def rows(self, message: Message) -> list[dict[str, Any]]:
        """:func:`client_rows` of an accepted reply; a single-client reply without ``partition-id``
        is attributed to the partition its node was sent."""
        record = reply_view(message.content)
        rows = client_rows(record)
        if C.CLIENT_IDS not in record and C.PARTITION_ID not in record:
            rows[0][C.PARTITION_ID] = self.sent.clients[message.metadata.src_node_id][0]
        return rows


class ReplyScreening:
    """Screening and bookkeeping of a round's replies. Interface: :meth:`expect` (what a round sent),
    :meth:`screen` (that round's replies). Owns :attr:`rejections` and what each round sent; counts
    error replies into ``failures``. ``served(node)`` (the node map's) sharpens rejection reasons;
    ``examples_key`` (``num-examples``) is required in train replies when ``weighting`` is ``"examples"``;
    ``max_update_norm_ratio`` (or ``None``) rejects train replies by update norm
    (:func:`~fedmeta.strategies.screening.norm_outliers`)."""

    def __init__(self, *, failures: ClientFailures, served: Callable[[int], tuple[int, ...]], weighting: str,
                 examples_key: str, max_update_norm_ratio: float | None) -> None:
        self.failures, self.served, self.examples_key = failures, served, examples_key
        self.weighted_by = examples_key if weighting == "examples" else None
        self.max_update_norm_ratio = max_update_norm_ratio
        self.rejections: dict[int, list[dict[str, Any]]] = {}
        """Per round with rejections: one ``{"stage": "train" | "evaluate", "node": id, "clients":
        [the clients sent to it], "reason": str}`` per reply left out by screening."""
        self._sent: dict[tuple[str, int], SentRound] = {}

    def expect(self, stage: str, server_round: int, sent: SentRound) -> None:
        """Record what round ``server_round`` sent for ``stage`` (``train`` / ``evaluate``), kept until a
        later round's training is configured."""
        if stage == "train":
            self._sent = {k: v for k, v in self._sent.items() if k[1] >= server_round}
        self._sent[stage, server_round] = sent

    def screen(self, stage: str, server_round: int, replies: Iterable[Message]) -> Screened:
        """Screen the replies to what :meth:`expect` recorded: error replies counted (a new error is logged
        once, every one in full to ``fedmeta.errors``), rejections and missing nodes logged (warnings)."""
        replies = list(replies)
        sent = self._sent.get((stage, server_round), SentRound(None))
        errors = [m for m in replies if m.has_error()]
        self.failures.record_replies(server_round, stage, errors, lambda node: sent.clients.get(node, ()))
        accepted, rejected = self._screen(server_round, stage, [m for m in replies if not m.has_error()], sent)
        return Screened(sent, accepted, rejected, errors, self._missing(server_round, stage, replies, sent))

    def _screen(
        self, server_round: int, stage: str, candidates: list[Message], sent: SentRound
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split the non-error replies of a round into accepted ones and rejection records (logged)."""
        reasons: dict[int, str] = {}
        seen: set[int] = set()
        for i, m in enumerate(candidates):
            node = m.metadata.src_node_id
            if node not in sent.clients:
                reasons[i] = f"the node was not sent a {stage} message in round {server_round}"
            elif node in seen:
                reasons[i] = f"a second {stage} reply from the node in round {server_round}"
            else:
                served = self.served(node)
                if sent.reference is not None:  # a train round
                    reason = screen_reply(m.content, sent.reference, sent=sent.clients[node], expect_ids=sent.with_ids,
                                          served=served, weighted_by_key=self.weighted_by, examples_key=self.examples_key)
                else:
                    reason = screen_evaluate_reply(m.content, sent=sent.clients[node], expect_ids=sent.with_ids,
                                                   served=served, numeric_keys=SUMMARY_KEYS)
                if reason:
                    reasons[i] = reason
            seen.add(node)
        if stage == "train" and self.max_update_norm_ratio is not None and sent.reference is not None:
            passed = [i for i in range(len(candidates)) if i not in reasons]
            norms = [update_norm(next(iter(candidates[i].content.array_records.values())), sent.reference) for i in passed]
            median = statistics.median(norms) if norms else 0.0
            for j in norm_outliers(norms, self.max_update_norm_ratio):
                reasons[passed[j]] = (f"update norm {norms[j]:.4g} > max_update_norm_ratio={self.max_update_norm_ratio:g} "
                                      f"x the round's median {median:.4g}")
        rejected = []
        for i, reason in sorted(reasons.items()):
            node = candidates[i].metadata.src_node_id
            clients = list(sent.clients.get(node, ()))
            logger.warning("round %d: rejected the %s reply of node %d (clients %s): %s", server_round, stage, node, clients, reason)
            rejected.append({"stage": stage, "node": node, "clients": clients, "reason": reason})
        if rejected:
            self.rejections.setdefault(server_round, []).extend(rejected)
        return [m for i, m in enumerate(candidates) if i not in reasons], rejected

    @staticmethod
    def _missing(server_round: int, stage: str, replies: list[Message], sent: SentRound) -> int:
        """Nodes sent a message this round that did not reply before the round's timeout (logged)."""
        replied = {m.metadata.src_node_id for m in replies}
        missing = sorted(set(sent.clients) - replied)
        if missing:
            logger.warning("round %d: %d nodes did not reply to %s before the timeout (clients %s)", server_round, len(missing),
                           stage, sorted(c for n in missing for c in sent.clients[n])[:20])
        return len(missing)
