"""Fuzz tests of config validation at every entry point (no simulation, no training).

Valid configs are drawn at random; then exactly one field is corrupted with an invalid value of a
random kind (wrong type, out of range, NaN/inf, unknown choice, misspelled key). Construction must
raise one ``ValueError`` (not ``TypeError``/``KeyError``/..., not silent acceptance) whose message
names the field and the value. Entry points: ``ExperimentConfig`` (constructor, ``from_mapping``),
the ``fedmeta-sim`` command line, ``[tool.flwr.app.config]`` / ``--run-config``, the wire configs'
``from_wire`` and the strategies' keyword arguments (:func:`check_strategy_kwargs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import io
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.tracking import TRACKS
from fedmeta import config as C
from fedmeta.batched import VECTORIZE, VMAP_ESTIMATORS
from fedmeta.data import NUM_CLASSES
from fedmeta.meta import META_GRADIENTS
from fedmeta.models import MODELS
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.config import DATASET_MODELS, EVAL_PROTOCOLS, PARTITIONS, ExperimentConfig, parse_cli
from fedmeta.strategies import FedAvg, LocalMOML, PerFedAvg
from fedmeta.strategies.base import MetaStrategy
from fedmeta.strategies.validation import FIXED_BY_STRATEGY, check_strategy_kwargs, valid_strategy_kwargs

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = {f.name: type(f.default) for f in dataclasses.fields(ExperimentConfig)}
KEYS = sorted(k.replace("_", "-") for k in FIELDS)


def kebab(name: str) -> str:
    return name.replace("_", "-")


# --- the config space --------------------------------------------------------------------------

CHOICES: dict[str, tuple[tuple[str, ...], bool]] = {  # field: (allowed values, empty allowed)
    "algorithm": (tuple(C.ALGORITHM_CONFIGS), False),
    "dataset": (tuple(DATASET_MODELS), False),
    "partition": (PARTITIONS, False),
    "model": (tuple(MODELS), True),
    "meta_gradient": (META_GRADIENTS, False),
    "memory_policy": (C.MEMORY_POLICIES, True),
    "batch_draws": (C.BATCH_DRAW_CHOICES, False),
    "eval_protocol": (tuple(EVAL_PROTOCOLS), True),
    "vectorize": (VECTORIZE, False),
    "track": (TRACKS, False),
}
INT_MIN = {  # each integer field's own lower bound
    "a_train": 2, "classes_per_client": 1, "train_per_client": 1, "test_per_client": 1, "num_clients": 1,
    "num_new_clients": 0, "clients_per_round": 0, "sampling_groups": 1, "num_rounds": 1, "local_steps": 1,
    "batch_size": 1, "init_batch_size": 1, "inner_steps": 1, "num_directions": 1, "outer_batch_size": 0, "eval_steps": 0, "eval_shots": 0,
    "evaluate_every": 0, "seed": 0, "num_nodes": -1, "chunk_size": 1, "min_valid_replies": 1, "max_failed_rounds": 0,
}
FLOAT_RANGE = {  # field: (low, low allowed, high or None)
    "dirichlet_alpha": (0.0, False, None), "inner_lr": (0.0, True, None), "meta_lr": (0.0, False, None),
    "lr": (0.0, False, None), "momentum": (0.0, False, 1.0), "delta": (0.0, False, None),
    "num_cpus": (0.0, False, None), "num_gpus": (0.0, True, None), "round_timeout": (0.0, False, None),
    "eval_lr": (0.0, True, None), "lr_decay": (0.0, False, 1.0),
}
DECAY_FRACTIONS = ("", "0.5", "0.5,0.75", "0.1, 0.2,0.9")
"""Valid values of lr_decay_at (a string field with its own grammar)."""
FREE_STRINGS = ("data_dir", "results_dir", "memory_dir", "checkpoint_dir", "ray_address", "tracking_dir")


def test_the_tables_cover_every_field():
    covered = set(CHOICES) | set(INT_MIN) | set(FLOAT_RANGE) | set(FREE_STRINGS) | {"a_test", "download", "device", "max_update_norm_ratio",
                                                                                      "checkpoint", "resume", "check_data", "lr_decay_at"}
    assert covered == set(FIELDS)


pos = st.floats(1e-6, 10.0)


@st.composite
def valid_configs(draw) -> dict[str, Any]:
    """Keyword arguments of a valid ExperimentConfig (every field, across the whole space)."""
    algorithm = draw(st.sampled_from(sorted(C.ALGORITHM_CONFIGS)))
    dataset = draw(st.sampled_from(sorted(DATASET_MODELS)))
    partition = draw(st.sampled_from(PARTITIONS))
    model = draw(st.sampled_from(["", *(m for m in MODELS if not (dataset == "sinewave" and m == "cnn"))]))
    new = draw(st.integers(0, 4))
    n = draw(st.integers(1, 40))
    if dataset != "sinewave" and partition == "fallah" and (n + new) % 2:
        n += 1
    groups = draw(st.integers(1, min(n, 4)))
    per_round = draw(st.integers(1, n // groups)) if groups > 1 else draw(st.integers(0, n))
    meta_gradient = draw(st.sampled_from(META_GRADIENTS))
    vmap_ok = algorithm == C.FEDAVG or meta_gradient in VMAP_ESTIMATORS
    classes = draw(st.integers(1, NUM_CLASSES.get(dataset, 10)))
    return dict(
        algorithm=algorithm, dataset=dataset, partition=partition, model=model,
        a_train=draw(st.integers(2, 200)), a_test=draw(st.sampled_from([0, 2, 15, 34])), dirichlet_alpha=draw(pos),
        classes_per_client=classes, train_per_client=draw(st.integers(classes, 1000)),
        test_per_client=draw(st.integers(classes, 1000)), data_dir=draw(st.sampled_from(["", "/tmp/data", "a dir"])),
        download=draw(st.booleans()), num_clients=n, num_new_clients=new, clients_per_round=per_round,
        sampling_groups=groups, num_rounds=draw(st.integers(1, 10**6)), local_steps=draw(st.integers(1, 100)),
        inner_lr=draw(st.floats(0.0, 1.0)), meta_lr=draw(pos), lr=draw(pos), momentum=draw(st.floats(1e-6, 1.0)),
        batch_size=draw(st.integers(1, 512)), init_batch_size=draw(st.integers(1, 512)),
        inner_steps=draw(st.integers(1, 10)), meta_gradient=meta_gradient, delta=draw(st.floats(1e-9, 1.0)),
        num_directions=draw(st.integers(1, 100)), outer_batch_size=draw(st.integers(0, 64)),
        batch_draws=draw(st.sampled_from(C.BATCH_DRAW_CHOICES)), lr_decay_at=draw(st.sampled_from(DECAY_FRACTIONS)),
        lr_decay=draw(st.floats(1e-6, 1.0)), eval_lr=draw(st.floats(0.0, 1.0)), memory_policy=draw(st.sampled_from(["", *C.MEMORY_POLICIES])),
        eval_protocol=draw(st.sampled_from(["", *EVAL_PROTOCOLS])), eval_steps=draw(st.integers(0, 50)),
        eval_shots=draw(st.integers(0, 50)), evaluate_every=draw(st.integers(0, 1000)),
        seed=draw(st.integers(0, 2**63 - 1)), num_cpus=draw(st.floats(0.01, 64.0)), num_gpus=draw(st.floats(0.0, 8.0)),
        device=draw(st.sampled_from(["", "cpu", "cuda", "cuda:1"])), results_dir=draw(st.sampled_from(["results", "/tmp/r"])),
        num_nodes=draw(st.integers(-1, n + new)), chunk_size=draw(st.integers(1, 10**4)),
        vectorize=draw(st.sampled_from(VECTORIZE if vmap_ok else ("auto", "loop"))),
        memory_dir=draw(st.sampled_from(["", "/tmp/m"])), max_update_norm_ratio=draw(st.sampled_from([0.0, 1.5, 10.0])),
        min_valid_replies=1, round_timeout=draw(st.floats(1e-3, 1e6)), checkpoint=(ckpt := draw(st.booleans())),
        checkpoint_dir=draw(st.sampled_from(["", "/tmp/c"])), resume=ckpt and draw(st.booleans()),
    )  # fmt: skip


def misspelled(option: str) -> st.SearchStrategy[str]:
    """One edit (insert, delete, substitute, swap) of ``option``."""
    alphabet = "abcdefghijklmnopqrstuvwxyz-"

    @st.composite
    def edit(draw) -> str:
        i = draw(st.integers(0, len(option)))
        c = draw(st.sampled_from(alphabet))
        kind = draw(st.sampled_from(["insert", "delete", "substitute", "swap"]))
        if kind == "insert" or len(option) < 2:
            return option[:i] + c + option[i:]
        i = min(i, len(option) - 2)
        if kind == "delete":
            return option[:i] + option[i + 1:]
        if kind == "substitute":
            return option[:i] + c + option[i + 1:]
        return option[:i] + option[i + 1] + option[i] + option[i + 2:]

    return edit()


def out_of_range(name: str) -> st.SearchStrategy[Any]:
    """Values of the right type outside the field's own range."""
    if name in INT_MIN:
        return st.integers(-(10**6), INT_MIN[name] - 1) | (st.just(2**63) if name == "seed" else st.nothing())
    if name == "a_test":
        return st.just(1) | st.integers(-(10**6), -1)
    if name == "max_update_norm_ratio":
        return st.floats(-(10.0**6), 1.0, allow_nan=False).filter(lambda v: v != 0)
    low, closed, high = FLOAT_RANGE[name]
    below = st.floats(max_value=low, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False) if high else st.nothing()
    return (below | above).filter(lambda v: not (in_range(v, low, closed, high)))


