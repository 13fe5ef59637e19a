"""What fedmeta's strategies (Per-FedAvg, LocalMOML, the FedAvg baseline) share on the server:
:class:`MetaStrategy`, a Flower ``FedAvg`` that holds its collaborators, each with its own state:
``nodes`` (:class:`~fedmeta.strategies.nodes.PartitionNodes`: which node serves which client, the
messages), ``screening`` (:class:`~fedmeta.strategies.replies.ReplyScreening`: the replies' checks,
rejections and missing nodes), ``failures`` (:class:`~fedmeta.strategies.failures.ClientFailures`: error
replies by distinct error) and ``evaluation`` (:class:`~fedmeta.strategies.evaluation.PersonalizedEvaluation`).
Sampling and averaging are functions (:mod:`~fedmeta.strategies.aggregation`); the checkpointed round
loop is :func:`fedmeta.strategies.rounds.start`. This module holds the arguments, the train config and
the papers' average of the train replies over clients."""

from __future__ import annotations

import logging
import math
import time
from logging import INFO
from typing import Any, ClassVar, Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result

from fedmeta import config as C
from fedmeta import validation as V
from fedmeta.config import HP, EvalConfig, field_names
from fedmeta.strategies.aggregation import average_clients, sample_grouped, sample_partitions
from fedmeta.strategies.evaluation import PersonalizedEvaluation
from fedmeta.strategies.failures import ClientFailures
from fedmeta.strategies.nodes import AUTO_NODES, PartitionNodes
from fedmeta.strategies.replies import ReplyScreening, SentRound, client_rows
from fedmeta.strategies.rounds import start
from fedmeta.strategies.screening import KEPT_GLOBAL_MODEL, NUM_ACCEPTED, NUM_MISSING, NUM_REJECTED, NUM_REJECTED_CLIENTS
from fedmeta.strategies.validation import check_strategy_kwargs

logger = logging.getLogger("fedmeta")

WEIGHTINGS = ("uniform", "examples")



