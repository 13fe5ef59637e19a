"""The records between a strategy and fedmeta's ClientApp, for any Flower strategy.

fedmeta's strategies send the algorithm's settings with every train message. A stock Flower strategy
(``FedAvg``, ``FedAdam``, a DP wrapper around either) sends what it is given as ``train_config``:
:func:`train_config` and :func:`evaluate_config` turn an algorithm config into those records::

    from flwr.serverapp.strategy import FedAvg
    from fedmeta.algorithms.per_fedavg import PerFedAvgConfig
    from fedmeta.clients import evaluate_config, train_config

    hp = PerFedAvgConfig(inner_lr=0.01, meta_lr=0.05, local_steps=4)
    FedAvg().start(grid, arrays, num_rounds=10, train_config=train_config(hp), evaluate_config=evaluate_config(hp))

When a train message carries no ``algorithm``, the client takes its settings from the run config
(``[tool.flwr.app.config]`` of the app's ``pyproject.toml``, or ``--run-config``), message keys
first; with neither it refuses the message with one line that says what to send (:func:`resolve_train`).

Replies keep what is meaningful to average (``num-examples``, train loss, evaluation scores) in their
``MetricRecord`` and what identifies the client (``partition-id``, ``client-ids``, ``memory-round``,
``memory-digest``, multi-client nodes' ``per-client-`` lists) in a ``ConfigRecord`` under
:data:`CLIENT_INFO`, which Flower's default aggregation leaves alone.
"""

from __future__ import annotations

from typing import Any, Mapping

from flwr.app import ConfigRecord

from fedmeta import algorithms
from fedmeta import config as C
from fedmeta.config import EvalConfig

CLIENT_INFO = C.CLIENT_INFO
"""Reply key of the ``ConfigRecord`` with the client's identifiers (see the module docstring)."""


def train_config(hp: Any, *, seed: int = 0, **extra: Any) -> ConfigRecord:
    """The train ``ConfigRecord`` for algorithm config ``hp`` (e.g. ``PerFedAvgConfig(...)``): its wire
    keys, ``algorithm`` and ``seed`` (clients seed their batch draws from it, the round and their
    partition id), plus ``extra`` keys of your own. A stock strategy adds ``server-round``."""
    algorithms.get(hp.algorithm)  # a registered algorithm, or a ValueError naming the known ones
    return ConfigRecord({**extra, **hp.to_wire(), C.ALGORITHM: hp.algorithm, C.SEED: int(seed)})


def evaluate_config(hp: Any = None, *, eval_steps: int = 1, eval_shots: int = 0, seed: int = 0, **extra: Any) -> ConfigRecord:
    """The evaluate ``ConfigRecord``: personalized evaluation with ``eval_steps`` fine-tuning steps at
    ``hp.inner_lr`` (the algorithm's alpha; :class:`~fedmeta.config.EvalConfig`'s default without
    ``hp``) on ``eval_shots`` support samples (0: the whole train split)."""
    inner_lr = getattr(hp, "inner_lr", EvalConfig.inner_lr)
    ev = EvalConfig(inner_lr=inner_lr, eval_steps=eval_steps, eval_shots=eval_shots)
    return ConfigRecord({**extra, **ev.to_wire(), C.SEED: int(seed)})


def _run_config_keys(run_config: Mapping[str, Any], wire_keys: set[str]) -> dict[str, Any]:
    return {k: run_config[k] for k in wire_keys if k in run_config}


def resolve_train(message_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(algorithm unit, config)`` for a train message: the message's ``config`` when it names an
    ``algorithm``, else the run config's algorithm settings overlaid with the message's keys (a stock
    strategy's ``server-round``, the user's own). Raises one ``ValueError`` line when neither names
    an algorithm, or names an unknown one."""
    cfg = dict(message_config)
    if C.ALGORITHM not in cfg:
        if C.ALGORITHM not in run_config:
            raise ValueError(
                f"no fedmeta training settings: the train message's config has no {C.ALGORITHM!r} and the run config "
                f"has none either; send fedmeta.clients.train_config(<algorithm config>) as the strategy's train_config, "
                f"or set {C.ALGORITHM} = one of {sorted(algorithms.REGISTRY)} in [tool.flwr.app.config]"
            )
        try:
            unit = algorithms.get(run_config[C.ALGORITHM])
        except ValueError as err:
            raise ValueError(f"run config {C.ALGORITHM!r}: {err}") from None
        wire = set(unit.config.KEYS.values()) | {C.ALGORITHM, C.SEED}
        cfg = {**_run_config_keys(run_config, wire), **cfg}
        return unit, cfg
    try:
        return algorithms.get(cfg[C.ALGORITHM]), cfg
    except ValueError as err:
        raise ValueError(f"config {C.ALGORITHM!r}: {err}") from None


def resolve_evaluate(message_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluate message's config, its missing :class:`EvalConfig` keys taken from the run config."""
    return {**_run_config_keys(run_config, set(EvalConfig.KEYS.values())), **dict(message_config)}


__all__ = ["CLIENT_INFO", "evaluate_config", "resolve_evaluate", "resolve_train", "train_config"]
