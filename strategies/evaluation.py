"""Personalized evaluation on the server: which rounds evaluate, the evaluate config, and the summary
over clients (mean, std, 10th percentile; held-out new clients apart). :class:`PersonalizedEvaluation`
is the collaborator a strategy holds as ``evaluation``."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from flwr.app import ConfigRecord, MetricRecord

from fedmeta import config as C
from fedmeta.config import EvalConfig
from fedmeta.strategies.aggregation import distribution
from fedmeta.strategies.replies import SUMMARY_KEYS

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
    """Personalized evaluation of every client every ``evaluate_every`` rounds (0: never) and after the
    last round, with the protocol ``eval_config`` and ``seed``; clients in ``new_clients`` (held out of
    training) are summarised apart, under ``new-`` keys. Interface: :meth:`evaluates_in`, :meth:`config`
    (an evaluate message's config), :meth:`aggregate` (a round's per-client rows to its metrics, logged
    in one line). Owns :attr:`client_eval`."""

    def __init__(self, *, eval_config: EvalConfig, seed: int, evaluate_every: int, new_clients: Iterable[int]) -> None:
        self.eval_config, self.seed, self.evaluate_every, self.new_clients = eval_config, seed, evaluate_every, set(new_clients)
        self.client_eval: dict[int, dict[int, dict[str, float]]] = {}
        """Per round, per partition: the personalized-evaluation metrics each client reported."""

    def evaluates_in(self, server_round: int, num_rounds: int | None) -> bool:
        if not self.evaluate_every:
            return False
        return server_round % self.evaluate_every == 0 or server_round == num_rounds

    def config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The user's ``config`` plus the evaluation protocol, the seed and the round."""
        return ConfigRecord({**dict(config), **self.eval_config.to_wire(), C.SEED: self.seed, C.SERVER_ROUND: server_round})

    def aggregate(self, server_round: int, num_rounds: int | None, rows: Iterable[dict[str, Any]],
                  counts: dict[str, int]) -> MetricRecord:
        """The round's metrics from its per-client ``rows`` (each with ``partition-id``): ``num-clients``,
        the ``counts`` (failures, missing, rejected), and :func:`summarize` of the training clients and
        of the new ones (``new-`` keys)."""
        per_client = {int(r[C.PARTITION_ID]): {k: float(r[k]) for k in SUMMARY_KEYS if k in r} for r in rows}
        per_client = dict(sorted(per_client.items()))  # client order, not arrival order: the same float sums every run
        self.client_eval[server_round] = per_client
        new = self.new_clients
        out: dict[str, float | int] = {"num-clients": sum(p not in new for p in per_client), **counts}
        out.update(summarize(v for p, v in per_client.items() if p not in new))
        if new:
            out["new-num-clients"] = sum(p in new for p in per_client)
            out.update({f"new-{k}": v for k, v in summarize(v for p, v in per_client.items() if p in new).items()})
        metrics = MetricRecord(out)
        self._log(server_round, num_rounds, metrics)
        return metrics

    @staticmethod
    def _log(server_round: int, num_rounds: int | None, metrics: MetricRecord) -> None:
        """One line with the round's scores: whichever of fedmeta's or Flower's names the clients sent."""
        if C.ACC_AFTER in metrics and C.ACC_BEFORE in metrics:
            logger.info(
                "round %s/%s: personalized accuracy %.4f +- %.4f (before adaptation %.4f), %d clients",
                server_round, num_rounds, metrics[C.ACC_AFTER], metrics[f"{C.ACC_AFTER}-std"], metrics[C.ACC_BEFORE],
                metrics["num-clients"],
            )
            if f"new-{C.ACC_AFTER}" in metrics and f"new-{C.ACC_BEFORE}" in metrics:
                logger.info("    new clients: personalized accuracy %.4f (before adaptation %.4f), %d clients",
                            metrics[f"new-{C.ACC_AFTER}"], metrics[f"new-{C.ACC_BEFORE}"], metrics["new-num-clients"])
        elif C.LOSS_AFTER in metrics and C.LOSS_BEFORE in metrics:
            logger.info("round %s/%s: personalized loss %.4f (before %.4f)", server_round, num_rounds,
                        metrics[C.LOSS_AFTER], metrics[C.LOSS_BEFORE])
        else:
            scores = ", ".join(f"{k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)
            logger.info("round %s/%s: evaluation %s, %d clients", server_round, num_rounds, scores or "(no scores)",
                        metrics["num-clients"])
