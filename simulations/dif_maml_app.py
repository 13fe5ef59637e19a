"""Dif-MAML on Flower: a ServerApp (the relay, :class:`fedmeta.strategies.DifMAML`) and a ClientApp (one
agent per node, :func:`fedmeta.clients.make_dif_maml_client_app`).

``build_server_app(cfg, num_rounds)`` wires a :class:`~fedmeta.dif_maml.DifMAMLConfig` for
``run_simulation`` (where ``context.run_config`` is empty). ``server_app`` / ``client_app`` read the
config from ``context.run_config`` instead, for ``flwr run``: every run-config key that is a
:class:`DifMAMLConfig` field (kebab-case: ``num-agents``, ``topology``, ``combination``, ``inner-lr``,
``step-size``, ``optimizer``, ``shots``, ``seed`` ...) and ``num-rounds`` (default: ``iterations``).
The simulation needs ``num-agents`` SuperNodes, node ``partition-id`` k being agent k.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

import torch

from fedmeta import config as C
from fedmeta import tracking
from fedmeta.clients.dif_maml import make_dif_maml_client_app, parse_config
from fedmeta.dif_maml import DifMAMLConfig, disagreement, initial_model
from fedmeta.provenance import provenance
from fedmeta.strategies import rounds
from fedmeta.strategies.dif_maml import DifMAML

NUM_ROUNDS = "num-rounds"
SHARED = ("seed", "track", "tracking-dir")
"""Top-level run-config keys (the experiment's) that Dif-MAML shares."""


def run_relay(grid: Grid, cfg: DifMAMLConfig, num_rounds: int, timeout: float = 3600.0,
              trackers: Sequence[tracking.Tracker] = ()) -> tuple[DifMAML, Result]:
    """Run ``num_rounds`` rounds of Dif-MAML on ``grid`` from :func:`fedmeta.dif_maml.initial_model`; the
    strategy (its store ``phi``, ``models_sent``, ``rejections``) and Flower's ``Result`` (``arrays``: the
    final phi's stacked ``[K, ...]``; ``train_metrics_clientapp``: per round the message counts).

    The rounds run in fedmeta's round loop (:func:`fedmeta.strategies.rounds.start`, Flower's with an ``on_round``
    hook): after every round the tracker of ``cfg.track`` (under ``cfg.tracking_dir``, default ``./tracking``) and
    ``trackers`` receive the round's train metrics as ``train/<key>`` and its ``round_seconds``; all are closed at
    the end, and an exception from a tracker's ``log`` stops the run there and propagates."""
    strategy = DifMAML(cfg)  # checks A (Assumption 6) before any message
    with tracking.Trackers(trackers) as sinks:
        tracking.require(cfg.track)
        config = provenance(cfg.to_dict(), started=time.time()) if cfg.track != tracking.NONE else None
        sinks.trackers.insert(0, tracking.open_tracker(cfg.track, cfg.run_name, cfg.tracking_dir or tracking.TRACKING_DIR,
                                                       config=config))

        def round_done(server_round: int, result: Result) -> None:
            train = result.train_metrics_clientapp.get(server_round)
            sinks.log(server_round, tracking.round_values({"train": train}, round_seconds=strategy.round_seconds.get(server_round)))

        result = rounds.start(strategy, grid, initial_arrays(cfg), num_rounds, timeout=timeout, on_round=round_done)
    return strategy, result


def initial_arrays(cfg: DifMAMLConfig) -> ArrayRecord:
    """Every agent's launch model ``w_k,0`` as the relay's initial ArrayRecord."""
    return ArrayRecord({k: v.detach().clone() for k, v in initial_model(cfg).items()})


def build_server_app(cfg: DifMAMLConfig, num_rounds: int, sink: Callable[[DifMAML, Result], None] | None = None,
                     trackers: Sequence[tracking.Tracker] = ()) -> ServerApp:
    """The relay's ServerApp (:func:`run_relay`): the strategy and the result go to ``sink``, every round to
    ``trackers``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy, result = run_relay(grid, cfg, num_rounds, trackers=trackers)
        if sink is not None:
            sink(strategy, result)

    return app


SECTION = C.DIF_MAML + "."
"""Run-config keys of the ``[tool.flwr.app.config.dif-maml]`` table arrive flattened as ``dif-maml.<key>``."""


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[DifMAMLConfig, int]:
    """The Dif-MAML settings and the number of rounds in a run config.

    In the repository's app (``flwr run .`` with ``algorithm = "dif-maml"``) the settings are the
    ``dif-maml.<key>`` entries (every one must be a :class:`DifMAMLConfig` field: a typo is an error),
    with ``seed``, ``track``, ``tracking-dir`` (default ``<results-dir>/tracking``) and ``num-rounds`` from the top level. A standalone app of this module alone may put
    the :class:`DifMAMLConfig` keys at the top level instead (other keys ignored)."""
    section = {k[len(SECTION):]: v for k, v in run_config.items() if k.startswith(SECTION)}
    if section:
        shared = {k: run_config[k] for k in SHARED if k in run_config}
        if not shared.get("tracking-dir") and "results-dir" in run_config:
            shared["tracking-dir"] = str(Path(str(run_config["results-dir"])) / tracking.TRACKING_DIR)
        cfg = DifMAMLConfig.from_mapping({**shared, **section})
    else:
        cfg = parse_config(run_config)
    rounds = run_config.get(NUM_ROUNDS, cfg.iterations)
    if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
        raise ValueError(f"num-rounds must be an integer >= 1, got {rounds!r}")
    return cfg.replace(iterations=rounds), rounds


def run_from_run_config(grid: Grid, run_config: Mapping[str, Any]) -> Result:
    """``flwr run``: the relay for the run config's settings, one line per round (models up / down, replies
    accepted) and a last line with the final disagreement of the relayed states."""
    cfg, rounds = config_from_run_config(run_config)
    g, _, lambda_2 = cfg.combination_matrix()  # checks A (Assumption 6) before any message
    print(f"dif-maml: {cfg.num_agents} agents on {g.name} ({len(g.edges)} edges, lambda_2 = {lambda_2:.4f}), {rounds} rounds, "
          f"{cfg.optimizer} mu = {cfg.step_size:g}", flush=True)
    _, result = run_relay(grid, cfg, rounds)
    for r, metrics in sorted(result.train_metrics_clientapp.items()):
        m = dict(metrics)
        print(f"dif-maml round {r}: {int(m[C.MODELS_UP])} models up, {int(m[C.MODELS_DOWN])} down", flush=True)
    phi = {k: torch.from_numpy(v.numpy()) for k, v in result.arrays.items()}
    print(f"dif-maml done: disagreement of the relayed states {disagreement(phi):.6g}", flush=True)
    return result


# --- `flwr run` ---------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run_from_run_config(grid, context.run_config)


client_app = make_dif_maml_client_app()
