"""Each hyper-parameter declared once: its type, its range, its paper symbol, its default and its help.

A :class:`Setting` is the declaration; :meth:`Setting.field` makes it a dataclass field; :class:`Settings` is the
base of every config dataclass (the algorithms' configs, the personalized evaluation's, the experiment's, the
centralized runner's and Dif-MAML's). From the declarations alone it validates every field on construction (one
``ValueError`` naming the field, the value and what is allowed), parses mappings (pyproject keys, ``--run-config``,
the wire's ``ConfigRecord``) and command lines, and documents the flags. A field's wire key and pyproject key are
its name in kebab case (``inner_lr`` -> ``inner-lr``), its flag ``--inner-lr``.

The hyper-parameters that several configs share (the step sizes, the batch sizes, the estimator's settings, the
evaluation's) are declared at the bottom of this module, once, and every config that has one uses that
declaration (a config whose paper uses another default passes it to :meth:`Setting.field`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import numbers
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

_INT64 = 2**63
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def kebab(name: str) -> str:
    return name.replace("_", "-")


NO_DEFAULT: Any = type("NoDefault", (), {"__repr__": lambda self: "NO_DEFAULT"})()
"""A setting without a default of its own (each config gives one)."""


def _anything(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter: ``kind`` (``bool``, ``int``, ``float``, ``str`` or ``tuple``), the test ``ok`` of a value
    of that kind and what is allowed."""

    kind: type
    allowed_: str | Callable[[], str]
    """What is allowed, as the error message says it (``"a finite number > 0"``); a function for a choice among a
    registry's names (the registry can grow after import)."""
    ok: Callable[[Any], bool] = _anything
    symbol: str = ""
    """The paper's symbol (``alpha``, ``K0``), shown in error messages and in the flag's help."""
    help: str = ""
    default: Any = NO_DEFAULT
    choices: Callable[[], Sequence[str]] | None = None
    """A string setting's allowed values (a function: registries can grow after import)."""
    from_text: Callable[[Any], Any] | None = None
    """How a command-line string (or a pyproject list) becomes a value, for kinds other than bool/int/float/str."""

    @property
    def allowed(self) -> str:
        return self.allowed_() if callable(self.allowed_) else self.allowed_

    def field(self, default: Any = MISSING, *, help: str | None = None, symbol: str | None = None) -> Any:
        """This setting as a dataclass field (``default``, ``help``, ``symbol``: the config's own, where its paper
        differs)."""
        changes = {k: v for k, v in (("help", help), ("symbol", symbol)) if v is not None}
        setting = dataclasses.replace(self, **changes) if changes else self
        value = self.default if default is MISSING else default
        value = MISSING if value is NO_DEFAULT else value
        if isinstance(value, (list, dict, set)):
            raise TypeError("mutable defaults are not settings")
        return dataclasses.field(default=value, metadata={"setting": setting})

    def check(self, label: str, value: Any) -> Any:
        """``value`` type-checked (numpy scalars become Python ones, ints become floats for a float setting) and
        range-checked, or one ``ValueError``: ``<label> must be <allowed>, got <value>``."""
        typed = self._typed(label, value)
        if not self.ok(typed):
            near = difflib.get_close_matches(value, list(self.choices()), n=1) if self.choices and isinstance(value, str) else []
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{label} must be {self.allowed}, got {value!r}{hint}")
        return typed

    def _typed(self, label: str, value: Any) -> Any:
        bad = ValueError(f"{label} must be {self.allowed}, got {value!r}")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise bad
        if self.kind is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                if -_INT64 <= int(value) < _INT64:
                    return int(value)
                raise ValueError(f"{label} must be an integer that fits in 64 bits, got {value!r}")
            raise bad
        if self.kind is float:
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if math.isfinite(number):
                    return number
            raise bad
        if self.kind is str:
            if isinstance(value, str):
                return value
            raise bad
        if not isinstance(value, self.kind):
            raise bad
        return value

    def parse(self, label: str, text: str) -> Any:
        """A command-line / ``--run-config`` string as a value of this setting's kind (not range-checked)."""
        if self.from_text is not None:
            try:
                return self.from_text(text)
            except (ValueError, TypeError):
                raise ValueError(f"{label} must be {self.allowed}, got {text!r}") from None
        if self.kind is str:
            return text
        stripped = text.strip()
        if self.kind is bool:
            if stripped.lower() in _TRUE + _FALSE:
                return stripped.lower() in _TRUE
            raise ValueError(f"{label} must be true or false (or one of {list(_TRUE[1:] + _FALSE[1:])}), got {text!r}")
        if self.kind is int:
            try:
                return int(stripped, 10)
            except ValueError:
                raise ValueError(f"{label} must be {self.allowed}, got {text!r}") from None
        try:
            number = float(stripped)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{label} must be {self.allowed}, got {text!r}")
        return number

    def describe(self) -> str:
        """The flag's help: what it is, the paper's symbol, what is allowed."""
        symbol = f"{self.symbol}: " if self.symbol else ""
        return f"{symbol}{self.help} ({self.allowed})".strip()


def setting_of(f: dataclasses.Field) -> Setting | None:
    return f.metadata.get("setting")