def in_range(v: float, low: float, closed: bool, high: float | None) -> bool:
    return (v >= low if closed else v > low) and (high is None or v <= high)


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
CONTAINERS = st.none() | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)


def typed_invalid(name: str) -> st.SearchStrategy[Any]:
    """Invalid values that are not strings (wrong type, out of range, non-finite)."""
    kind = FIELDS[name]
    if kind is int:
        wrong = st.booleans() | st.floats() | CONTAINERS | st.just(2**64)
        return wrong | out_of_range(name)
    if kind is float:
        return st.booleans() | NON_FINITE | st.just(10**400) | CONTAINERS | out_of_range(name)
    if kind is bool:
        return st.integers() | st.floats() | CONTAINERS
    return st.integers() | st.floats() | st.booleans() | CONTAINERS  # strings and choices


def string_invalid(name: str) -> st.SearchStrategy[str]:
    """Invalid values as they arrive from the command line or a string-valued mapping."""
    kind = FIELDS[name]
    junk = st.sampled_from(["", "abc", "1.5.2", "0x10", "none", "[1]"])
    if kind is int:
        return junk | st.sampled_from(["2.5", "1e3", "nan", "true"]) | out_of_range(name).map(str)
    if kind is float:
        finite = out_of_range(name).map(repr)
        return junk | st.sampled_from(["nan", "inf", "-inf", "1e999", "true"]) | finite
    if kind is bool:
        return junk | st.sampled_from(["2", "maybe", "t r u e"])
    if name in CHOICES:
        options, empty_ok = CHOICES[name]
        bad = st.text(max_size=12).filter(lambda s: s not in options and (s != "" or not empty_ok))
        return bad | st.sampled_from(options).flatmap(misspelled).filter(lambda s: s not in options)
    if name == "device":
        return st.sampled_from(["gpu", "cuda:x", "CPU", "tpu:0", "cuda:-"])
    if name == "lr_decay_at":
        return st.sampled_from(["0.75,0.5", "0.5,0.5", "1", "0", "-0.5", "abc", "0.5;0.75", "nan", "0.5,"])
    return st.nothing()  # free strings: every string is valid


