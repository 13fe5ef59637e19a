"""fedmeta.extras: the table of optional packages matches pyproject, and a missing one is one line naming its extra."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from fedmeta.extras import EXTRAS, MissingExtra, need

ROOT = Path(__file__).resolve().parents[1]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_extra_of_the_table_is_in_pyproject_and_installs_the_module_it_names():
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, (module, _) in EXTRAS.items():
        assert extra in optional, f"pyproject's [project.optional-dependencies] has no {extra!r}"
        names = {_requirement_name(r) for r in optional[extra]}
        assert module.split(".")[0].replace("_", "-") in names, (extra, optional[extra])
    # and pyproject's package extras (not dev, docs or the bundle of all of them) are all in the table
    bundles = {extra for extra, reqs in optional.items() if all(r.startswith("fedmeta[") for r in reqs)}
    assert set(optional) - {"dev", "docs"} - bundles == set(EXTRAS)


def test_an_installed_extra_is_its_module():
    import flwr_datasets.partitioner
    import optuna

    assert need("tune", "fedmeta-tune") is optuna
    assert need("flwr-datasets", "x", "flwr_datasets.partitioner") is flwr_datasets.partitioner


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_a_missing_extra_is_one_line_naming_what_needs_it_and_the_extra(monkeypatch, extra):
    module, name = EXTRAS[extra]
    monkeypatch.setitem(sys.modules, module, None)  # what `import <module>` does where it is not installed
    with pytest.raises(MissingExtra) as err:
        need(extra, "the thing")
    assert str(err.value) == f"the thing needs {name}: pip install 'fedmeta[{extra}]'"
    assert isinstance(err.value, ImportError) and err.value.__cause__ is None
