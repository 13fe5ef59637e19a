"""The checkpointed round loop: Flower's ``Strategy.start`` (train, evaluate, optional server-side
evaluation, per round) plus what fedmeta adds to it: a checkpoint after every round, resume, a stop when
no client can train (``max_failed_rounds``), short polls (:func:`~fedmeta.strategies.exchange.exchange`)
and an ``on_round`` hook.

Why a loop of its own rather than hooks on Flower's: ``Strategy.start`` (flwr 1.42) always runs rounds
``1..num_rounds`` and evaluates round 0 (no resume from round k+1), keeps its ``Result`` in a local (the
checkpoint's history and the stop's partial result need it after every round; ``evaluate_fn``, its only
per-round callback, sees the model but not the round's metrics) and waits with
``Grid.send_and_receive`` (a deployment's 3 s polls). The loop below is Flower's, with those additions
marked, and logs Flower's start and final lines.

:func:`start` runs it for any Flower ``Strategy``: fedmeta's own (whose ``start`` is this loop), a stock
``FedAvg`` / ``FedAdam`` driving fedmeta clients, or a Flower wrapper such as
``DifferentialPrivacyServerSideFixedClipping`` around a fedmeta strategy. A fedmeta strategy, bare or
wrapped (found under the wrapper's public ``strategy`` attribute), is a :class:`RoundHooks`: it keeps its
per-client history, its memory key and its evaluation schedule through checkpoints and resumes."""

from __future__ import annotations

import io
import logging
import time
from logging import INFO
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmeta import validation as V
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError, check_can_start, fingerprint_mismatch, new_memory_key
from fedmeta.strategies.exchange import exchange
from fedmeta.strategies.failures import ClientFailures, TrainingStopped

logger = logging.getLogger("fedmeta")


@runtime_checkable
class RoundHooks(Protocol):
    """What the loop asks of a fedmeta strategy (:class:`~fedmeta.strategies.base.MetaStrategy`)."""

    max_failed_rounds: int
    failures: ClientFailures  # its error replies (it records them itself when bare)
    round_valid: bool  # whether the last round had a valid train reply
    phase_seconds: dict[str, float]  # the loop adds its time in evaluation rounds and checkpoint writes

    def fingerprint(self) -> dict[str, Any]: ...
    def begin_run(self, num_rounds: int, memory_key: str | None, resumed_from: int | None) -> None: ...
    def history_entry(self, server_round: int) -> dict[str, Any]: ...
    def restore_round(self, server_round: int, entry: dict[str, Any]) -> None: ...


def _meta(strategy: Strategy) -> RoundHooks | None:
    """The fedmeta strategy in ``strategy``: itself, or the one a Flower wrapper holds as ``strategy``."""
    for s in (strategy, getattr(strategy, "strategy", None)):
        if isinstance(s, RoundHooks):
            return s
    return None


def _scalars(obj: Any) -> dict[str, Any]:
    """An object's public settings that are plain scalars (a stock strategy's fingerprint)."""
    return {k: v for k, v in sorted(vars(obj).items())
            if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}