INVALID_FIELDS = [n for n in FIELDS if n not in FREE_STRINGS]


def assert_names(err: BaseException, key: str, value: Any) -> str:
    msg = str(err)
    assert re.search(rf"(?<![\w-]){re.escape(key)}(?![\w])", msg), f"{key!r} not named in: {msg}"
    assert repr(value) in msg or str(value) in msg, f"value {value!r} not in: {msg}"
    return msg


# --- ExperimentConfig --------------------------------------------------------------------------


@FUZZ
@given(valid_configs())
def test_valid_configs_construct_and_round_trip(kwargs):
    cfg = ExperimentConfig(**kwargs)
    assert ExperimentConfig.from_mapping(cfg.to_dict()) == cfg
    # as strings, the way the command line delivers them
    assert ExperimentConfig.from_mapping({k: str(v) for k, v in cfg.to_dict().items()}) == cfg
    # snake_case keys too
    assert ExperimentConfig.from_mapping(dataclasses.asdict(cfg)) == cfg
    # every algorithm's strategy accepts the derived keyword arguments (num-nodes = -1 once resolved, here to 3 actor slots)
    check_strategy_kwargs({C.FEDAVG: FedAvg, C.PER_FEDAVG: PerFedAvg, C.LOCAL_MOML: LocalMOML}[cfg.algorithm],
                          cfg.with_nodes_for(3).strategy_kwargs())