class MetaStrategy(FlowerFedAvg):
    """Base of the fedmeta strategies (see :class:`~fedmeta.strategies.PerFedAvg`).

    Parameters
    ----------
    num_clients
        n, the number of clients (client ids ``0..num_clients-1``).
    num_nodes
        The number of nodes (SuperNodes) serving them; ``None``: one per client; ``-1``: the clients
        shared among the federation's SuperNodes, as many as the first node reports (its node config's
        ``num-partitions``; one per client when it reports none). Fewer nodes than
        clients: node ``partition-id`` ``i`` hosts block ``i`` of the clients and trains the sampled
        ones together (:mod:`fedmeta.batched`); sampling and the average stay over clients (``nodes``:
        :class:`~fedmeta.strategies.nodes.PartitionNodes`).
    clients_per_round, sampling_groups
        B: ``None`` for cross-silo (every training client every round) or ``1 <= B <= n`` for
        cross-device (:func:`~fedmeta.strategies.aggregation.sample_partitions`, seeded by ``seed``).
        With ``G > 1`` groups: B from each of G contiguous groups (:func:`~fedmeta.strategies.aggregation.sample_grouped`;
        localmoml Section 6.2).
    new_clients
        Partition ids held out of training, evaluated apart under ``new-`` keys.
    seed
        Seeds client sampling and is sent to the clients, which seed their batch sampling from it.
    weighting
        ``"uniform"`` (the papers' average over sampled clients) or ``"examples"`` (by ``num-examples``).
    eval_steps, eval_shots, eval_lr, evaluate_every
        Personalized evaluation (``evaluation``: :class:`~fedmeta.strategies.evaluation.PersonalizedEvaluation`):
        k fine-tuning steps on a support set of ``eval_shots`` (0: the train split) at ``eval_lr``
        (``None``: ``inner_lr``), every ``evaluate_every`` rounds (0: never) and after the last one.
        Defaults: per-fedavg.txt Section 5; ``eval_steps=10, eval_shots=5`` is LocalMOML's (Section 6.2).
    lr_decay_at, lr_decay
        Step sizes (``STEP_SIZES``) times ``lr_decay`` from round ``floor(m * num_rounds) + 1`` on, for
        each fraction m in ``lr_decay_at`` (:meth:`round_hparams`; ``(0.5, 0.75)``: the localmoml authors').
    node_wait_timeout
        Seconds to wait for the nodes serving all n clients to connect (a warning every few seconds
        says what is missing; ``nodes.wait_log_every`` sets how often).
    max_update_norm_ratio, min_valid_replies
        Screening (``screening``: :class:`~fedmeta.strategies.replies.ReplyScreening`): reject a train
        reply whose update norm exceeds this many times the round's median (``None``: off); keep the
        previous global model when fewer than ``min_valid_replies`` replies pass (:meth:`aggregate_train`).
    max_failed_rounds
        :meth:`start` stops (:class:`~fedmeta.strategies.failures.TrainingStopped`) after this many
        consecutive rounds without a valid train reply; 0 never stops.
    **kwargs
        Algorithm hyper-parameters (fields of :attr:`hparams_cls`), then Flower ``FedAvg`` arguments.
    """

    hparams_cls: ClassVar[type]

    def __init__(self, *, num_clients: int, num_nodes: int | None = None, clients_per_round: int | None = None, sampling_groups: int = 1,
                 new_clients: Iterable[int] = (), seed: int = HP.seed.default, weighting: str = "uniform",
                 eval_steps: int = HP.eval_steps.default, eval_shots: int = HP.eval_shots.default, eval_lr: float | None = None,
                 lr_decay_at: Sequence[float] = (), lr_decay: float = HP.lr_decay.default,
                 evaluate_every: int = HP.evaluate_every.default, node_wait_timeout: float = 600.0,
                 max_update_norm_ratio: float | None = None, min_valid_replies: int = 1, max_failed_rounds: int = 3,
                 **kwargs: Any) -> None:
        check_strategy_kwargs(type(self), locals())
        V.check("num_clients", isinstance(num_clients, int) and num_clients >= 1, "an integer >= 1", num_clients)
        if num_nodes is None:
            num_nodes = num_clients
        ok = isinstance(num_nodes, int) and not isinstance(num_nodes, bool) and (1 <= num_nodes <= num_clients or num_nodes == AUTO_NODES)
        V.check("num_nodes", ok, f"None (one node per client), -1 (the federation's SuperNodes) or an integer in "
                                 f"[1, num_clients={num_clients}]", num_nodes)
        known_nodes = num_clients if num_nodes == AUTO_NODES else num_nodes  # at most, before -1 is resolved
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
        most = min(per_round, known_nodes)  # train messages per round, at most
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
        self.lr_decay_at, self.lr_decay = lr_decay_at, float(lr_decay)
        self.num_clients, self.new_clients = num_clients, tuple(new)
        self.train_clients = tuple(p for p in range(num_clients) if p not in set(new))
        self.clients_per_round, self.sampling_groups, self.seed, self.weighting = clients_per_round, sampling_groups, seed, weighting
        self.evaluate_every, self.max_update_norm_ratio = evaluate_every, max_update_norm_ratio
        self.min_valid_replies, self.max_failed_rounds = min_valid_replies, max_failed_rounds
        self.failures = ClientFailures()
        """Every error reply of the run, grouped by distinct error (:mod:`fedmeta.strategies.failures`)."""
        kwargs.setdefault("min_available_nodes", 1 if num_nodes == AUTO_NODES else num_nodes)
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if evaluate_every else 0.0,
                         min_train_nodes=1 if num_nodes == AUTO_NODES else min(per_round, num_nodes),
                         min_evaluate_nodes=(1 if num_nodes == AUTO_NODES else num_nodes) if evaluate_every else 0, **kwargs)
        self.nodes = PartitionNodes(num_clients=num_clients, num_nodes=num_nodes, node_wait_timeout=node_wait_timeout,
                                    configrecord_key=self.configrecord_key, arrayrecord_key=self.arrayrecord_key)
        self.screening = ReplyScreening(failures=self.failures, served=self.nodes.served, weighting=weighting,
                                        examples_key=self.weighted_by_key, max_update_norm_ratio=max_update_norm_ratio)
        self.evaluation = PersonalizedEvaluation(eval_config=self.eval_config, seed=seed, evaluate_every=evaluate_every,
                                                 new_clients=self.new_clients)
        self.num_rounds: int | None = None
        self.round_valid = True
        """Whether the last round had a valid train reply."""
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
        self.memory_key: str | None = None
        """Sent under ``memory-key`` when the run checkpoints (see :mod:`fedmeta.strategies.checkpoint`)."""
        self.resumed_from: int | None = None
        """The checkpoint's round a resumed run continued from (``None``: not resumed)."""
        self._round_started = 0.0

    client_rows = staticmethod(client_rows)

    @property
    def num_nodes(self) -> int:
        """The nodes serving the clients (``nodes``'; ``-1`` until :meth:`PartitionNodes.discover` resolves it)."""
        return self.nodes.num_nodes

    @property
    def client_eval(self) -> dict[int, dict[int, dict[str, float]]]:
        """Per round, per partition: the personalized-evaluation metrics each client reported (``evaluation``'s)."""
        return self.evaluation.client_eval

    @property
    def rejections(self) -> dict[int, list[dict[str, Any]]]:
        """Per round with rejections: the replies screening left out (``screening``'s)."""
        return self.screening.rejections

    @property
    def multi_client(self) -> bool:
        """Whether nodes host several clients (messages then carry ``client-ids``)."""
        return self.nodes.multi_client

    @property
    def cross_device(self) -> bool:
        return self.clients_per_round is not None and self.clients_per_round * self.sampling_groups < len(self.train_clients)

    def summary(self) -> None:
        n = len(self.train_clients)
        mode = f"cross-device, B={self.clients_per_round} of n={n}" if self.cross_device else f"cross-silo, n={n}"
        if self.nodes.auto:
            mode += " on the federation's SuperNodes (num_nodes=-1)"
        elif self.multi_client:
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
            "num_nodes": AUTO_NODES if self.nodes.auto else self.num_nodes,  # the setting: -1 resumes on any federation
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
        nodes = self.nodes.discover(grid)
        parts = self.sample(server_round)
        logger.debug("round %d: training partitions %s", server_round, parts)
        messages, sent = self.nodes.messages(arrays, self.train_config(server_round, config), nodes, parts, MessageType.TRAIN, self.weighting)
        self.screening.expect("train", server_round, SentRound(arrays, sent, self.multi_client))
        return messages

    def record_handler_seconds(self, stage: str, server_round: int, replies: list[Message]) -> None:
        """Keep the handler times the ``replies`` report (``client-timing``) for round ``server_round``."""
        timings = [m.content.config_records.get(C.CLIENT_TIMING) for m in replies]
        values = [t.get(C.HANDLER_SECONDS) for t in timings if t is not None]
        times = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v >= 0]
        if times:
            self.handler_seconds[stage][server_round] = times

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The average over clients of the replies that pass screening (``screening``), in client order.
        The metrics add ``num-clients`` (clients averaged), ``num-failures`` (error replies), ``num-missing``,
        ``num-accepted``, ``num-rejected``, ``num-rejected-clients`` and ``kept-global-model``: 1 (and no
        arrays) when fewer than ``min_valid_replies`` replies passed."""
        s = self.screening.screen("train", server_round, replies)
        accepted, rejected, errors, missing = s.accepted, s.rejected, s.errors, s.missing
        self.round_valid = bool(accepted)
        # Average in client order, not arrival order: the float sum is then the same in every run.
        accepted.sort(key=lambda m: min(s.sent.clients.get(m.metadata.src_node_id, (math.inf,))))
        log(INFO, "aggregate_train: Received %s results and %s failures", len(accepted), len(errors))
        self.round_seconds[server_round] = time.perf_counter() - self._round_started
        self.record_handler_seconds("train", server_round, accepted)
        counts: dict[str, int] = {"num-failures": len(errors), NUM_MISSING: missing, NUM_ACCEPTED: len(accepted),
                                  NUM_REJECTED: len(rejected), NUM_REJECTED_CLIENTS: sum(len(r["clients"]) for r in rejected)}
        if len(accepted) < self.min_valid_replies:
            logger.warning("round %d: %d valid replies < min_valid_replies=%d; keeping the previous global model "
                           "(%d failures, %d missing, %d rejected)", server_round, len(accepted), self.min_valid_replies,
                           len(errors), missing, len(rejected))
            if not s.sent.clients and not errors and not rejected:
                return None, None  # nothing was sent
            return None, MetricRecord({"num-clients": 0, **counts, KEPT_GLOBAL_MODEL: 1})
        rows_per_reply = [s.rows(m) for m in accepted]
        rows = [r for rr in rows_per_reply for r in rr]
        # Identifiers, not quantities: averaging a partition id, a round number or a digest means nothing.
        arrays, metrics = average_clients([next(iter(m.content.array_records.values())) for m in accepted], rows_per_reply,
                                          self.weighted_by_key if self.weighting == "examples" else None,
                                          skip=(C.PARTITION_ID, C.MEMORY_ROUND, C.MEMORY_DIGEST))
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

    # --- evaluate ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.evaluation.evaluates_in(server_round, self.num_rounds):
            return []
        nodes = self.nodes.discover(grid)
        cfg = self.evaluation.config(server_round, config)
        messages, sent = self.nodes.messages(arrays, cfg, nodes, sorted(nodes), MessageType.EVALUATE, self.weighting)
        self.screening.expect("evaluate", server_round, SentRound(None, sent, self.multi_client))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """``evaluation``'s summary of the replies that pass screening, with ``num-failures``, ``num-missing``
        and ``num-rejected``; ``None`` without a valid reply."""
        s = self.screening.screen("evaluate", server_round, replies)
        log(INFO, "aggregate_evaluate: Received %s results and %s failures", len(s.accepted), len(s.errors))
        self.record_handler_seconds("evaluate", server_round, s.accepted)
        if not s.accepted:
            if s.rejected:
                logger.warning("round %d: no valid evaluate replies (%d failures, %d rejected)", server_round, len(s.errors),
                               len(s.rejected))
            return None
        counts = {"num-failures": len(s.errors), NUM_MISSING: s.missing, NUM_REJECTED: len(s.rejected)}
        return self.evaluation.aggregate(server_round, self.num_rounds, [r for m in s.accepted for r in s.rows(m)], counts)

    # --- the round loop ------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args: Any, **kwargs: Any) -> Result:
        """Flower's round loop with checkpoints, resume and the failed-rounds stop: :func:`~fedmeta.strategies.rounds.start`
        (which see, for ``timeout``, ``train_config``, ``evaluate_config``, ``evaluate_fn`` and the keyword-only
        ``checkpoint_dir``, ``resume``, ``run_info``, ``checkpoint_sync``, ``on_round``) with this strategy."""
        return start(self, grid, initial_arrays, num_rounds, *args, **kwargs)

    def begin_run(self, num_rounds: int, memory_key: str | None, resumed_from: int | None) -> None:
        """Called by the round loop before round 1 (or the first resumed round)."""
        self.num_rounds, self.memory_key, self.resumed_from = num_rounds, memory_key, resumed_from

    def history_entry(self, server_round: int) -> dict[str, Any]:
        """What a checkpoint keeps of this strategy's round (:meth:`restore_round` reads it back)."""
        return {"client_train": self.client_train.get(server_round), "client_eval": self.client_eval.get(server_round),
                "round_seconds": self.round_seconds.get(server_round), "rejections": self.rejections.get(server_round)}

    def restore_round(self, server_round: int, entry: dict[str, Any]) -> None:
        for key, into in (("client_train", self.client_train), ("client_eval", self.client_eval)):
            if entry.get(key) is not None:
                into[server_round] = {int(c): m for c, m in entry[key].items()}
        if entry.get("round_seconds") is not None:
            self.round_seconds[server_round] = float(entry["round_seconds"])
        if entry.get("rejections"):
            self.rejections[server_round] = list(entry["rejections"])
