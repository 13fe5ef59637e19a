"""What fedmeta's strategies (Per-FedAvg, LocalMOML, the FedAvg baseline) share on the server, one job a
module: node discovery and messages (:mod:`~fedmeta.strategies.nodes`), the checkpointed round loop
(:mod:`~fedmeta.strategies.rounds`), screening of replies (:mod:`~fedmeta.strategies.replies`,
:mod:`~fedmeta.strategies.screening`), personalized evaluation (:mod:`~fedmeta.strategies.evaluation`).
This module holds :class:`MetaStrategy` itself: its arguments, client sampling, the train config and
the papers' uniform average of the train replies."""

from __future__ import annotations

import logging
import math
import time
from logging import INFO
from typing import Any, ClassVar, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedmeta import config as C
from fedmeta import validation as V
from fedmeta.config import HP, EvalConfig, field_names
from fedmeta.strategies.aggregation import average_arrays, average_metrics, sample_grouped, sample_partitions
from fedmeta.strategies.evaluation import PersonalizedEvaluation, summarize  # noqa: F401  (summarize: re-exported)
from fedmeta.strategies.failures import ClientFailures
from fedmeta.strategies.nodes import PartitionNodes, messages_to
from fedmeta.strategies.replies import EVAL_KEYS, ReplyScreening, SentRound  # noqa: F401  (EVAL_KEYS: re-exported)
from fedmeta.strategies.rounds import CheckpointedRounds
from fedmeta.strategies.screening import KEPT_GLOBAL_MODEL, NUM_ACCEPTED, NUM_MISSING, NUM_REJECTED, NUM_REJECTED_CLIENTS
from fedmeta.strategies.validation import check_strategy_kwargs

logger = logging.getLogger("fedmeta")

WEIGHTINGS = ("uniform", "examples")