@st.composite
def corrupted(draw, values: str = "typed"):
    """(valid kwargs, field, invalid value): one field corrupted."""
    kwargs = draw(valid_configs())
    name = draw(st.sampled_from(INVALID_FIELDS if values != "typed" else list(FIELDS)))
    if values == "typed":
        bad = draw(typed_invalid(name))
    elif values == "string":
        bad = draw(string_invalid(name))
    else:
        bad = draw(typed_invalid(name) | string_invalid(name))
    return kwargs, name, bad


@FUZZ
@given(corrupted("typed"))
def test_one_bad_field_fails_naming_it(case):
    kwargs, name, bad = case
    with pytest.raises(ValueError) as err:
        ExperimentConfig(**{**kwargs, name: bad})
    assert_names(err.value, kebab(name), bad)


@FUZZ
@given(corrupted("string"))
def test_a_string_for_a_typed_field_fails_naming_it(case):
    """Constructor: a string is never a number or a bool (``"5"`` is not 5)."""
    kwargs, name, bad = case
    with pytest.raises(ValueError) as err:
        ExperimentConfig(**{**kwargs, name: bad})
    assert_names(err.value, kebab(name), bad)


@FUZZ
@given(corrupted("both"))
def test_from_mapping_rejects_bad_values_naming_the_key(case):
    kwargs, name, bad = case
    values = {kebab(k): v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_mapping({**values, kebab(name): bad})
    assert_names(err.value, kebab(name), bad)


@FUZZ
@given(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), misspelled(k))), st.integers(0, 10))
def test_unknown_keys_fail_with_the_nearest_valid_key(key_and_typo, value):
    key, typo = key_and_typo
    if typo.replace("_", "-") in KEYS:  # the edit made another valid key
        return
    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_mapping({typo: value})
    msg = assert_names(err.value, typo, value)
    assert "unknown config key" in msg
    near = re.search(r"did you mean '([^']+)'", msg)
    if len(key) >= 4:  # one edit of a key this long is always close enough for a suggestion
        assert near, msg
    if near:
        ratio = difflib.SequenceMatcher(None, near.group(1), typo).ratio()
        assert near.group(1) in KEYS and ratio >= difflib.SequenceMatcher(None, key, typo).ratio() - 1e-9


