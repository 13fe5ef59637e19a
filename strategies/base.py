"""What fedmeta's strategies (Per-FedAvg, LocalMOML, the FedAvg baseline) share on the server:
partition-keyed sampling, hyper-parameters in the train config, screening of replies, the papers'
uniform average, and personalized-evaluation aggregation (including held-out new clients)."""

from __future__ import annotations

import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import Result

from fedmeta import config as C
from fedmeta.config import EvalConfig, field_names
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError, check_can_start, fingerprint_mismatch, new_memory_key
from fedmeta.strategies.failures import ClientFailures, TrainingStopped, error_log
from fedmeta.strategies.validation import check_strategy_kwargs
from fedmeta.strategies.aggregation import average_arrays, average_metrics, distribution, sample_grouped, sample_partitions
from fedmeta.strategies.screening import (
    KEPT_GLOBAL_MODEL,
    NUM_ACCEPTED,
    NUM_MISSING,
    NUM_REJECTED,
    NUM_REJECTED_CLIENTS,
    norm_outliers,
    screen_evaluate_reply,
    screen_reply,
    update_norm,
)

logger = logging.getLogger("fedmeta")

WEIGHTINGS = ("uniform", "examples")
EVAL_KEYS = (C.ACC_BEFORE, C.ACC_AFTER, C.LOSS_BEFORE, C.LOSS_AFTER)


