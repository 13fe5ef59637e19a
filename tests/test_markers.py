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


CRASHING = '''
import os, pathlib

def test_dies_once(request):
    mark = pathlib.Path(os.environ["DEMO_MARK"])
    # rerunfailures tells the controller this test's reruns as it starts, without waiting for an answer; a question
    # on the same connection returns once the controller has it (a worker that dies at once could outrun it)
    assert request.config.failures_db.get_test_reruns(request.node.nodeid) == 1
    if not mark.exists():
        mark.write_text("died")
        os._exit(1)  # the worker process dies mid-test, no traceback

def test_fails():
    assert 1 == 2
'''


@pytest.mark.subprocess
def test_make_test_runs_a_test_whose_worker_died_once_more_and_never_a_failed_one(tmp_path):
    import os
    import re
    import shlex
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    flags = shlex.split(re.search(r"^CRASH_RERUN := (.*)$", makefile, re.M).group(1))
    assert "$(CRASH_RERUN)" in re.search(r"^PYTEST_ARGS \?= (.*)$", makefile, re.M).group(1)
    (tmp_path / "test_demo.py").write_text(CRASHING)
    env = {**os.environ, "DEMO_MARK": str(tmp_path / "died")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "worksteal", *flags, "test_demo.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300).stdout
    assert "1 failed, 1 passed, 1 rerun" in out, out
    assert "RERUN test_demo.py::test_dies_once" in out and "FAILED test_demo.py::test_fails" in out