def test_unknown_choice_values_suggest_the_nearest_one():
    for kwargs, near in [
        ({"meta-gradient": "exactt"}, "exact"), ({"dataset": "mnits"}, "mnist"), ({"partition": "dirichelt"}, "dirichlet"),
        ({"model": "mlp-40"}, "mlp-40-40"), ({"vectorize": "vmpa"}, "vmap"), ({"memory-policy": "rest"}, "reset"),
        ({"algorithm": "perfedavg"}, "per-fedavg"), ({"eval-protocol": "one_step"}, "one-step"),
    ]:
        with pytest.raises(ValueError, match=rf"did you mean {near!r}"):
            ExperimentConfig.from_mapping(kwargs)


def test_a_key_given_twice_fails():
    with pytest.raises(ValueError, match=r"'num-rounds' is given twice.*'num_rounds'"):
        ExperimentConfig.from_mapping({"num-rounds": 3, "num_rounds": 4})


def test_true_is_not_one_and_integral_floats_are_not_integers():
    for key, value in [("num-clients", True), ("num-rounds", 3.0), ("seed", False), ("inner-lr", True), ("download", 1)]:
        with pytest.raises(ValueError, match=rf"^{key} must be .*got {value!r}$"):
            ExperimentConfig.from_mapping({key: value})


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_clients=7), "num-clients"),  # Fallah split: even
        (dict(num_clients=6, num_new_clients=1), "num-clients"),
        (dict(num_clients=10, clients_per_round=11), "clients-per-round"),
        (dict(num_clients=4, sampling_groups=5, clients_per_round=1), "sampling-groups"),
        (dict(num_clients=50, sampling_groups=4, clients_per_round=13), "clients-per-round"),
        (dict(num_clients=10, num_new_clients=2, num_nodes=13), "num-nodes"),
        (dict(dataset="sinewave", model="cnn"), "model"),
        (dict(partition="pathological", classes_per_client=11), "classes-per-client"),
        (dict(partition="pathological", classes_per_client=5, test_per_client=4), "test-per-client"),
        (dict(vectorize="vmap", meta_gradient="ggs"), "vectorize"),
    ],
)
def test_constraints_between_fields_name_the_field(kwargs, key):
    with pytest.raises(ValueError) as err:
        ExperimentConfig(**kwargs)
    assert_names(err.value, key, kwargs[key.replace("-", "_")])


def test_constraints_between_fields_accept_their_edges():
    ExperimentConfig(num_clients=10, clients_per_round=10, num_nodes=10)
    ExperimentConfig(dataset="sinewave", num_clients=7, clients_per_round=0)  # no Fallah split for sinewave
    ExperimentConfig(dataset="cifar100", partition="pathological", classes_per_client=20, train_per_client=20, test_per_client=20)
    ExperimentConfig(algorithm=C.FEDAVG, vectorize="vmap", meta_gradient="ggs")  # FedAvg has no meta-gradient
    assert ExperimentConfig(num_cpus=2).num_cpus == 2.0 and isinstance(ExperimentConfig(num_cpus=2).num_cpus, float)


# --- the command line --------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = sim_run.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


CLI_FIELDS = [n for n in INVALID_FIELDS if n != "algorithm"]  # the command line has --algorithms


@FEW
@given(st.sampled_from(CLI_FIELDS).flatmap(lambda n: st.tuples(st.just(n), string_invalid(n))))
def test_cli_rejects_bad_values_naming_the_flag(case):
    name, bad = case
    code, err = run_cli([f"--{kebab(name)}={bad}"])
    assert code == 2, err
    assert err.startswith("fedmeta-sim: error: ") and err.count("\n") == 1, err
    assert_names(ValueError(err), kebab(name), bad)


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--num-rounds", "0"], "num-rounds"), (["--momentum", "1.5"], "momentum"), (["--inner-lr", "nan"], "inner-lr"),
        (["--download", "maybe"], "download"), (["--num-clients", "2.0"], "num-clients"), (["--seed", "-1"], "seed"),
        (["--algorithms", "local-moml,fedavgg"], "algorithm"), (["--num-clients", "4", "--clients-per-round", "5"], "clients-per-round"),
        (["--meta-gradient", "ggs", "--vectorize", "vmap"], "vectorize"), (["--device", "gpu"], "device"),
    ],
)
def test_cli_examples(argv, key):
    code, err = run_cli(argv)
    assert code == 2 and key in err and err.startswith("fedmeta-sim: error:"), err


