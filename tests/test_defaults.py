"""Each default is defined once and every entry point agrees on it (issue 14).

Hyper-parameter defaults live in the algorithms' config classes; the strategy arguments' defaults in
``MetaStrategy.__init__``'s signature; ``ExperimentConfig`` (the CLI, ``flwr run .``) takes both from
there, and ``[tool.flwr.app.config]`` lists them (a test in test_flwr_run.py compares it)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from fedmeta import algorithms
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.run import _parser
from fedmeta.strategies import FedAvg, LocalMOML, PerFedAvg
from fedmeta.strategies.base import MetaStrategy

EXPERIMENT = ExperimentConfig()
BUILT_IN = [algorithms.get(n) for n in ("fedavg", "per-fedavg", "local-moml")]


@pytest.mark.parametrize("algo", BUILT_IN, ids=lambda a: a.name)
def test_the_experiment_takes_each_hyper_parameter_default_from_the_algorithm(algo):
    for f in dataclasses.fields(algo.config):
        if f.name == "memory_policy":  # the experiment's "" means: keep cross-silo, reset cross-device
            assert EXPERIMENT.memory_policy == ""
            continue
        assert getattr(EXPERIMENT, f.name) == f.default, f.name


@pytest.mark.parametrize("strategy_cls", [FedAvg, PerFedAvg, LocalMOML], ids=lambda c: c.__name__)
def test_a_strategy_built_without_arguments_runs_the_experiments_defaults(strategy_cls):
    strategy = strategy_cls(num_clients=50)
    for key, value in dataclasses.asdict(strategy.hparams).items():
        if key != "memory_policy":
            assert value == getattr(EXPERIMENT, key), key
    signature = inspect.signature(MetaStrategy.__init__).parameters
    for key in ("seed", "eval_steps", "eval_shots", "evaluate_every", "min_valid_replies", "max_failed_rounds"):
        assert signature[key].default == getattr(EXPERIMENT, key), key
    assert strategy.evaluate_every == EXPERIMENT.evaluate_every and strategy.seed == EXPERIMENT.seed
    # the experiment's built strategy is the same as the one built by hand with the experiment's sampling
    built = strategy_cls(**ExperimentConfig(algorithm=strategy.hparams.algorithm, clients_per_round=0, num_nodes=0).strategy_kwargs())
    if strategy.hparams.algorithm != "local-moml":
        assert built.hparams == strategy.hparams


def test_the_command_line_without_flags_is_the_experiments_defaults():
    args = vars(_parser().parse_args([]))
    assert all(v is None for k, v in args.items() if k not in ("algorithms", "verbose"))  # unset flags take the dataclass's
    assert ExperimentConfig.from_mapping({}) == EXPERIMENT


def test_the_shared_hyper_parameters_have_one_default_across_algorithms():
    seen: dict[str, object] = {}
    for algo in BUILT_IN:
        for f in dataclasses.fields(algo.config):
            assert seen.setdefault(f.name, f.default) == f.default, f.name
