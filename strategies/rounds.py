"""The checkpointed round loop of fedmeta's strategies: Flower's ``Strategy.start`` (train, evaluate,
optional server-side evaluation, per round) plus a checkpoint after every round, resume, a stop when
no client can train (``max_failed_rounds``) and an ``on_round`` hook. A mixin of
:class:`~fedmeta.strategies.base.MetaStrategy`, whose state it uses."""

from __future__ import annotations

import io
import logging
import time
from logging import INFO
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedmeta import validation as V
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError, check_can_start, fingerprint_mismatch, new_memory_key
from fedmeta.strategies.failures import TrainingStopped

logger = logging.getLogger("fedmeta")



class CheckpointedRounds:
    """Mixin: :meth:`start`, the round loop with checkpoints (see the module docstring)."""

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
        V.check("num_rounds", ok, "an integer >= 1", num_rounds)
        V.check("resume", not resume or checkpoint_dir is not None, "False without a checkpoint_dir", resume)
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
                V.check("num_rounds", num_rounds >= state.round,
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
