"""Validation of the strategies' keyword arguments, before any of them is used.

``MetaStrategy.__init__`` hands hyper-parameters to its config dataclass and everything else to
Flower's ``FedAvg``, so a misspelled keyword would otherwise surface as a bare ``TypeError`` from
Flower (or, for a value of the wrong type, as a ``TypeError`` in a comparison, or not at all:
``True`` passes as 1). :func:`check_strategy_kwargs` turns each of these into one ``ValueError``
naming the argument, its value and what is allowed; an unknown name suggests the nearest valid one.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import math
import numbers
import reprlib
from dataclasses import fields
from typing import Any, Callable, Mapping

from fedmeta import config as C
from fedmeta import settings as S
from fedmeta.config import HP

FIXED_BY_STRATEGY = {
    "fraction_train": "every sampled client trains (use clients_per_round)",
    "fraction_evaluate": "every client is evaluated when evaluation runs (use evaluate_every)",
    "min_train_nodes": "derived from clients_per_round and num_nodes",
    "min_evaluate_nodes": "derived from num_nodes and evaluate_every",
}
"""Flower ``FedAvg`` arguments that ``MetaStrategy`` sets itself (passing one would clash)."""

_IGNORED = ("self", "kwargs", "__class__")
"""``locals()`` entries of an ``__init__`` that are not arguments."""

_INT64 = 2**63
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number, not a bool, not NaN (inf is allowed: wait forever)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return not math.isnan(float(value))
    except OverflowError:  # a huge int
        return True


def _int_ids(value: Any) -> bool:
    # only materialized collections: a generator given as new_clients must not be consumed here
    if not isinstance(value, (list, tuple, set, frozenset, range)):
        return True
    return all(_is_int(p) for p in value)


def _declared(setting: S.Setting, none_ok: str = "") -> tuple[Callable[[Any], bool], str]:
    """A hyper-parameter's check as declared (:class:`fedmeta.config.HP`); ``none_ok``: what ``None`` means, if allowed."""

    def ok(value: Any) -> bool:
        if value is None and none_ok:
            return True
        try:
            setting.check("", value)
        except ValueError:
            return False
        return True

    return ok, (f"None ({none_ok}) or " if none_ok else "") + setting.allowed


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # MetaStrategy's own arguments: types (MetaStrategy.__init__ checks the ranges)
    "num_clients": (_is_int, "an integer >= 1"),
    "num_nodes": (lambda v: v is None or _is_int(v), "None (one node per client), -1 (the federation's SuperNodes) or an integer >= 1"),
    "clients_per_round": (lambda v: v is None or _is_int(v), "None (all clients) or an integer >= 1"),
    "sampling_groups": (_is_int, "an integer >= 1"),
    "new_clients": (lambda v: isinstance(v, collections.abc.Iterable) and not isinstance(v, (str, bytes)) and _int_ids(v),
                    "an iterable of integer client ids"),
    "seed": _declared(HP.seed),
    "weighting": (lambda v: isinstance(v, str), "'uniform' or 'examples'"),
    "eval_steps": _declared(HP.eval_steps),
    "eval_shots": _declared(HP.eval_shots),
    "eval_lr": _declared(HP.eval_lr, "the inner_lr"),
    "lr_decay_at": (lambda v: isinstance(v, (list, tuple)) and all(_is_real(m) for m in v),
                    "a list or tuple of fractions of num_rounds in (0, 1)"),
    "lr_decay": _declared(HP.lr_decay),
    "evaluate_every": _declared(HP.evaluate_every),
    "node_wait_timeout": (lambda v: _is_real(v) and v > 0, "a number of seconds > 0"),
    # Flower FedAvg's
    "min_available_nodes": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "weighted_by_key": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "arrayrecord_key": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "configrecord_key": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "train_metrics_aggr_fn": (lambda v: v is None or callable(v), "None or a callable"),
    "evaluate_metrics_aggr_fn": (lambda v: v is None or callable(v), "None or a callable"),
}
"""Types (and, for the declared hyper-parameters, ranges) of the arguments that are not the config dataclass's."""


def _init_parameters(strategy_cls: type) -> set[str]:
    """Keyword parameters of every ``__init__`` in the MRO (MetaStrategy, a subclass's, Flower's)."""
    names: set[str] = set()
    for klass in strategy_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
    return names


def valid_strategy_kwargs(strategy_cls: type) -> set[str]:
    """Every keyword ``strategy_cls(...)`` accepts."""
    hp_fields = {f.name for f in fields(strategy_cls.hparams_cls)}
    return (_init_parameters(strategy_cls) | hp_fields) - set(FIXED_BY_STRATEGY)


def check_strategy_kwargs(strategy_cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise one ``ValueError`` for the first bad keyword argument of ``strategy_cls(**kwargs)``.

    ``kwargs`` may be the call's keyword arguments or an ``__init__``'s ``locals()`` (its
    ``self``/``__class__`` are skipped and its ``kwargs`` dict is merged in), so that
    ``check_strategy_kwargs(type(self), locals())`` as the first line of ``__init__`` sees every
    argument. Checks: unknown names (with the nearest valid one, or the algorithm whose
    hyper-parameter it is), arguments the strategy sets itself, and the types of the
    non-hyper-parameter arguments (``True`` is not an integer). Hyper-parameter values and ranges
    are left to the config dataclass (:mod:`fedmeta.config`), which names them the same way.
    """
    given = {k: v for k, v in kwargs.items() if k not in _IGNORED}
    extra = kwargs.get("kwargs")
    if isinstance(extra, Mapping):
        given.update(extra)
    name = strategy_cls.__name__
    valid = valid_strategy_kwargs(strategy_cls)
    for key, value in given.items():
        shown = _short.repr(value)
        if key in FIXED_BY_STRATEGY:
            raise ValueError(f"{key} (= {shown}) cannot be passed to {name}: {FIXED_BY_STRATEGY[key]}")
        if key in valid:
            continue
        owners = [cls.__name__ for cls in C.ALGORITHM_CONFIGS.values() if key in {f.name for f in fields(cls)}]
        near = difflib.get_close_matches(str(key), sorted(valid), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        why = f" (a hyper-parameter of {', '.join(owners)}, not of {strategy_cls.hparams_cls.__name__})" if owners else ""
        raise ValueError(f"unknown keyword argument {key!r} (= {shown}) of {name}{why}{hint} "
                         f"(valid: {', '.join(sorted(valid))})")
    for key, (ok, allowed) in _TYPES.items():
        if key in given and not ok(given[key]):
            raise ValueError(f"{key} must be {allowed}, got {_short.repr(given[key])}")
