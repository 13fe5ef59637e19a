"""fedmeta uses only Flower's public API: no `_`-prefixed Flower module, name or inherited attribute.

A private name of Flower's can change in any release (flwr 1.41 -> 1.42 moved several); the supported
range in pyproject.toml is the range the suite ran against, both ends of it in every `make test`."""

from __future__ import annotations

import ast
from pathlib import Path

import flwr.serverapp.strategy as flower_strategies

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("fedmeta", "strategies", "clients", "simulations", "bench", "scripts") for p in (ROOT / d).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_flower_import():
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
                parts = node.module.split(".")
                names = [a.name for a in node.names]
                if any(_private(p) for p in parts) or "strategy_utils" in parts or any(_private(n) for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {', '.join(names)}")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names
                              if a.name.split(".")[0] == "flwr" and any(_private(p) or p == "strategy_utils" for p in a.name.split("."))]
    assert not offenders, "\n".join(offenders)


def test_strategies_use_no_private_attribute_of_flowers_strategies():
    """No ``self._x`` / ``super()._x`` where ``_x`` is a private attribute of a Flower strategy class."""
    flower_private = {n for cls in (flower_strategies.Strategy, flower_strategies.FedAvg) for n in dir(cls) if _private(n)}
    assert flower_private, "Flower's strategies have private helpers; the check below must look for them"
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}"
        for path in SOURCES
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr in flower_private
    ]
    assert not offenders, "\n".join(offenders)


def test_the_supported_flower_range_is_pinned():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [flwr] = [d for d in deps if d.startswith("flwr")]
    assert flwr == "flwr[simulation]>=1.39,<1.43", flwr  # 1.39 (make test runs the unit tests there) .. 1.42 (.venv)