def fingerprint(strategy: Strategy) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it: a fedmeta strategy's own
    :meth:`~fedmeta.strategies.base.MetaStrategy.fingerprint`; for a wrapper, its class and scalar
    settings (e.g. the DP noise multiplier and clipping norm) around the wrapped strategy's; for
    another strategy, its class and scalar settings."""
    if isinstance(strategy, RoundHooks):
        return strategy.fingerprint()
    out: dict[str, Any] = {"strategy": type(strategy).__name__, "settings": _scalars(strategy)}
    inner = getattr(strategy, "strategy", None)
    if inner is not None:
        out["wrapped"] = fingerprint(inner)
    return out


def start(strategy: Strategy, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
          train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
          evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None, *, checkpoint_dir: str | Path | None = None,
          resume: bool = False, run_info: Mapping[str, Any] | None = None, checkpoint_sync: bool = True,
          on_round: Callable[[int, Result], None] | None = None, max_failed_rounds: int | None = None) -> Result:
    """Run ``strategy`` (any Flower ``Strategy``) for ``num_rounds`` rounds, as ``strategy.start`` would,
    with a checkpoint after every round, resume, and a stop when no client can train.

    Parameters
    ----------
    strategy
        A fedmeta strategy, a Flower wrapper around one (``DifferentialPrivacyServerSideFixedClipping``,
        ``DifferentialPrivacyClientSideFixedClipping`` ...), or any other Flower strategy (stock
        ``FedAvg`` driving fedmeta clients with :func:`fedmeta.clients.train_config`).
    grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn
        As in Flower's ``Strategy.start``. ``timeout``: seconds to wait for a round's replies; a node
        that has not replied by then is left out (a fedmeta strategy counts it in ``num-missing``).
    checkpoint_dir
        Write a checkpoint (:mod:`fedmeta.strategies.checkpoint`) there after round 0 (the initial
        model) and after every round. A fresh run refuses a directory that holds an unfinished run.
    resume
        Continue the run in ``checkpoint_dir`` from its last completed round k: the model, the
        returned ``Result``'s metrics of rounds 1..k (and a fedmeta strategy's history:
        ``client_train``, ``client_eval``, ``round_seconds``, ``rejections``, its memory key) are
        restored and rounds k+1..``num_rounds`` run; ``initial_arrays`` is then unused. The
        checkpoint's :func:`fingerprint` (and ``run_info``) must equal this run's. On CPU with the same
        seed the final model equals an uninterrupted run's, bit for bit, when every step of the
        strategy is a function of the round (fedmeta's are); a DP wrapper's noise is drawn from a
        generator that is not checkpointed, so a resumed run with noise > 0 draws other noise.
    run_info
        Further settings the resumed run must share (e.g. the experiment's data configuration).
    checkpoint_sync
        fsync each checkpoint (``False``: a killed process loses nothing, a power cut may).
    on_round
        Called with the round and the ``Result`` so far after every round (e.g. a progress bar).
    max_failed_rounds
        Stop after this many consecutive rounds that did not train; 0 never stops. Default: the
        fedmeta strategy's ``max_failed_rounds``, else 3. A fedmeta strategy used bare decides
        whether its round trained (a valid train reply); for any other strategy a round that did not
        train is one whose ``aggregate_train`` returned no arrays.

    Raises
    ------
    TrainingStopped
        After ``max_failed_rounds`` consecutive rounds that did not train; one line naming the first
        client error. Its ``result`` holds the metrics so far and its ``failures`` every distinct
        client error. A checkpoint is marked stopped, so a fresh run may replace it (``resume`` still works).
    """
    ok = isinstance(num_rounds, int) and not isinstance(num_rounds, bool) and num_rounds >= 1
    V.check("num_rounds", ok, "an integer >= 1", num_rounds)
    V.check("resume", not resume or checkpoint_dir is not None, "False without a checkpoint_dir", resume)
    meta = _meta(strategy)
    bare = meta is strategy
    if max_failed_rounds is None:
        max_failed_rounds = meta.max_failed_rounds if meta is not None else 3
    ok = isinstance(max_failed_rounds, int) and not isinstance(max_failed_rounds, bool) and max_failed_rounds >= 0
    V.check("max_failed_rounds", ok, "an integer >= 0 (0 = never stop)", max_failed_rounds)
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    # A bare fedmeta strategy records its error replies itself; around any other, the loop does.
    failures = meta.failures if bare else ClientFailures()
    result = Result()
    # fedmeta: open (or resume) the checkpoint, before any message is sent
    ckpt, memory_key, done, arrays = None, None, 0, initial_arrays
    if checkpoint_dir is not None:
        ckpt = CheckpointDir(checkpoint_dir, sync=checkpoint_sync)
        arrays, memory_key, done = _open(ckpt, strategy, meta, initial_arrays, num_rounds, resume, run_info, result)
    if meta is not None:  # its evaluation schedule (the last round), log lines and train messages use these
        meta.begin_run(num_rounds, memory_key, done if ckpt is not None and resume else None)

    log(INFO, "Starting %s strategy:", strategy.__class__.__name__)
    log(INFO, "\t├── Number of rounds: %d", num_rounds)
    log(INFO, "\t├── ArrayRecord (%.2f MB)", sum(len(a.data) for a in arrays.values()) / 2**20)
    for stage, cfg in (("train", train_config), ("evaluate", evaluate_config)):
        log(INFO, "\t├── ConfigRecord (%s): %s", stage, dict(cfg) or "(empty)")
    strategy.summary()
    log(INFO, "")
    t_start = time.time()
    if evaluate_fn and done == 0:
        res = evaluate_fn(0, arrays)
        log(INFO, "Initial global evaluation results: %s", res)
        if res is not None:
            result.evaluate_metrics_serverapp[0] = res

    failed_rounds = 0
    for current_round in range(done + 1, num_rounds + 1):  # fedmeta: from the checkpoint's round on
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
        replies = exchange(grid, strategy.configure_train(current_round, arrays, train_config, grid), timeout=timeout)
        if not bare:
            failures.record_replies(current_round, "train", replies)
        agg_arrays, agg_train_metrics = strategy.aggregate_train(current_round, replies)
        if agg_arrays is not None:
            result.arrays = arrays = agg_arrays
        if agg_train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
            result.train_metrics_clientapp[current_round] = agg_train_metrics
        # fedmeta: the failed-rounds stop
        trained = meta.round_valid if bare else agg_arrays is not None
        failed_rounds = 0 if trained else failed_rounds + 1
        if max_failed_rounds and failed_rounds >= max_failed_rounds:
            _stop(current_round, failed_rounds, max_failed_rounds, failures, result, ckpt, on_round)
        t_evaluate = time.perf_counter()
        replies = exchange(grid, strategy.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout)
        if not bare:
            failures.record_replies(current_round, "evaluate", replies)
        agg_evaluate_metrics = strategy.aggregate_evaluate(current_round, replies)
        if meta is not None:
            meta.phase_seconds["evaluate"] += time.perf_counter() - t_evaluate
        if agg_evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)
            result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics
        if evaluate_fn:
            log(INFO, "Global evaluation")
            res = evaluate_fn(current_round, arrays)
            log(INFO, "\t└──> MetricRecord: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[current_round] = res
        # fedmeta: the checkpoint and the on_round hook
        if ckpt is not None:
            t_commit = time.perf_counter()
            ckpt.commit(current_round, arrays, _history_entry(meta, current_round, result))
            if meta is not None:
                meta.phase_seconds["checkpoint"] += time.perf_counter() - t_commit
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


def _open(ckpt: CheckpointDir, strategy: Strategy, meta: RoundHooks | None, initial_arrays: ArrayRecord, num_rounds: int,
          resume: bool, run_info: Mapping[str, Any] | None, result: Result) -> tuple[ArrayRecord, str, int]:
    """Begin a fresh run's checkpoint, or resume the one in ``ckpt`` into ``result`` and ``meta``:
    ``(the model to start from, the memory key, the rounds already done)``."""
    fp = {**fingerprint(strategy), **({"run": dict(run_info)} if run_info else {})}
    state = check_can_start(ckpt.path, resume)
    if state is None:
        memory_key = new_memory_key()
        ckpt.begin(initial_arrays, num_rounds=num_rounds, memory_key=memory_key, fingerprint=fp)
        return initial_arrays, memory_key, 0
    if why := fingerprint_mismatch(state.fingerprint, fp):
        raise CheckpointError(f"checkpoint {ckpt.path} is from a run with other settings ({why}): "
                              f"resume with the same settings, or start afresh in another checkpoint-dir")
    V.check("num_rounds", num_rounds >= state.round, f">= the checkpoint's completed rounds ({state.round}) when resuming", num_rounds)
    if state.round:
        result.arrays = state.arrays
    for entry in state.history:  # rounds 1..k back into the result and the fedmeta strategy
        r = int(entry["round"])
        for key, into in _results(result):
            if entry.get(key) is not None:
                into[r] = MetricRecord(entry[key])
        if meta is not None:
            meta.restore_round(r, entry)
    ckpt.begin(state.arrays, num_rounds=num_rounds, memory_key=state.memory_key, fingerprint=fp, history=state.history,
               at_round=state.round)
    log(INFO, "Resuming from the checkpoint after round %d of %d in %s", state.round, num_rounds, ckpt.path)
    return state.arrays, state.memory_key, state.round


def _stop(server_round: int, failed_rounds: int, max_failed_rounds: int, failures: ClientFailures, result: Result,
          ckpt: CheckpointDir | None, on_round: Callable[[int, Result], None] | None) -> None:
    """End the run after ``max_failed_rounds`` rounds that did not train (see :func:`start`)."""
    first = server_round - failed_rounds + 1
    why = (f"no valid train reply in {failed_rounds} consecutive rounds ({first}-{server_round}; max-failed-rounds="
           f"{max_failed_rounds}): {failures.total} client error replies, {len(failures.errors)} distinct")
    if failures.errors:
        why += f"; first: {next(iter(failures.errors.values())).key}"
    if ckpt is not None:
        ckpt.mark_stopped(server_round, why)
    if on_round is not None:
        on_round(server_round, result)
    logger.info("round %d: stopping the run: %s", server_round, why)
    error = TrainingStopped(f"stopped after round {server_round}: {why}", last_round=server_round, failures=failures)
    error.result = result
    raise error


def _results(result: Result) -> tuple[tuple[str, dict[int, MetricRecord]], ...]:
    """The checkpoint history's keys for the ``Result``'s metrics."""
    return (("train", result.train_metrics_clientapp), ("evaluate", result.evaluate_metrics_clientapp),
            ("serverapp", result.evaluate_metrics_serverapp))


def _history_entry(meta: RoundHooks | None, server_round: int, result: Result) -> dict[str, Any]:
    """Round ``server_round``'s line in the checkpoint history: the round's metrics and the fedmeta strategy's own."""
    entry = {key: None if (m := into.get(server_round)) is None else dict(m) for key, into in _results(result)}
    return {**entry, **(meta.history_entry(server_round) if meta is not None else {})}