def union(name: str, configs: Sequence[type], *, skip: Sequence[str] = ()) -> type:
    """A frozen :class:`Settings` dataclass named ``name`` with every setting field of ``configs`` (but ``skip``), each
    declared as in the first config that has it: a config holding several algorithms' hyper-parameters. Configs that
    share a field must agree on its kind and default."""
    found: dict[str, dataclasses.Field] = {}
    for config in configs:
        for f in fields(config):
            s = setting_of(f)
            if s is None or f.name in skip:
                continue
            if f.name in found:
                first = found[f.name]
                if (setting_of(first).kind, first.default) != (s.kind, f.default):  # type: ignore[union-attr]
                    raise TypeError(f"{config.__name__}.{f.name} is declared unlike in another config: "
                                    f"{first.default!r} vs {f.default!r}")
                continue
            found[f.name] = f
    specs = [(n, f.type, dataclasses.field(default=f.default, metadata=f.metadata)) for n, f in found.items()]
    return dataclasses.make_dataclass(name, specs, bases=(Settings,), frozen=True)


@functools.cache
def _settings(cls: type) -> dict[str, Setting]:
    return {f.name: s for f in fields(cls) if (s := setting_of(f)) is not None}


class Settings:
    """Base of the config dataclasses: validation, parsing and flags from the fields' :class:`Setting` s."""

    KEY_LABELS: ClassVar[bool] = False
    """How errors name a field: by key (``inner-lr``, for configs read from pyproject and the command line) or by
    attribute and symbol (``inner_lr (alpha)``, for configs built in Python)."""

    def __post_init__(self) -> None:
        for name, s in self.settings().items():
            try:
                object.__setattr__(self, name, s.check(name, getattr(self, name)))
            except ValueError as err:  # every message starts with the name: say it as this config labels it
                raise ValueError(self.label(name) + str(err)[len(name):]) from None

    @classmethod
    def settings(cls) -> dict[str, Setting]:
        """Field name -> its setting, in field order (not to be modified)."""
        return _settings(cls)

    @classmethod
    def label(cls, name: str) -> str:
        if cls.KEY_LABELS:
            return kebab(name)
        s = cls.settings().get(name)
        return f"{name} ({s.symbol})" if s is not None and s.symbol else name

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, what: str = "config key", skip: Callable[[str], bool] = lambda key: False):
        """Parse kebab-case (or snake_case) keys, as from pyproject, ``--run-config`` or the command line; string
        values of typed fields are parsed with the field's kind. Every problem is one ``ValueError`` naming the key,
        the value and what is allowed; an unknown key suggests the nearest valid one. Keys for which ``skip`` is true
        are ignored."""
        known = cls.settings()
        kwargs: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for key, value in values.items():
            text = key if isinstance(key, str) else repr(key)
            if skip(text):
                continue
            name = text.replace("-", "_")
            if name not in known:
                options = sorted(kebab(k) for k in known)
                near = difflib.get_close_matches(kebab(text), options, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown {what} {text!r} (value {value!r}){hint} (valid keys: {', '.join(options)})")
            if name in spelled:
                raise ValueError(f"{what} {kebab(name)!r} is given twice, as {spelled[name]!r} and {text!r} (value {value!r})")
            spelled[name] = text
            s = known[name]
            kwargs[name] = s.parse(cls.label(name), value) if isinstance(value, str) or s.from_text else value
        return cls(**kwargs)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, skip: Sequence[str] = (), defaults: str | None = None) -> None:
        """A ``--<key>`` flag per field, its help from the setting (values are parsed by :meth:`from_mapping`; an unset
        flag is ``None``; ``--flag`` alone is ``--flag true``). ``defaults``: where the defaults come from, when not
        from this class (a pyproject)."""
        for name, s in cls.settings().items():
            if name in skip:
                continue
            default = getattr(cls, name)
            shown = defaults or (str(default).lower() if isinstance(default, bool) else repr(default))
            extra = dict(nargs="?", const="true", metavar="BOOL") if s.kind is bool else dict(metavar=s.kind.__name__.upper())
            parser.add_argument(f"--{kebab(name)}", dest=name, default=None, help=f"{s.describe()} (default: {shown})", **extra)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# --- the ranges ---------------------------------------------------------------------------------


def int_at_least(low: int, why: str = "", **kw: Any) -> Setting:
    return Setting(int, f"an integer >= {low}{why}", lambda v: v >= low, **kw)


def number_above(low: float, why: str = "", **kw: Any) -> Setting:
    return Setting(float, f"a finite number > {low:g}{why}", lambda v: v > low, **kw)


def number_at_least(low: float, why: str = "", **kw: Any) -> Setting:
    return Setting(float, f"a finite number >= {low:g}{why}", lambda v: v >= low, **kw)


def fraction(**kw: Any) -> Setting:
    """A number in (0, 1]."""
    return Setting(float, "a number in (0, 1]", lambda v: 0 < v <= 1, **kw)


def choice(options: Callable[[], Sequence[str]], *, empty_ok: bool = False, **kw: Any) -> Setting:
    """One of ``options()`` (or empty, meaning "the default", when ``empty_ok``)."""
    return Setting(str, lambda: ("empty or " if empty_ok else "") + f"one of {list(options())}",
                   lambda v: (empty_ok and v == "") or v in options(), choices=options, **kw)


def text(help: str = "", **kw: Any) -> Setting:
    return Setting(str, "a string", help=help, **kw)


def flag(help: str = "", **kw: Any) -> Setting:
    return Setting(bool, "true or false", help=help, **kw)