def test_cli_rejects_unknown_flags_with_the_nearest_one():
    assert run_cli(["--num-round", "3"])[0] == 2
    assert run_cli(["--num-rounds", "3", "--bogus"])[0] == 2
    for argv, near in [(["--num-round", "3"], "--num-rounds"), (["--momentun=0.5"], "--momentum"), (["--inner_lr", "1"], "--inner-lr")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            parse_cli(sim_run._parser(), argv)
        assert exit_.value.code == 2 and f"did you mean {near!r}" in err.getvalue() and argv[0].split("=")[0] in err.getvalue()
    assert parse_cli(sim_run._parser(), ["--num-rounds", "3"]).num_rounds == "3"


# --- [tool.flwr.app.config] and --run-config ---------------------------------------------------


def app_config() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_every_pyproject_key_parses_with_its_field_type():
    from fedmeta.dif_maml import DifMAMLConfig

    app = app_config()
    dif = app.pop("dif-maml")  # [tool.flwr.app.config.dif-maml]: DifMAMLConfig's fields (tuples as "low,high" strings)
    dif_types = {f.name.replace("_", "-"): type(f.default) for f in dataclasses.fields(DifMAMLConfig)}
    for key, value in dif.items():
        assert type(value) is (str if dif_types[key] is tuple else dif_types[key]), f"dif-maml.{key} = {value!r}"
    assert DifMAMLConfig.from_mapping(dif) == DifMAMLConfig()
    assert ExperimentConfig.from_mapping({**app, **{f"dif-maml.{k}": v for k, v in dif.items()}}) == ExperimentConfig.from_mapping(app)
    assert set(app) == set(KEYS)
    for key, value in app.items():
        assert type(value) is FIELDS[key.replace("-", "_")], f"{key} = {value!r} has the wrong TOML type for flwr's override check"
        ExperimentConfig.from_mapping({key: value})
    cfg = ExperimentConfig.from_mapping(app)
    assert cfg.to_dict() == {k: app[k] for k in KEYS}


@pytest.mark.parametrize(
    "override, key",
    [("num-rounds=0", "num-rounds"), ('dataset="mnits"', "dataset"), ("momentum=1.5", "momentum"), ("download=1", "download"),
     ("num-clients=true", "num-clients"), ("num-round=3", "num-round"), ("inner-lr=nan", "inner-lr"), ("local-steps=2.0", "local-steps")],
)
def test_run_config_overrides_are_validated(override, key):
    from flwr.common.config import parse_config_args

    with pytest.raises(ValueError) as err:
        ExperimentConfig.from_mapping({**app_config(), **parse_config_args([override])})
    assert key in str(err.value)


# --- wire configs (client side) ----------------------------------------------------------------

WIRE_CLASSES = (C.FedAvgConfig, C.PerFedAvgConfig, C.LocalMOMLConfig, C.EvalConfig)


def wire_invalid(cls: type, attr: str) -> st.SearchStrategy[Any]:
    """Invalid values a ConfigRecord can carry for ``attr`` of ``cls``."""
    kind = {f.name: type(f.default) for f in dataclasses.fields(cls)}[attr]
    containers = st.lists(st.integers(-5, 5), max_size=2) | st.binary(max_size=3)
    if kind is str:
        options = META_GRADIENTS if attr == "meta_gradient" else C.MEMORY_POLICIES
        return (st.text(max_size=8).filter(lambda s: s not in options) | st.integers(-5, 5) | st.booleans() | containers
                | st.sampled_from(options).flatmap(misspelled).filter(lambda s: s not in options))
    if kind is int:
        low = 0 if attr in ("eval_steps", "eval_shots") else 1
        return st.booleans() | st.floats() | st.text(max_size=4) | containers | st.integers(-(2**40), low - 1)
    low, closed, high = {"inner_lr": (0.0, True, None), "momentum": (0.0, False, 1.0)}.get(attr, (0.0, False, None))
    out = st.floats(max_value=low, allow_nan=False)
    if high:
        out |= st.floats(min_value=high, exclude_min=True)
    out = out.filter(lambda v: not in_range(v, low, closed, high))
    return st.booleans() | NON_FINITE | st.text(max_size=4) | containers | out


@st.composite
def wire_cases(draw):
    kwargs = draw(valid_configs())
    cfg = ExperimentConfig(**kwargs).with_nodes_for(3)
    cls = draw(st.sampled_from([C.ALGORITHM_CONFIGS[cfg.algorithm], C.EvalConfig]))
    if cls is C.EvalConfig:
        steps, shots = cfg.eval_setting
        good = C.EvalConfig(inner_lr=cfg.inner_lr, eval_steps=steps, eval_shots=shots)
    else:
        sk = cfg.strategy_kwargs()
        good = cls(**{f.name: sk[f.name] for f in dataclasses.fields(cls) if sk.get(f.name) is not None})
    record = {**good.to_wire(), C.ALGORITHM: cfg.algorithm, C.SEED: cfg.seed, C.SERVER_ROUND: 3, "user-key": "x"}
    return cls, good, record


@FUZZ
@given(wire_cases(), st.data())
def test_from_wire_rejects_a_corrupted_key_naming_it(case, data):
    cls, good, record = case
    assert cls.from_wire(ConfigRecord(record)) == good  # round trip, extra keys ignored
    attr = data.draw(st.sampled_from(sorted(cls.KEYS)))
    key = cls.KEYS[attr]
    bad = data.draw(wire_invalid(cls, attr))
    with pytest.raises(ValueError) as err:
        cls.from_wire(ConfigRecord({**record, key: bad}))
    msg = assert_names(err.value, key, bad)
    assert attr in msg


@FUZZ
@given(wire_cases(), st.data())
def test_from_wire_rejects_misspelled_known_keys(case, data):
    cls, _, record = case
    key = data.draw(st.sampled_from(sorted(cls.KEYS.values())))
    variant = data.draw(st.sampled_from([key.replace("-", "_"), key.upper(), key.title(), f" {key}"]).filter(lambda v: v != key))
    with pytest.raises(ValueError) as err:
        cls.from_wire(ConfigRecord({**record, variant: record[key]}))
    assert_names(err.value, variant, record[key])
    assert f"did you mean {key!r}" in str(err.value)


# --- strategies --------------------------------------------------------------------------------

STRATEGIES = (PerFedAvg, LocalMOML, FedAvg)


@FUZZ
@given(st.sampled_from(STRATEGIES).flatmap(
    lambda cls: st.tuples(st.just(cls), st.sampled_from(sorted(valid_strategy_kwargs(cls))).flatmap(
        lambda k: st.tuples(st.just(k), misspelled(k).map(lambda s: s.replace("-", "_")))))),
    st.integers(-(10**6), 10**6) | st.floats(allow_nan=False) | st.text(max_size=5))
def test_misspelled_strategy_kwargs_suggest_the_nearest_one(case, value):
    cls, (key, typo) = case
    valid = valid_strategy_kwargs(cls)
    if typo in valid or typo in FIXED_BY_STRATEGY:
        return
    with pytest.raises(ValueError) as err:
        check_strategy_kwargs(cls, {"num_clients": 10, typo: value})
    msg = assert_names(err.value, typo, value)
    near = re.search(r"did you mean '([^']+)'", msg)
    owned_elsewhere = any(typo in C.field_names(c) for c in C.ALGORITHM_CONFIGS.values())
    if len(key) >= 4 and not owned_elsewhere:
        assert near and near.group(1) in valid, msg


@pytest.mark.parametrize(
    "cls, kwargs, expected",
    [
        (PerFedAvg, {"momentum": 0.5}, "hyper-parameter of LocalMOMLConfig"),
        (FedAvg, {"meta_gradient": "ggs"}, "hyper-parameter of PerFedAvgConfig, LocalMOMLConfig"),
        (LocalMOML, {"meta_lr": 0.1}, "did you mean 'meta_gradient'|hyper-parameter of PerFedAvgConfig"),
        (PerFedAvg, {"fraction_train": 0.5}, "fraction_train .*cannot be passed"),
        (LocalMOML, {"min_train_nodes": 2}, "min_train_nodes .*cannot be passed"),
        (PerFedAvg, {"num_clients": True}, "num_clients must be an integer >= 1, got True"),
        (PerFedAvg, {"num_nodes": 2.0}, "num_nodes must be .*got 2.0"),
        (PerFedAvg, {"clients_per_round": "3"}, "clients_per_round must be .*got '3'"),
        (PerFedAvg, {"seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
        (PerFedAvg, {"evaluate_every": False}, "evaluate_every must be .*got False"),
        (PerFedAvg, {"node_wait_timeout": math.nan}, "node_wait_timeout must be .*got nan"),
        (PerFedAvg, {"new_clients": [1, True]}, r"new_clients must be .*got \[1, True\]"),
        (PerFedAvg, {"weighting": 3}, "weighting must be .*got 3"),
        (PerFedAvg, {"min_available_nodes": -1}, "min_available_nodes must be .*got -1"),
        (LocalMOML, {"kwargs": {"sampling_group": 2}}, "'sampling_group' .*did you mean 'sampling_groups'"),
    ],
)
def test_strategy_kwargs_examples(cls, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        check_strategy_kwargs(cls, {"num_clients": 10, **kwargs})


def test_check_strategy_kwargs_accepts_an_init_locals():
    def init(self, *, num_clients, clients_per_round=None, new_clients=(), memory_policy=None, **kwargs):
        return dict(locals(), __class__=LocalMOML)

    check_strategy_kwargs(LocalMOML, init(object(), num_clients=4, inner_lr=0.1, sampling_groups=2, weighted_by_key="n"))
    with pytest.raises(ValueError, match="did you mean 'inner_lr'"):
        check_strategy_kwargs(LocalMOML, init(object(), num_clients=4, inner_lrr=0.1))
    gen = (i for i in [1])  # a generator is not consumed by the check
    check_strategy_kwargs(LocalMOML, init(object(), num_clients=4, new_clients=gen))
    assert list(gen) == [1]


@FEW
@given(st.sampled_from(STRATEGIES), st.data())
def test_strategy_constructors_reject_bad_hyperparameters_naming_them(cls, data):
    """The hyper-parameters go to the config dataclass (no training starts: construction only)."""
    attr = data.draw(st.sampled_from(sorted(cls.hparams_cls.KEYS)))
    bad = data.draw(wire_invalid(cls.hparams_cls, attr) | st.none().filter(lambda _: attr != "memory_policy"))
    with pytest.raises(ValueError) as err:
        cls(num_clients=10, **{attr: bad})
    assert_names(err.value, attr, bad)


def test_strategy_constructors_use_check_strategy_kwargs():
    if "check_strategy_kwargs" not in inspect.getsource(MetaStrategy.__init__):
        pytest.skip("MetaStrategy.__init__ does not call check_strategy_kwargs yet")
    for cls, kwargs, match in [
        (PerFedAvg, {"inner_lrr": 0.1}, "did you mean 'inner_lr'"),
        (LocalMOML, {"momentun": 0.5}, "did you mean 'momentum'"),
        (FedAvg, {"local_step": 2}, "did you mean 'local_steps'"),
        (PerFedAvg, {"num_clients": True}, "num_clients"),
    ]:
        with pytest.raises(ValueError, match=match):
            cls(**{"num_clients": 10, **kwargs})
