"""The tiers hold: a test without a slow marker cannot start a process or Ray (tests/conftest.py), so
``make test-fast`` never runs slow work; ``make test`` runs everything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import SLOW_MARKERS


def test_an_unmarked_test_cannot_start_a_process():
    with pytest.raises(RuntimeError, match=r"test_markers.py::test_an_unmarked_test_cannot_start_a_process starts a process "
                                           r"but has none of the markers ray, deploy, subprocess, flwr139"):
        subprocess.run([sys.executable, "-c", "pass"])


@pytest.mark.subprocess
def test_a_marked_test_can():
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_every_slow_marker_is_declared():
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert set(SLOW_MARKERS) <= {m.split(":")[0] for m in declared}
