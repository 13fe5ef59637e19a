"""The experiment's ServerApp and ClientApp.

``build_server_app(cfg)`` / ``build_client_app(cfg)`` wire an :class:`ExperimentConfig` for
``run_simulation`` (where ``context.run_config`` is empty). ``server_app`` / ``client_app`` are the
same apps for ``flwr run .``: they read the config from ``context.run_config``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from fedmeta import algorithms, tracking
from fedmeta.clients import make_client_app
from fedmeta.data import client_data
from fedmeta import config as C
from fedmeta.provenance import provenance
from fedmeta.simulations.config import AUTO_NODES, ExperimentConfig
from fedmeta.simulations.preflight import check_inputs
from fedmeta.simulations.progress import RoundProgress
from fedmeta.strategies import FedAvg, LocalMOML, PerFedAvg
from fedmeta.strategies.base import MetaStrategy
from fedmeta.strategies.nodes import federation_size
from fedmeta.strategies.exchange import ExchangeCancelled
from fedmeta.strategies.failures import TrainingStopped

logger = logging.getLogger("fedmeta")

STRATEGIES: dict[str, type[MetaStrategy]] = {C.FEDAVG: FedAvg, C.PER_FEDAVG: PerFedAvg, C.LOCAL_MOML: LocalMOML}
"""The built-in algorithms' strategies; any other registered algorithm gets a plain :class:`MetaStrategy` over its config."""


def strategy_class(name: str) -> type[MetaStrategy]:
    """The strategy of the registered algorithm ``name``."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    config = algorithms.get(name).config
    return type(f"{config.__name__.removesuffix('Config')}Strategy", (MetaStrategy,), {"hparams_cls": config})


def initial_model(cfg: ExperimentConfig) -> torch.nn.Module:
    """The initial meta-model, seeded from ``cfg.seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return cfg.build_model()


def build_strategy(cfg: ExperimentConfig) -> MetaStrategy:
    return strategy_class(cfg.algorithm)(**cfg.strategy_kwargs())


def _scalars(record: Any) -> dict[str, float]:
    return {k: float(v) for k, v in dict(record).items()}


