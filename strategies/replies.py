"""A round's replies: what was sent (:class:`SentRound`), screening before aggregation (the checks are
:mod:`fedmeta.strategies.screening`), error replies counted by distinct error
(:mod:`fedmeta.strategies.failures`), missing nodes, and per-client rows. A mixin of
:class:`~fedmeta.strategies.base.MetaStrategy`, whose state it uses."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedmeta import config as C
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


class ReplyScreening:
    """Mixin: screening and bookkeeping of a round's replies."""

    @staticmethod
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

    def _reply_rows(self, message: Message, sent: SentRound) -> list[dict[str, Any]]:
        """:meth:`client_rows` of a screened reply; a single-client reply without ``partition-id``
        is attributed to the partition its node was sent."""
        record = reply_view(message.content)
        rows = self.client_rows(record)
        if C.CLIENT_IDS not in record and C.PARTITION_ID not in record:
            rows[0][C.PARTITION_ID] = sent.clients[message.metadata.src_node_id][0]
        return rows

    def _screen(
        self, server_round: int, stage: str, candidates: list[Message], sent: SentRound
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Split the non-error replies of a round into accepted ones and rejection records (logged)."""
        reasons: dict[int, str] = {}
        seen: set[int] = set()
        weighted_by = self.weighted_by_key if self.weighting == "examples" else None
        for i, m in enumerate(candidates):
            node = m.metadata.src_node_id
            if node not in sent.clients:
                reasons[i] = f"the node was not sent a {stage} message in round {server_round}"
            elif node in seen:
                reasons[i] = f"a second {stage} reply from the node in round {server_round}"
            else:
                served = self._node_clients.get(node, ())
                if sent.reference is not None:  # a train round
                    reason = screen_reply(m.content, sent.reference, sent=sent.clients[node], expect_ids=sent.with_ids,
                                          served=served, weighted_by_key=weighted_by,
                                          examples_key=self.weighted_by_key)
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

    def _record_errors(self, server_round: int, stage: str, errors: list[Message], sent: SentRound) -> None:
        """Count the round's error replies by distinct error: a new error is logged once (INFO, its key),
        every error reply in full to ``fedmeta.errors`` (the command line tools' run log)."""
        self.failures.record_replies(server_round, stage, errors, lambda node: sent.clients.get(node, ()))

    @staticmethod
    def _missing(server_round: int, stage: str, replies: list[Message], sent: SentRound) -> int:
        """Nodes sent a message this round that did not reply before the round's timeout (logged)."""
        replied = {m.metadata.src_node_id for m in replies}
        missing = sorted(set(sent.clients) - replied)
        if missing:
            logger.warning("round %d: %d nodes did not reply to %s before the timeout (clients %s)", server_round, len(missing),
                           stage, sorted(c for n in missing for c in sent.clients[n])[:20])
        return len(missing)