class MetaStrategy(CheckpointedRounds, PartitionNodes, ReplyScreening, PersonalizedEvaluation, FlowerFedAvg):
    """Base of the fedmeta strategies (see :class:`~fedmeta.strategies.PerFedAvg`).

    Parameters
    ----------
    num_clients
        n, the number of clients (client ids ``0..num_clients-1``). The strategy waits until every
        client is served by a connected node before the first round (at most ``node_wait_timeout`` s).
    num_nodes
        The number of nodes (SuperNodes) serving them. ``None``: one node per client (the node's
        ``partition-id`` is its client id). Fewer nodes than clients: each node hosts a contiguous
        block of clients (node ``partition-id`` ``i`` of ``num-partitions`` ``M`` hosts block ``i``)
        and trains the ones sampled in a round together (:mod:`fedmeta.batched`); sampling stays over
        clients and the average stays the papers' average over clients.
    clients_per_round
        B: ``None`` for cross-silo (every training client every round) or ``1 <= B <= n`` for
        cross-device (exactly B clients per round, sampled by partition from a generator seeded
        by ``seed``), where n is the number of training clients.
    sampling_groups
        With ``G > 1``: stratified sampling, ``clients_per_round`` clients from each of G
        contiguous groups of training clients (:func:`sample_grouped`; localmoml Section 6.2's
        4 GPUs sampling B' tasks each), so ``G * clients_per_round`` clients train per round.
    new_clients
        Partition ids held out of training: they never train and are scored with the same
        personalized evaluation ("new-client adaptation"), reported under ``new-`` keys.
    seed
        Seeds client sampling and is sent to the clients, which seed their batch sampling from it.
    weighting
        ``"uniform"`` (the papers' average over sampled clients) or ``"examples"`` (weighted by
        ``num-examples``, Flower's default).
    eval_steps, eval_shots
        Personalized evaluation protocol: fine-tuning steps k and support-set size (0 = the client's
        whole train split). Defaults: one step on the train split (per-fedavg.txt Section 5);
        ``eval_steps=10, eval_shots=5`` is the LocalMOML paper's protocol (Section 6.2).
    eval_lr
        Step size of the evaluation's fine-tuning steps; ``None`` (default): the algorithm's ``inner_lr``
        (alpha). The localmoml authors' federated code fine-tunes at 0.001 with alpha = 0.01
        (GitHub ``bokun-wang/moml``, ``federated/train.py``: ``ft_lr``).
    lr_decay_at, lr_decay
        A step-size schedule: the algorithm's step sizes (its config's ``STEP_SIZES``: alpha and the
        outer step) are multiplied by ``lr_decay`` (default 0.1) from round ``floor(m * num_rounds) + 1``
        on, for each fraction m in ``lr_decay_at`` (default ``()``: constant). ``(0.5, 0.75)`` is the
        localmoml authors' schedule (``federated/train.py``: ``update_lr`` and ``meta_lr`` divided by 10
        at 50 % and 75 % of ``total_iters``). The schedule follows ``num_rounds``: a resumed run that
        extends it moves the decay rounds.
    evaluate_every
        Run personalized evaluation on all clients every this many rounds and after the last
        round (default 50); 0 disables it.
    node_wait_timeout
        Seconds to wait for the n nodes to connect before failing (Flower's own sampling waits forever).
    max_update_norm_ratio
        ``None`` (default): off. A number > 1: a train reply whose update norm
        ``||w_reply - w_global||`` exceeds this many times the median update norm of the round's
        replies that passed the other checks is rejected (:func:`~fedmeta.strategies.screening.norm_outliers`).
        A multi-client node's reply is its clients' average, so its norm is that of the average.
    min_valid_replies
        m >= 1 (default 1), at most the number of train messages a round sends: when fewer than m
        train replies pass screening, the round keeps the previous global model (``aggregate_train``
        returns no arrays, and the metrics say ``kept-global-model`` = 1).
    max_failed_rounds
        Stop the run (:meth:`start` raises :class:`~fedmeta.strategies.failures.TrainingStopped`)
        after this many consecutive rounds without a single valid train reply (every reply an error,
        rejected, or missing); 0 never stops. Default 3: a run in which no client can train (data
        missing on the nodes, a bug in the ClientApp) ends after 3 rounds instead of running all of them.
    **kwargs
        Algorithm hyper-parameters (fields of :attr:`hparams_cls`), then Flower ``FedAvg`` arguments.

    Notes
    -----
    Screening. Before averaging, every train reply is checked (:mod:`fedmeta.strategies.screening`): exactly
    one ArrayRecord and one MetricRecord; the clients it names are ones sent to its node this round
    (a node that got no message, or a second reply from a node, is rejected too); ``per-client-``
    lists aligned with ``client-ids``; ``num-examples`` finite and >= 0 (required when weighting by
    examples, checked when present under uniform weighting); arrays with the global model's names, shapes and dtypes and no NaN/Inf; optionally
    an update norm within ``max_update_norm_ratio`` x the round's median. A rejected reply is left
    out of the average and logged (logger ``fedmeta``, warning, with node id and reason). The
    round's train metrics add ``num-accepted`` (replies averaged), ``num-rejected`` (replies
    rejected), ``num-rejected-clients`` (the clients sent to their nodes) and ``kept-global-model``
    next to ``num-clients`` (clients averaged), ``num-failures`` (error replies: an exception or
    out-of-memory in the ClientApp) and ``num-missing`` (nodes with no reply before the round's
    ``timeout``); each rejection is kept in :attr:`rejections`. A round without a valid reply still
    reports these counts, with ``kept-global-model`` = 1. Replies are averaged in client order, not
    arrival order, so the result does not depend on timing. Evaluate replies are screened the same
    way, without arrays, and the evaluation metrics add ``num-rejected`` and ``num-missing``.

    Checkpoints. :meth:`start` runs Flower's round loop and, given ``checkpoint_dir``, writes a
    checkpoint after every round and can resume from it (:mod:`fedmeta.strategies.checkpoint`).
    """

    hparams_cls: ClassVar[type]

    def __init__(
        self,
        *,
        num_clients: int,
        num_nodes: int | None = None,
        clients_per_round: int | None = None,
        sampling_groups: int = 1,
        new_clients: Iterable[int] = (),
        seed: int = HP.seed.default,
        weighting: str = "uniform",
        eval_steps: int = HP.eval_steps.default,
        eval_shots: int = HP.eval_shots.default,
        eval_lr: float | None = None,
        lr_decay_at: Sequence[float] = (),
        lr_decay: float = HP.lr_decay.default,
        evaluate_every: int = HP.evaluate_every.default,
        node_wait_timeout: float = 600.0,
        max_update_norm_ratio: float | None = None,
        min_valid_replies: int = 1,
        max_failed_rounds: int = 3,
        **kwargs: Any,
    ) -> None:
        check_strategy_kwargs(type(self), locals())
        V.check("num_clients", isinstance(num_clients, int) and num_clients >= 1, "an integer >= 1", num_clients)
        if num_nodes is None:
            num_nodes = num_clients
        ok = isinstance(num_nodes, int) and not isinstance(num_nodes, bool) and 1 <= num_nodes <= num_clients
        V.check("num_nodes", ok, f"None (one node per client) or an integer in [1, num_clients={num_clients}]", num_nodes)
        new = sorted(set(new_clients))
        ok = all(isinstance(p, int) and 0 <= p < num_clients for p in new) and len(new) < num_clients
        V.check("new_clients", ok, f"distinct partition ids in [0, {num_clients - 1}], leaving at least one training client", list(new_clients))
        n_train = num_clients - len(new)
        ok = isinstance(sampling_groups, int) and 1 <= sampling_groups <= n_train
        V.check("sampling_groups", ok, f"an integer in [1, {n_train}] (the training clients)", sampling_groups)
        if sampling_groups > 1:
            smallest = n_train // sampling_groups
            ok = isinstance(clients_per_round, int) and 1 <= clients_per_round <= smallest
            V.check("clients_per_round (B' per group)", ok, f"an integer in [1, {smallest}] with {sampling_groups} groups", clients_per_round)
        elif clients_per_round is not None:
            ok = isinstance(clients_per_round, int) and 1 <= clients_per_round <= n_train
            V.check("clients_per_round (B)", ok, f"None (all clients) or an integer in [1, {n_train}]", clients_per_round)
        V.check("weighting", weighting in WEIGHTINGS, f"one of {list(WEIGHTINGS)}", weighting)
        V.check("node_wait_timeout", node_wait_timeout > 0, "> 0 seconds", node_wait_timeout)
        ok = max_update_norm_ratio is None or (
            isinstance(max_update_norm_ratio, (int, float)) and not isinstance(max_update_norm_ratio, bool)
            and math.isfinite(max_update_norm_ratio) and max_update_norm_ratio > 1
        )
        V.check("max_update_norm_ratio", ok, "None (off) or a finite number > 1", max_update_norm_ratio)
        per_round = n_train if clients_per_round is None else clients_per_round * sampling_groups
        most = min(per_round, num_nodes)  # train messages per round, at most
        ok = isinstance(min_valid_replies, int) and not isinstance(min_valid_replies, bool) and 1 <= min_valid_replies <= most
        V.check("min_valid_replies", ok, f"an integer in [1, {most}] (the train replies a round can have)", min_valid_replies)
        ok = isinstance(max_failed_rounds, int) and not isinstance(max_failed_rounds, bool) and max_failed_rounds >= 0
        V.check("max_failed_rounds", ok, "an integer >= 0 (0 = never stop)", max_failed_rounds)
        hp_fields = field_names(self.hparams_cls)
        self.hparams = self.hparams_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in hp_fields})
        self.eval_config = EvalConfig(inner_lr=self.hparams.inner_lr if eval_lr is None else eval_lr, eval_steps=eval_steps,
                                      eval_shots=eval_shots)
        lr_decay_at = tuple(lr_decay_at)
        ok = all(isinstance(m, (int, float)) and not isinstance(m, bool) and 0 < m < 1 for m in lr_decay_at)
        V.check("lr_decay_at", ok and list(lr_decay_at) == sorted(set(lr_decay_at)),
                "increasing fractions of num_rounds in (0, 1), e.g. (0.5, 0.75)", lr_decay_at)
        V.check("lr_decay_at", not lr_decay_at or bool(self.hparams.STEP_SIZES),
                f"empty: {type(self.hparams).__name__} declares no STEP_SIZES to decay", lr_decay_at)
        self.lr_decay_at = lr_decay_at
        self.lr_decay = float(lr_decay)
        self.num_clients = num_clients
        self.num_nodes = num_nodes
        self.new_clients = tuple(new)
        self.train_clients = tuple(p for p in range(num_clients) if p not in set(new))
        self.clients_per_round = clients_per_round
        self.sampling_groups = sampling_groups
        self.seed = seed
        self.weighting = weighting
        self.evaluate_every = evaluate_every
        self.node_wait_timeout = node_wait_timeout
        self.max_update_norm_ratio = max_update_norm_ratio
        self.min_valid_replies = min_valid_replies
        self.max_failed_rounds = max_failed_rounds
        self.failures = ClientFailures()
        """Every error reply of the run, grouped by distinct error (:mod:`fedmeta.strategies.failures`)."""
        self.failed_rounds = 0
        """Consecutive rounds, up to the last one, without a valid train reply."""
        kwargs.setdefault("min_available_nodes", num_nodes)
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0 if evaluate_every else 0.0,
            min_train_nodes=min(per_round, num_nodes),
            min_evaluate_nodes=num_nodes if evaluate_every else 0,
            **kwargs,
        )
        self.num_rounds: int | None = None
        self._node_to_partition: dict[int, int] = {}
        self._node_clients: dict[int, tuple[int, ...]] = {}
        self.client_eval: dict[int, dict[int, dict[str, float]]] = {}
        """Per round, per partition: the personalized-evaluation metrics each client reported."""
        self.client_train: dict[int, dict[int, dict[str, float | int]]] = {}
        """Per round, per partition: the train metrics each client reported (ints such as
        ``memory-round`` and ``memory-digest`` kept exact)."""
        self.round_seconds: dict[int, float] = {}
        """Per round: wall time from configuring training to aggregating it."""
        self.handler_seconds: dict[str, dict[int, list[float]]] = {"train": {}, "evaluate": {}}
        """Per stage and round: the wall time of each valid reply's handler, as its client reported it
        (``client-timing``; replies without it are left out). Not kept in checkpoints: a resumed run's
        figures start at the resume."""
        self.phase_seconds: dict[str, float] = {"evaluate": 0.0, "checkpoint": 0.0}
        """The server's wall time in evaluation rounds (send, wait, aggregate) and in checkpoint writes."""
        self.rejections: dict[int, list[dict[str, Any]]] = {}
        """Per round with rejections: one ``{"stage": "train" | "evaluate", "node": id, "clients":
        [the clients sent to it], "reason": str}`` per reply left out by screening."""
        self.memory_key: str | None = None
        self.resumed_from: int | None = None
        """The checkpoint's round a resumed run continued from (``None``: not resumed)."""
        """Sent under ``memory-key`` when the run checkpoints (see :mod:`fedmeta.strategies.checkpoint`)."""
        self._round_started = 0.0
        self._sent_train: dict[int, SentRound] = {}
        self._sent_evaluate: dict[int, SentRound] = {}

    # ------------------------------------------------------------------------------------------
    @property
    def multi_client(self) -> bool:
        """Whether nodes host several clients (messages then carry ``client-ids``)."""
        return self.num_nodes < self.num_clients

    @property
    def cross_device(self) -> bool:
        return self.clients_per_round is not None and self.clients_per_round * self.sampling_groups < len(self.train_clients)

    def summary(self) -> None:
        n = len(self.train_clients)
        mode = f"cross-device, B={self.clients_per_round} of n={n}" if self.cross_device else f"cross-silo, n={n}"
        if self.multi_client:
            mode += f" on {self.num_nodes} multi-client nodes"
        if self.sampling_groups > 1:
            mode = f"cross-device, B'={self.clients_per_round} from each of {self.sampling_groups} groups of n={n}"
        log(INFO, "\t├──> %s: %s, %d new (held-out) clients", type(self).__name__, mode, len(self.new_clients))
        log(INFO, "\t│\t├── hyper-parameters: %s", self.hparams.to_wire())
        if self.lr_decay_at:
            log(INFO, "\t│\t├── step sizes %s times %g at %s of the rounds", list(self.hparams.STEP_SIZES), self.lr_decay,
                list(self.lr_decay_at))
        log(INFO, "\t│\t├── evaluation: %s every %d rounds", self.eval_config.to_wire(), self.evaluate_every)
        log(INFO, "\t│\t├── seed %d, %s average", self.seed, self.weighting)
        log(INFO, "\t│\t└── screening: max update norm ratio %s, at least %d valid replies",
            self.max_update_norm_ratio, self.min_valid_replies)
        super().summary()

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (everything that
        changes what a round computes; not ``num_rounds``, which a resumed run may extend)."""
        return {
            "strategy": type(self).__name__,
            "hparams": self.hparams.to_wire(),
            "evaluation": self.eval_config.to_wire(),
            **({"lr_decay_at": list(self.lr_decay_at), "lr_decay": self.lr_decay} if self.lr_decay_at else {}),  # older checkpoints: none
            "num_clients": self.num_clients,
            "num_nodes": self.num_nodes,
            "clients_per_round": self.clients_per_round,
            "sampling_groups": self.sampling_groups,
            "new_clients": list(self.new_clients),
            "seed": self.seed,
            "weighting": self.weighting,
            "evaluate_every": self.evaluate_every,
            "max_update_norm_ratio": self.max_update_norm_ratio,
            "min_valid_replies": self.min_valid_replies,
        }

    # --- sampling by partition -----------------------------------------------------------------
    def sample(self, server_round: int) -> list[int]:
        """The partitions that train in ``server_round`` (see :func:`sample_partitions`)."""
        n = len(self.train_clients)
        if self.sampling_groups > 1:
            picks = sample_grouped(n, self.sampling_groups, self.clients_per_round, self.seed, server_round)
        else:
            picks = sample_partitions(n, self.clients_per_round, self.seed, server_round)
        return [self.train_clients[i] for i in picks]

    # --- train -------------------------------------------------------------------------------
    def round_hparams(self, server_round: int):
        """The hyper-parameters of ``server_round``: :attr:`hparams` with the step sizes decayed as
        ``lr_decay_at`` says (round r is the authors' iteration r - 1)."""
        if not self.lr_decay_at or self.num_rounds is None:
            return self.hparams
        decays = sum(server_round - 1 >= int(m * self.num_rounds) for m in self.lr_decay_at)
        factor = self.lr_decay**decays
        return self.hparams.replace(**{f: getattr(self.hparams, f) * factor for f in self.hparams.STEP_SIZES}) if decays else self.hparams

    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The user's config plus the algorithm's keys for this round (which take precedence). A copy:
        Flower's ``FedAvg`` writes ``server-round`` into the caller's record in place."""
        return ConfigRecord(
            {
                **dict(config),
                **self.round_hparams(server_round).to_wire(),
                C.ALGORITHM: self.hparams.algorithm,
                C.SEED: self.seed,
                C.SERVER_ROUND: server_round,
                **({C.MEMORY_KEY: self.memory_key} if self.memory_key else {}),
            }
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        nodes = self.partition_nodes(grid)
        parts = self.sample(server_round)
        logger.debug("round %d: training partitions %s", server_round, parts)
        train_config = self.train_config(server_round, config)
        self._sent_train = {server_round: SentRound(arrays, self._by_node(nodes, parts), self.multi_client)}
        if not self.multi_client:
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: train_config})
            return messages_to([nodes[p] for p in parts], record, MessageType.TRAIN)
        return self._group_messages(arrays, train_config, nodes, parts, MessageType.TRAIN)

    def record_handler_seconds(self, stage: str, server_round: int, replies: list[Message]) -> None:
        """Keep the handler times the ``replies`` report (``client-timing``) for round ``server_round``."""
        times = []
        for m in replies:
            timing = m.content.config_records.get(C.CLIENT_TIMING)
            value = timing.get(C.HANDLER_SECONDS) if timing is not None else None
            if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
                times.append(float(value))
        if times:
            self.handler_seconds[stage][server_round] = times

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent_train.get(server_round, SentRound(None))
        errors = [m for m in replies if m.has_error()]
        self._record_errors(server_round, "train", errors, sent)
        accepted, rejected = self._screen(server_round, "train", [m for m in replies if not m.has_error()], sent)
        self.round_valid = bool(accepted)
        # Average in client order, not arrival order: the float sum is then the same in every run.
        accepted.sort(key=lambda m: min(sent.clients.get(m.metadata.src_node_id, (math.inf,))))
        # Consistency is screening's job; the errors were counted (and logged once each) above.
        log(INFO, "aggregate_train: Received %s results and %s failures", len(accepted), len(errors))
        self.round_seconds[server_round] = time.perf_counter() - self._round_started
        self.record_handler_seconds("train", server_round, accepted)
        missing = self._missing(server_round, "train", replies, sent)
        counts: dict[str, int] = {
            "num-failures": len(errors),
            NUM_MISSING: missing,
            NUM_ACCEPTED: len(accepted),
            NUM_REJECTED: len(rejected),
            NUM_REJECTED_CLIENTS: sum(len(r["clients"]) for r in rejected),
        }
        if len(accepted) < self.min_valid_replies:
            logger.warning("round %d: %d valid replies < min_valid_replies=%d; keeping the previous global model "
                           "(%d failures, %d missing, %d rejected)", server_round, len(accepted), self.min_valid_replies,
                           len(errors), missing, len(rejected))
            if not sent.clients and not replies:
                return None, None  # nothing was sent
            return None, MetricRecord({"num-clients": 0, **counts, KEPT_GLOBAL_MODEL: 1})
        array_records = [next(iter(m.content.array_records.values())) for m in accepted]
        rows_per_reply = [self._reply_rows(m, sent) for m in accepted]
        rows = [r for rr in rows_per_reply for r in rr]
        # A multi-client node's arrays are its clients' average: weight it by its clients (uniform)
        # or by their examples, so the result is the average over clients.
        if self.weighting == "uniform":
            weights = [float(len(rr)) for rr in rows_per_reply]
            row_weights = [1.0] * len(rows)
        else:
            weights = [sum(float(r[self.weighted_by_key]) for r in rr) for rr in rows_per_reply]
            row_weights = [float(r[self.weighted_by_key]) for r in rows]
        arrays = average_arrays(array_records, weights)
        # Identifiers, not quantities: averaging a partition id, a round number or a digest means nothing.
        metrics = average_metrics([MetricRecord(r) for r in rows], row_weights, skip=(C.PARTITION_ID, C.MEMORY_ROUND, C.MEMORY_DIGEST))
        metrics["num-clients"] = len(rows)
        for key, value in counts.items():
            metrics[key] = value
        metrics[KEPT_GLOBAL_MODEL] = 0
        if self.multi_client:  # clients a node left out because their training diverged (NaN/Inf)
            diverged = [next(iter(m.content.metric_records.values())).get(C.NUM_DIVERGED, 0) for m in accepted]
            metrics["num-diverged-clients"] = int(sum(int(d) for d in diverged if isinstance(d, (int, float))))
        self.client_train[server_round] = {
            # ints stay ints: a 60-bit memory-digest does not survive a float; lists are not one client's values
            int(r[C.PARTITION_ID]): {k: v if isinstance(v, int) else float(v) for k, v in r.items() if not isinstance(v, list)}
            for r in rows
        }
        if self.num_rounds and server_round % max(1, self.num_rounds // 10) == 0:
            logger.info("round %d/%s: train loss %.4f, %d clients, %.2f s", server_round, self.num_rounds,
                        metrics.get(C.TRAIN_LOSS, metrics.get("train_loss", float("nan"))), len(rows), self.round_seconds[server_round])
        return arrays, metrics

