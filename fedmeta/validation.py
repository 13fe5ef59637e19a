"""Checks of hyper-parameter values, shared by every entry point (configs, strategies, the CLI).

Each raises one ``ValueError`` whose message starts with the field's name and says what is
allowed: ``<name> must be <allowed>, got <value>``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Sequence


def check(name: str, ok: bool, allowed: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (not a bool) that is finite as a float (a huge int is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_choice(name: str, value: Any, options: Sequence[str]) -> None:
    """``value`` must be one of ``options``; a near miss names the nearest option."""
    if isinstance(value, str) and value in options:
        return
    near = difflib.get_close_matches(value, list(options), n=1) if isinstance(value, str) else []
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"{name} must be one of {list(options)}, got {value!r}{hint}")


def positive_int(name: str, value: Any) -> None:
    check(name, is_int(value) and value >= 1, "an integer >= 1", value)


def nonneg_int(name: str, value: Any) -> None:
    check(name, is_int(value) and value >= 0, "an integer >= 0", value)


__all__ = ["check", "check_choice", "is_finite", "is_int", "nonneg_int", "positive_int"]
