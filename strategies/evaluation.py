"""Personalized evaluation on the server: which rounds evaluate, the evaluate messages, and the summary
over clients (mean, std, 10th percentile; held-out new clients apart). A mixin of
:class:`~fedmeta.strategies.base.MetaStrategy`, whose state it uses."""

from __future__ import annotations

import logging
from logging import INFO
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmeta import config as C
from fedmeta.strategies.aggregation import distribution
from fedmeta.strategies.nodes import messages_to
from fedmeta.strategies.replies import SUMMARY_KEYS, SentRound
from fedmeta.strategies.screening import NUM_MISSING, NUM_REJECTED

logger = logging.getLogger("fedmeta")


def summarize(per_client: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean, std and 10th percentile across clients of every evaluation metric: fedmeta's personalized
    ones (``accuracy-after`` ...) and Flower's usual names (``eval_loss``, ``eval_acc``, ``accuracy``)."""
    rows = list(per_client)
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in rows if key in r]
        if values:
            d = distribution(values)
            out.update({key: d["mean"], f"{key}-std": d["std"], f"{key}-p10": d["p10"]})
    return out


class PersonalizedEvaluation:
    """Mixin: the evaluation half of a round."""

    def evaluates_in(self, server_round: int) -> bool:
        if not self.evaluate_every:
            return False
        return server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.evaluates_in(server_round):
            return []
        nodes = self.partition_nodes(grid)
        cfg = ConfigRecord({**dict(config), **self.eval_config.to_wire(), C.SEED: self.seed, C.SERVER_ROUND: server_round})
        self._sent_evaluate[server_round] = SentRound(None, self._by_node(nodes, sorted(nodes)), self.multi_client)
        if self.multi_client:
            return self._group_messages(arrays, cfg, nodes, sorted(nodes), MessageType.EVALUATE)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
        return messages_to([nodes[p] for p in sorted(nodes)], record, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        sent = self._sent_evaluate.pop(server_round, SentRound(None))
        errors = [m for m in replies if m.has_error()]
        self._record_errors(server_round, "evaluate", errors, sent)
        valid, rejected = self._screen(server_round, "evaluate", [m for m in replies if not m.has_error()], sent)
        log(INFO, "aggregate_evaluate: Received %s results and %s failures", len(valid), len(errors))
        self.record_handler_seconds("evaluate", server_round, valid)
        missing = self._missing(server_round, "evaluate", replies, sent)
        if not valid:
            if rejected:
                logger.warning("round %d: no valid evaluate replies (%d failures, %d rejected)", server_round, len(errors), len(rejected))
            return None
        per_client = {}
        for m in valid:
            for rec in self._reply_rows(m, sent):
                per_client[int(rec[C.PARTITION_ID])] = {k: float(rec[k]) for k in SUMMARY_KEYS if k in rec}
        per_client = dict(sorted(per_client.items()))  # client order, not arrival order: the same float sums every run
        self.client_eval[server_round] = per_client
        new = set(self.new_clients)
        out: dict[str, float | int] = {"num-clients": sum(p not in new for p in per_client), "num-failures": len(errors),
                                       NUM_MISSING: missing, NUM_REJECTED: len(rejected)}
        out.update(summarize(v for p, v in per_client.items() if p not in new))
        if new:
            out["new-num-clients"] = sum(p in new for p in per_client)
            out.update({f"new-{k}": v for k, v in summarize(v for p, v in per_client.items() if p in new).items()})
        metrics = MetricRecord(out)
        self._log_evaluation(server_round, metrics)
        return metrics

    def _log_evaluation(self, server_round: int, metrics: MetricRecord) -> None:
        """One line with the round's scores: whichever of fedmeta's or Flower's names the clients sent."""
        if C.ACC_AFTER in metrics and C.ACC_BEFORE in metrics:
            logger.info(
                "round %s/%s: personalized accuracy %.4f +- %.4f (before adaptation %.4f), %d clients",
                server_round, self.num_rounds, metrics[C.ACC_AFTER], metrics[f"{C.ACC_AFTER}-std"], metrics[C.ACC_BEFORE],
                metrics["num-clients"],
            )
            if f"new-{C.ACC_AFTER}" in metrics and f"new-{C.ACC_BEFORE}" in metrics:
                logger.info("    new clients: personalized accuracy %.4f (before adaptation %.4f), %d clients",
                            metrics[f"new-{C.ACC_AFTER}"], metrics[f"new-{C.ACC_BEFORE}"], metrics["new-num-clients"])
        elif C.LOSS_AFTER in metrics and C.LOSS_BEFORE in metrics:
            logger.info("round %s/%s: personalized loss %.4f (before %.4f)", server_round, self.num_rounds,
                        metrics[C.LOSS_AFTER], metrics[C.LOSS_BEFORE])
        else:
            scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)
            logger.info("round %s/%s: evaluation %s, %d clients", server_round, self.num_rounds, scores or "(no scores)",
                        metrics["num-clients"])