def run_server(grid: Grid, cfg: ExperimentConfig, on_round: Callable[[int, Result], None] | None = None,
               trackers: Sequence[tracking.Tracker] = ()) -> dict[str, Any]:
    """Run the experiment on ``grid`` and return (and write) its results.

    ``results["status"]`` is ``"ok"``, or ``"failed"`` with the cause in ``results["failure"]`` when
    the strategy stopped the run because no client could train (``max-failed-rounds``) or the final
    evaluation never happened; ``results["client_errors"]`` lists every distinct client error.

    After every round, the tracker of ``cfg.track`` (:func:`fedmeta.tracking.open_tracker`, under
    ``cfg.tracking_path``) and ``trackers`` receive the round's values under their results-JSON names
    (:func:`fedmeta.tracking.round_values`: ``train/<key>``, ``evaluate/<key>``, ``round_seconds``). All of them
    are closed when the rounds end; an exception from a tracker's ``log`` ends the run there and propagates. A
    resumed run logs the rounds it restored from the checkpoint before its first new round."""
    strategy = build_strategy(cfg)
    started, t0 = time.time(), time.perf_counter()
    failure = None
    sinks = tracking.Trackers(trackers)
    logged = [0]  # the last round the trackers have

    def round_done(server_round: int, result: Result) -> None:
        if on_round is not None:
            on_round(server_round, result)
        for r in range(logged[0] + 1, server_round + 1):  # a resumed run's restored rounds first, so the trackers hold them all
            sections = {"train": result.train_metrics_clientapp.get(r), "evaluate": result.evaluate_metrics_clientapp.get(r)}
            values = tracking.round_values(sections, round_seconds=strategy.round_seconds.get(r))
            if values:
                sinks.log(r, values)
        logged[0] = server_round

    with sinks:
        sinks.trackers.insert(0, tracking.open_tracker(cfg.track, cfg.stem, cfg.tracking_path,
                                                       config=provenance(cfg.to_dict(), started=started)))
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(initial_model(cfg).state_dict()),
                num_rounds=cfg.num_rounds,
                timeout=cfg.round_timeout,
                train_config=ConfigRecord({}),
                evaluate_config=ConfigRecord({}),
                checkpoint_dir=cfg.checkpoint_path,
                resume=cfg.resume,
                run_info=cfg.fingerprint(),
                on_round=round_done,
            )
        except TrainingStopped as stop:
            result, failure = stop.result, str(stop)
    seconds = time.perf_counter() - t0
    evals = {r: _scalars(m) for r, m in result.evaluate_metrics_clientapp.items()}
    last = max(evals) if evals else None
    if failure is None and strategy.evaluate_every and cfg.num_rounds not in evals:
        failure = (f"the final evaluation (round {cfg.num_rounds}) did not happen: no client replied with valid "
                   f"evaluation metrics ({strategy.failures.total} client error replies in the run)")
    results = {
        "status": "failed" if failure else "ok",
        "failure": failure,
        "config": cfg.to_dict(),
        "seconds": seconds,  # of this process (a resumed run: since the resume)
        "round_seconds": strategy.round_seconds,
        "handler_seconds": strategy.handler_seconds,  # per stage, round: each reply's handler time (client-timing)
        "phase_seconds": strategy.phase_seconds,  # the server's time in evaluation rounds and checkpoint writes
        "train": {r: _scalars(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": evals,
        "new_clients": list(strategy.new_clients),
        "trained_partitions": {r: sorted(c) for r, c in strategy.client_train.items()},
        "client_train": strategy.client_train,
        "rejections": strategy.rejections,
        "clients": strategy.client_eval.get(last, {}) if last else {},
        "final": evals[last] if last else {},
        "final_round": last,
        "checkpoint": str(cfg.checkpoint_path) if cfg.checkpoint_path else None,
        "resumed_from": strategy.resumed_from,
        "client_errors": strategy.failures.to_list(),
        "client_errors_report": strategy.failures.report() if strategy.failures else "",
        "provenance": provenance(cfg.to_dict(), started=started),  # the ServerApp's start and wall time
    }
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / cfg.stem
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(results, indent=1, default=str))
    write_client_csv(stem.with_suffix(".csv"), strategy)
    results["path"] = str(path)
    logger.info("results written to %s (status %s)", path, results["status"])
    return results


CSV_COLUMNS = ("round", "client", "split", C.ACC_BEFORE, C.ACC_AFTER, C.LOSS_BEFORE, C.LOSS_AFTER)


def write_client_csv(path: Path, strategy: MetaStrategy) -> None:
    """Every client's personalized-evaluation scores, one row per evaluation round and client.

    ``split`` is ``train-clients`` for clients that took part in training and ``new-clients``
    for the held-out ones (new-client adaptation).
    """
    new = set(strategy.new_clients)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for rnd, clients in sorted(strategy.client_eval.items()):
            for pid, m in clients.items():
                split = "new-clients" if pid in new else "train-clients"
                writer.writerow([rnd, pid, split, *(m.get(k, "") for k in CSV_COLUMNS[3:])])


def build_server_app(cfg: ExperimentConfig, sink: Callable[[dict[str, Any]], None] | None = None,
                     on_round: Callable[[int, Result], None] | None = None,
                     trackers: Sequence[tracking.Tracker] = ()) -> ServerApp:
    """The experiment's ServerApp (:func:`run_server`): its results go to ``sink``, every round to ``on_round`` and
    ``trackers``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            results = run_server(grid, cfg, on_round=on_round, trackers=trackers)
        except ExchangeCancelled:  # this process stops its simulation (fedmeta-sim's Ctrl-C): end without results
            return  # (an exception would make Flower's engine wait 3 s for the ServerApp's context)
        if sink is not None:
            sink(results)

    return app


def build_client_app(cfg: ExperimentConfig) -> ClientApp:
    data_fn = functools.partial(client_data, cfg.dataset, **cfg.data_kwargs())
    return make_client_app(cfg.build_model, data_fn, cfg.criterion, device=cfg.device or None, chunk_size=cfg.chunk_size,
                           vectorize=cfg.vectorize, memory_dir=cfg.memory_dir or None)


# --- `flwr run .` ------------------------------------------------------------------------------


def nodes_of_federation(grid: Grid, cfg: ExperimentConfig, timeout: float = 600.0) -> ExperimentConfig:
    """``num-nodes = -1`` under ``flwr run``: as many multi-client nodes as the federation has SuperNodes, which
    the first connected node reports (its node config's ``num-partitions``, set by Flower's simulation and by
    ``--node-config`` in a deployment). 0 (one client per node) when that is one per client, or when the node
    does not report it (a ClientApp without fedmeta's query handler). Other values of num-nodes: ``cfg``."""
    if cfg.num_nodes != AUTO_NODES:
        return cfg
    deadline = time.monotonic() + timeout
    while not (nodes := sorted(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"num-nodes = -1: no SuperNode connected within {timeout:.0f} s")
        time.sleep(0.2)
    reported = federation_size(grid, nodes[0], cfg.num_partitions, max(1.0, deadline - time.monotonic())) or 0  # None: no reply
    return cfg.replace(num_nodes=reported if 0 < reported < cfg.num_partitions else 0)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    if context.run_config.get("algorithm") == C.DIF_MAML:  # decentralized: the relay app (fedmeta.simulations.dif_maml_app)
        from fedmeta.simulations import dif_maml_app

        dif_maml_app.run_from_run_config(grid, context.run_config)
        return
    cfg = ExperimentConfig.from_mapping(context.run_config)
    tracking.require(cfg.track)  # a missing optional package: one line, before the first message
    if cfg.check_data:  # before the first message: data and model, in this process (see check-data)
        print(f"inputs checked: {check_inputs(cfg)}", flush=True)
    cfg = nodes_of_federation(grid, cfg)
    progress = RoundProgress(cfg.num_rounds, label=cfg.algorithm, tty=False)  # plain lines: `flwr run --stream` shows them
    with progress:
        results = run_server(grid, cfg, on_round=progress)
    if results["status"] != "ok":
        if results["client_errors_report"]:
            print(results["client_errors_report"], flush=True)
        raise RuntimeError(f"{cfg.algorithm}: {results['failure']} (results: {results['path']})")


@functools.lru_cache(maxsize=2)
def _client_app_for(cfg: ExperimentConfig) -> ClientApp:
    return build_client_app(cfg)


def _forward(msg: Message, context: Context) -> Message:
    if context.run_config.get("algorithm") == C.DIF_MAML:
        from fedmeta.simulations import dif_maml_app

        return dif_maml_app.client_app(msg, context)
    return _client_app_for(ExperimentConfig.from_mapping(context.run_config))(msg, context)


client_app = ClientApp()
client_app.train()(_forward)
client_app.evaluate()(_forward)
client_app.query()(_forward)