def _require(name: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def messages_to(nodes: Iterable[int], content: RecordDict, message_type: str) -> list[Message]:
    """One message with ``content`` for each node (Flower's public ``Message`` constructor)."""
    return [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]


def summarize(per_client: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean, std and 10th percentile across clients of every evaluation metric."""
    rows = list(per_client)
    out = {}
    for key in EVAL_KEYS:
        values = [r[key] for r in rows if key in r]
        if values:
            d = distribution(values)
            out.update({key: d["mean"], f"{key}-std": d["std"], f"{key}-p10": d["p10"]})
    return out


@dataclass(frozen=True)
class SentRound:
    """What the strategy sent in one round, against which the replies are screened."""

    reference: ArrayRecord | None
    """The global model sent (train rounds); ``None`` for evaluation."""
    clients: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Node id -> the clients it was asked to run (a single-client node: its partition id)."""
    with_ids: bool = False
    """Whether the messages named the clients under ``client-ids`` (multi-client nodes)."""


class MetaStrategy(FlowerFedAvg):
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
    lists aligned with ``client-ids``; ``num-examples`` present, finite and >= 0 when weighting by
    examples; arrays with the global model's names, shapes and dtypes and no NaN/Inf; optionally
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
        seed: int = 0,
        weighting: str = "uniform",
        eval_steps: int = 1,
        eval_shots: int = 0,
        evaluate_every: int = 50,
        node_wait_timeout: float = 600.0,
        max_update_norm_ratio: float | None = None,
        min_valid_replies: int = 1,
        max_failed_rounds: int = 3,
        **kwargs: Any,
    ) -> None:
        check_strategy_kwargs(type(self), locals())
        _require("num_clients", isinstance(num_clients, int) and num_clients >= 1, "an integer >= 1", num_clients)
        if num_nodes is None:
            num_nodes = num_clients
        ok = isinstance(num_nodes, int) and not isinstance(num_nodes, bool) and 1 <= num_nodes <= num_clients
        _require("num_nodes", ok, f"None (one node per client) or an integer in [1, num_clients={num_clients}]", num_nodes)
        new = sorted(set(new_clients))
        ok = all(isinstance(p, int) and 0 <= p < num_clients for p in new) and len(new) < num_clients
        _require("new_clients", ok, f"distinct partition ids in [0, {num_clients - 1}], leaving at least one training client", list(new_clients))
        n_train = num_clients - len(new)
        ok = isinstance(sampling_groups, int) and 1 <= sampling_groups <= n_train
        _require("sampling_groups", ok, f"an integer in [1, {n_train}] (the training clients)", sampling_groups)
        if sampling_groups > 1:
            smallest = n_train // sampling_groups
            ok = isinstance(clients_per_round, int) and 1 <= clients_per_round <= smallest
            _require("clients_per_round (B' per group)", ok, f"an integer in [1, {smallest}] with {sampling_groups} groups", clients_per_round)
        elif clients_per_round is not None:
            ok = isinstance(clients_per_round, int) and 1 <= clients_per_round <= n_train
            _require("clients_per_round (B)", ok, f"None (all clients) or an integer in [1, {n_train}]", clients_per_round)
        _require("weighting", weighting in WEIGHTINGS, f"one of {list(WEIGHTINGS)}", weighting)
        _require("evaluate_every", isinstance(evaluate_every, int) and evaluate_every >= 0, "an integer >= 0", evaluate_every)
        _require("node_wait_timeout", node_wait_timeout > 0, "> 0 seconds", node_wait_timeout)
        ok = max_update_norm_ratio is None or (
            isinstance(max_update_norm_ratio, (int, float)) and not isinstance(max_update_norm_ratio, bool)
            and math.isfinite(max_update_norm_ratio) and max_update_norm_ratio > 1
        )
        _require("max_update_norm_ratio", ok, "None (off) or a finite number > 1", max_update_norm_ratio)
        per_round = n_train if clients_per_round is None else clients_per_round * sampling_groups
        most = min(per_round, num_nodes)  # train messages per round, at most
        ok = isinstance(min_valid_replies, int) and not isinstance(min_valid_replies, bool) and 1 <= min_valid_replies <= most
        _require("min_valid_replies", ok, f"an integer in [1, {most}] (the train replies a round can have)", min_valid_replies)
        ok = isinstance(max_failed_rounds, int) and not isinstance(max_failed_rounds, bool) and max_failed_rounds >= 0
        _require("max_failed_rounds", ok, "an integer >= 0 (0 = never stop)", max_failed_rounds)
        hp_fields = field_names(self.hparams_cls)
        self.hparams = self.hparams_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in hp_fields})
        self.eval_config = EvalConfig(inner_lr=self.hparams.inner_lr, eval_steps=eval_steps, eval_shots=eval_shots)
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
        self._round_valid = True
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

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        run_info: Mapping[str, Any] | None = None,
        checkpoint_sync: bool = True,
        on_round: Callable[[int, Result], None] | None = None,
    ) -> Result:
        """Flower's round loop (``Strategy.start``: train, evaluate, optional server-side
        ``evaluate_fn``, per round), with a checkpoint after every round and resume.

        Parameters
        ----------
        timeout
            Seconds to wait for a round's replies (Flower's ``send_and_receive``). A node that has not
            replied by then is counted in the round's ``num-missing`` and left out.
        checkpoint_dir
            Write a checkpoint (:mod:`fedmeta.strategies.checkpoint`) there after round 0 (the initial
            model) and after every round. A fresh run refuses a directory that holds an unfinished run.
        resume
            Continue the run in ``checkpoint_dir`` from its last completed round k: the model, the
            history (:attr:`client_train`, :attr:`client_eval`, :attr:`round_seconds`,
            :attr:`rejections` and the returned ``Result``'s metrics of rounds 1..k) and the memory
            key are restored and rounds k+1..``num_rounds`` run. ``initial_arrays`` is then unused.
            The checkpoint's :meth:`fingerprint` (and ``run_info``) must equal this run's; on CPU
            with the same seed the final model equals an uninterrupted run's, bit for bit.
        run_info
            Further settings the resumed run must share (e.g. the experiment's data configuration).
        checkpoint_sync
            fsync each checkpoint (``False``: a killed process loses nothing, a power cut may).
        on_round
            Called with the round and the ``Result`` so far after every round (e.g. a progress bar).

        Raises
        ------
        TrainingStopped
            After ``max_failed_rounds`` consecutive rounds without a valid train reply; its
            ``result`` holds the metrics so far and its ``failures`` every distinct client error.
            A checkpoint is marked stopped, so a fresh run may replace it (``resume`` still works).
        """
        ok = isinstance(num_rounds, int) and not isinstance(num_rounds, bool) and num_rounds >= 1
        _require("num_rounds", ok, "an integer >= 1", num_rounds)
        _require("resume", not resume or checkpoint_dir is not None, "False without a checkpoint_dir", resume)
        self.num_rounds = num_rounds
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays, first = initial_arrays, 1
        ckpt = None
        if checkpoint_dir is not None:  # checked before any message is sent
            ckpt = CheckpointDir(checkpoint_dir, sync=checkpoint_sync)
            fingerprint = {**self.fingerprint(), **({"run": dict(run_info)} if run_info else {})}
            state = check_can_start(ckpt.path, resume)
            if state is None:
                self.memory_key = new_memory_key()
                ckpt.begin(arrays, num_rounds=num_rounds, memory_key=self.memory_key, fingerprint=fingerprint)
            else:
                if why := fingerprint_mismatch(state.fingerprint, fingerprint):
                    raise CheckpointError(f"checkpoint {ckpt.path} is from a run with other settings ({why}): "
                                          f"resume with the same settings, or start afresh in another checkpoint-dir")
                _require("num_rounds", num_rounds >= state.round,
                         f">= the checkpoint's completed rounds ({state.round}) when resuming", num_rounds)
                self.memory_key = state.memory_key
                self.resumed_from = state.round
                arrays, first = state.arrays, state.round + 1
                if state.round:
                    result.arrays = arrays
                self._restore(state.history, result)
                ckpt.begin(arrays, num_rounds=num_rounds, memory_key=self.memory_key, fingerprint=fingerprint,
                           history=state.history, at_round=state.round)
                log(INFO, "Resuming from the checkpoint after round %d of %d in %s", state.round, num_rounds, ckpt.path)

        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log(INFO, "\t├── Number of rounds: %d", num_rounds)
        log(INFO, "\t├── ArrayRecord (%.2f MB)", sum(len(a.data) for a in arrays.values()) / 2**20)
        log(INFO, "\t├── ConfigRecord (train): %s", dict(train_config) or "(empty)")
        log(INFO, "\t├── ConfigRecord (evaluate): %s", dict(evaluate_config) or "(empty)")
        self.summary()
        log(INFO, "")
        t_start = time.time()
        if evaluate_fn and first == 1:
            res = evaluate_fn(0, arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res

        for current_round in range(first, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            replies = grid.send_and_receive(messages=self.configure_train(current_round, arrays, train_config, grid), timeout=timeout)
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics
            self.failed_rounds = 0 if self._round_valid else self.failed_rounds + 1
            if self.max_failed_rounds and self.failed_rounds >= self.max_failed_rounds:
                self._stop(current_round, result, ckpt, on_round)
            replies = grid.send_and_receive(messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout)
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, replies)
            if agg_evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics
            if evaluate_fn:
                log(INFO, "Global evaluation")
                res = evaluate_fn(current_round, arrays)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
            if ckpt is not None:
                ckpt.commit(current_round, arrays, self._history_entry(current_round, result))
            if on_round is not None:
                on_round(current_round, result)

        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def _stop(self, server_round: int, result: Result, ckpt: CheckpointDir | None,
              on_round: Callable[[int, Result], None] | None) -> None:
        """End the run after ``max_failed_rounds`` rounds without a valid train reply (see :meth:`start`)."""
        first = server_round - self.failed_rounds + 1
        why = (f"no valid train reply in {self.failed_rounds} consecutive rounds ({first}-{server_round}; max-failed-rounds="
               f"{self.max_failed_rounds}): {self.failures.total} client error replies, {len(self.failures.errors)} distinct")
        if ckpt is not None:
            ckpt.mark_stopped(server_round, why)
        if on_round is not None:
            on_round(server_round, result)
        logger.info("round %d: stopping the run: %s", server_round, why)
        error = TrainingStopped(f"stopped after round {server_round}: {why}", last_round=server_round, failures=self.failures)
        error.result = result
        raise error

    def _history_entry(self, server_round: int, result: Result) -> dict[str, Any]:
        """Round ``server_round``'s line in the checkpoint history (see :meth:`_restore`)."""

        def plain(record: MetricRecord | None) -> dict[str, Any] | None:
            return None if record is None else dict(record)

        return {
            "train": plain(result.train_metrics_clientapp.get(server_round)),
            "evaluate": plain(result.evaluate_metrics_clientapp.get(server_round)),
            "serverapp": plain(result.evaluate_metrics_serverapp.get(server_round)),
            "client_train": self.client_train.get(server_round),
            "client_eval": self.client_eval.get(server_round),
            "round_seconds": self.round_seconds.get(server_round),
            "rejections": self.rejections.get(server_round),
        }

    def _restore(self, history: list[dict[str, Any]], result: Result) -> None:
        """Put the checkpointed history of rounds 1..k back into the strategy and ``result``."""
        for entry in history:
            r = int(entry["round"])
            for key, into in (("train", result.train_metrics_clientapp), ("evaluate", result.evaluate_metrics_clientapp),
                              ("serverapp", result.evaluate_metrics_serverapp)):
                if entry.get(key) is not None:
                    into[r] = MetricRecord(entry[key])
            for key, into in (("client_train", self.client_train), ("client_eval", self.client_eval)):
                if entry.get(key) is not None:
                    into[r] = {int(c): m for c, m in entry[key].items()}
            if entry.get("round_seconds") is not None:
                self.round_seconds[r] = float(entry["round_seconds"])
            if entry.get("rejections"):
                self.rejections[r] = list(entry["rejections"])

    # --- sampling by partition -----------------------------------------------------------------
    def partition_nodes(self, grid: Grid) -> dict[int, int]:
        """``client id -> node id`` for the connected nodes, asking new nodes with a ``query``.

        Flower's node ids are random per run, so the strategy samples clients and maps them to
        nodes. A node reports its ``partition-id`` and, when it hosts several clients, their
        ``client-ids`` (the query tells it ``num-clients``). Waits up to ``node_wait_timeout`` until
        every one of the n clients is served by a connected node.

        A SuperNode that restarts (deployment) registers under a new node id. Its partition then
        moves to the new node: a node that left ``grid.get_node_ids()`` is forgotten, and when a
        newly queried node reports a partition that an already known node serves, the newer node
        takes it over (the old one stops receiving messages; a warning is logged). Two *new* nodes
        reporting the same partition, or nodes reporting overlapping clients, are a
        misconfiguration and raise ``RuntimeError``, as does a ``query`` that the client answers
        with an error. A query that fails because the node disappeared (Flower's node-unavailable
        error) is retried on the next poll.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            node_ids = set(grid.get_node_ids())
            for gone in set(self._node_to_partition) - node_ids:
                del self._node_to_partition[gone]
                self._node_clients.pop(gone, None)
            unknown = sorted(node_ids - set(self._node_to_partition))
            if unknown and len(node_ids) >= self.num_nodes:
                self._query_partitions(grid, unknown, max(1.0, deadline - time.monotonic()))
            mapping = {c: node for node, ids in self._node_clients.items() if node in node_ids for c in ids}
            missing = sorted(set(range(self.num_clients)) - set(mapping))
            if not missing:
                return mapping
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(mapping)} of num_clients={self.num_clients} clients are served by the "
                    f"{len(node_ids)} connected nodes after {self.node_wait_timeout:.0f} s (missing clients {missing[:20]})"
                )
            time.sleep(0.2)

    def _query_partitions(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        """Ask ``nodes`` for their ``partition-id`` (and clients); a reported partition moves to its newest node."""
        query = ConfigRecord({C.NUM_CLIENTS: self.num_clients})
        queries = [
            Message(RecordDict({self.configrecord_key: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        reported: dict[int, tuple[int, tuple[int, ...]]] = {}
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # The node left between listing and query; the SuperLink answers for it.
                    logger.warning("a node left before reporting its %s; waiting for it to come back", C.PARTITION_ID)
                    continue
                raise RuntimeError(f"node {node} did not report its {C.PARTITION_ID}: {reply.error.reason}")
            rec = reply.content["metrics"]
            pid = int(rec[C.PARTITION_ID])
            ids = tuple(int(i) for i in rec[C.CLIENT_IDS]) if C.CLIENT_IDS in rec else (pid,)
            if not 0 <= pid < self.num_nodes or pid in [p for p, _ in reported.values()]:
                raise RuntimeError(
                    f"node {node} reports {C.PARTITION_ID}={pid}: ids must be distinct in [0, {self.num_nodes - 1}] "
                    f"(num_nodes={self.num_nodes})"
                )
            if not ids or not all(0 <= c < self.num_clients for c in ids):
                raise RuntimeError(f"node {node} reports clients {list(ids)[:20]} outside [0, {self.num_clients - 1}]")
            reported[node] = (pid, ids)
        for node, (pid, ids) in reported.items():
            for old in [n for n, p in self._node_to_partition.items() if p == pid]:
                logger.warning("node %d now serves %s=%d (was node %d: restarted or replaced)", node, C.PARTITION_ID, pid, old)
                del self._node_to_partition[old]
                self._node_clients.pop(old, None)
            overlap = {c for n, other in self._node_clients.items() for c in other} & set(ids)
            if overlap:
                raise RuntimeError(
                    f"node {node} ({C.PARTITION_ID}={pid}) reports clients {sorted(overlap)[:20]} that another node "
                    f"serves: check num-partitions on every node (num_nodes={self.num_nodes})"
                )
            self._node_to_partition[node] = pid
            self._node_clients[node] = ids

    def sample(self, server_round: int) -> list[int]:
        """The partitions that train in ``server_round`` (see :func:`sample_partitions`)."""
        n = len(self.train_clients)
        if self.sampling_groups > 1:
            picks = sample_grouped(n, self.sampling_groups, self.clients_per_round, self.seed, server_round)
        else:
            picks = sample_partitions(n, self.clients_per_round, self.seed, server_round)
        return [self.train_clients[i] for i in picks]

    # --- train -------------------------------------------------------------------------------
    def train_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The user's config plus the algorithm's keys (which take precedence). A copy: Flower's
        ``FedAvg`` writes ``server-round`` into the caller's record in place."""
        return ConfigRecord(
            {
                **dict(config),
                **self.hparams.to_wire(),
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

    @staticmethod
    def _by_node(nodes: dict[int, int], clients: list[int]) -> dict[int, tuple[int, ...]]:
        """``node id -> its clients among clients``, for the ``client id -> node id`` map ``nodes``."""
        by_node: dict[int, list[int]] = {}
        for c in clients:
            by_node.setdefault(nodes[c], []).append(c)
        return {node: tuple(ids) for node, ids in by_node.items()}

    def _group_messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: dict[int, int], clients: list[int], message_type: str
    ) -> list[Message]:
        """One message per node that hosts any of ``clients``, naming them under ``client-ids``."""
        messages = []
        for node, ids in self._by_node(nodes, clients).items():
            cfg = ConfigRecord({**dict(config), C.CLIENT_IDS: list(ids), C.NUM_CLIENTS: self.num_clients, C.WEIGHTING: self.weighting})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        return messages

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
        record = next(iter(message.content.metric_records.values()))
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
                                          served=served, weighted_by_key=weighted_by)
                else:
                    reason = screen_evaluate_reply(m.content, sent=sent.clients[node], expect_ids=sent.with_ids,
                                                   served=served, numeric_keys=EVAL_KEYS)
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
        for m in errors:
            clients = sent.clients.get(m.metadata.src_node_id, ())
            known = len(self.failures.errors)
            err = self.failures.record(server_round, stage, clients, m.error.reason)
            if len(self.failures.errors) > known:
                logger.info("round %d: new client error (%s, clients %s): %s", server_round, stage, list(clients)[:8], err.key)
            error_log.debug("round %d: %s error reply of node %d (clients %s), code %s:\n%s", server_round, stage,
                         m.metadata.src_node_id, list(clients), m.error.code, m.error.reason)

    @staticmethod
    def _missing(server_round: int, stage: str, replies: list[Message], sent: SentRound) -> int:
        """Nodes sent a message this round that did not reply before the round's timeout (logged)."""
        replied = {m.metadata.src_node_id for m in replies}
        missing = sorted(set(sent.clients) - replied)
        if missing:
            logger.warning("round %d: %d nodes did not reply to %s before the timeout (clients %s)", server_round, len(missing),
                           stage, sorted(c for n in missing for c in sent.clients[n])[:20])
        return len(missing)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent_train.get(server_round, SentRound(None))
        errors = [m for m in replies if m.has_error()]
        self._record_errors(server_round, "train", errors, sent)
        accepted, rejected = self._screen(server_round, "train", [m for m in replies if not m.has_error()], sent)
        self._round_valid = bool(accepted)
        # Average in client order, not arrival order: the float sum is then the same in every run.
        accepted.sort(key=lambda m: min(sent.clients.get(m.metadata.src_node_id, (math.inf,))))
        # Consistency is screening's job; the errors were counted (and logged once each) above.
        log(INFO, "aggregate_train: Received %s results and %s failures", len(accepted), len(errors))
        self.round_seconds[server_round] = time.perf_counter() - self._round_started
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
                        metrics.get(C.TRAIN_LOSS, float("nan")), len(rows), self.round_seconds[server_round])
        return arrays, metrics

    # --- personalized evaluation ---------------------------------------------------------------
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
        missing = self._missing(server_round, "evaluate", replies, sent)
        if not valid:
            if rejected:
                logger.warning("round %d: no valid evaluate replies (%d failures, %d rejected)", server_round, len(errors), len(rejected))
            return None
        per_client = {}
        for m in valid:
            for rec in self._reply_rows(m, sent):
                per_client[int(rec[C.PARTITION_ID])] = {k: float(rec[k]) for k in EVAL_KEYS if k in rec}
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
        if C.ACC_AFTER in metrics:
            logger.info(
                "round %s/%s: personalized accuracy %.4f +- %.4f (before adaptation %.4f), %d clients",
                server_round, self.num_rounds, metrics[C.ACC_AFTER], metrics[f"{C.ACC_AFTER}-std"], metrics[C.ACC_BEFORE], out["num-clients"],
            )
            if f"new-{C.ACC_AFTER}" in metrics:
                logger.info("    new clients: personalized accuracy %.4f (before adaptation %.4f), %d clients",
                            metrics[f"new-{C.ACC_AFTER}"], metrics[f"new-{C.ACC_BEFORE}"], out["new-num-clients"])
        else:
            logger.info("round %s/%s: personalized loss %.4f (before %.4f)", server_round, self.num_rounds, metrics[C.LOSS_AFTER], metrics[C.LOSS_BEFORE])
        return metrics
