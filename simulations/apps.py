"""The experiment's ServerApp and ClientApp.

``build_server_app(cfg)`` / ``build_client_app(cfg)`` wire an :class:`ExperimentConfig` for
``run_simulation`` (where ``context.run_config`` is empty). ``server_app`` / ``client_app`` are the
same apps for ``flwr run .``: they read the config from ``context.run_config``.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmeta.clients import fashion_mnist_data, make_client_app, sinewave_data
from fedmeta.models import build_model
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.strategies import LocalMOML, PerFedAvg
from fedmeta.strategies.base import MetaStrategy

logger = logging.getLogger("fedmeta")

STRATEGIES: dict[str, type[MetaStrategy]] = {"per-fedavg": PerFedAvg, "local-moml": LocalMOML}


def initial_model(cfg: ExperimentConfig) -> torch.nn.Module:
    """The initial meta-model, seeded from ``cfg.seed`` without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model_name)


def build_strategy(cfg: ExperimentConfig) -> MetaStrategy:
    return STRATEGIES[cfg.algorithm](**cfg.strategy_kwargs())


def _scalars(record: Any) -> dict[str, float]:
    return {k: float(v) for k, v in dict(record).items()}


def run_server(grid: Grid, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the experiment on ``grid`` and return (and write) its results."""
    strategy = build_strategy(cfg)
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_model(cfg).state_dict()),
        num_rounds=cfg.num_rounds,
        train_config=ConfigRecord({}),
        evaluate_config=ConfigRecord({}),
    )
    seconds = time.perf_counter() - t0
    evals = {r: _scalars(m) for r, m in result.evaluate_metrics_clientapp.items()}
    last = max(evals) if evals else None
    results = {
        "config": cfg.to_dict(),
        "seconds": seconds,
        "round_seconds": strategy.round_seconds,
        "train": {r: _scalars(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": evals,
        "clients": strategy.client_eval.get(last, {}) if last else {},
        "final": evals[last] if last else {},
        "final_round": last,
    }
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg.algorithm}-{cfg.dataset}-n{cfg.num_clients}-seed{cfg.seed}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    results["path"] = str(path)
    logger.info("results written to %s", path)
    return results


def build_server_app(cfg: ExperimentConfig, sink: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        results = run_server(grid, cfg)
        if sink is not None:
            sink(results)

    return app


def build_client_app(cfg: ExperimentConfig) -> ClientApp:
    if cfg.dataset == "sinewave":
        data_fn = sinewave_data(cfg.num_clients, cfg.seed)
    else:
        data_fn = fashion_mnist_data(cfg.num_clients, cfg.a_train, cfg.a_test, cfg.seed)
    return make_client_app(functools.partial(build_model, cfg.model_name), data_fn, cfg.criterion, device=cfg.device or None)


# --- `flwr run .` ------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_server(grid, ExperimentConfig.from_mapping(context.run_config))


@functools.lru_cache(maxsize=2)
def _client_app_for(cfg: ExperimentConfig) -> ClientApp:
    return build_client_app(cfg)


def _forward(msg: Message, context: Context) -> Message:
    return _client_app_for(ExperimentConfig.from_mapping(context.run_config))(msg, context)


client_app = ClientApp()
client_app.train()(_forward)
client_app.evaluate()(_forward)
client_app.query()(_forward)
