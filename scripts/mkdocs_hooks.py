"""MkDocs hooks for ``make docs`` (mkdocs.yml ``hooks:``).

fedmeta's subpackages live outside ``fedmeta/`` (``fedmeta.strategies`` in ``strategies/``, ``fedmeta.clients``
in ``clients/``, ``fedmeta.simulations`` in ``simulations/``; pyproject's ``package-dir``). mkdocstrings reads
the source without importing it, so before the build this hook lays the package out as Python sees it: a copy
of the sources under ``build/api-src/fedmeta`` (gitignored; remade by every build), which mkdocs.yml gives the
handler as its path. (Symbolic links would not do: Griffe follows them back to the real folders.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_SRC = ROOT / "build" / "api-src"
SUBPACKAGES = {"strategies": "strategies", "clients": "clients", "simulations": "simulations"}
"""``fedmeta.<name>``: the folder that holds it (pyproject.toml, ``[tool.setuptools.package-dir]``)."""


def lay_out_package(dest: Path = API_SRC) -> Path:
    """Copy ``fedmeta/`` and the three subpackages' sources into ``dest/fedmeta``; return ``dest``."""
    pkg = dest / "fedmeta"
    if pkg.exists():
        shutil.rmtree(pkg)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fedmeta", pkg, ignore=skip)
    for name, folder in SUBPACKAGES.items():
        shutil.copytree(ROOT / folder, pkg / name, ignore=skip)
    return dest


def on_startup(**kwargs):
    """Before the plugins' configs: mkdocstrings drops a search path that does not exist yet (a fresh clone)."""
    lay_out_package()


def on_config(config, **kwargs):
    lay_out_package()  # every build (``mkdocs serve`` rebuilds) sees the current sources
    return config
