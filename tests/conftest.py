import os
import subprocess
import sys
from pathlib import Path

import pytest

# Quieter Ray in the simulation tests; set before Ray is imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

_ROOT = Path(__file__).resolve().parents[1]

SLOW_MARKERS = ("ray", "deploy", "subprocess", "flwr139")
"""A test that starts Ray or any process carries one of these (pyproject's markers); ``make test-fast`` leaves
them out. :func:`_slow_work_needs_a_marker` fails a test that starts either without one."""


@pytest.fixture(autouse=True)
def _slow_work_needs_a_marker(request, monkeypatch):
    """In a test without a :data:`SLOW_MARKERS` marker, starting a process (``subprocess.Popen``, which
    ``subprocess.run`` and the launchers use) or Ray (``ray.init``, which Flower's simulation engine calls)
    raises, naming the test and the markers, so that the fast tier never runs slow work by accident."""
    if any(request.node.get_closest_marker(m) for m in SLOW_MARKERS):
        yield
        return
    test = request.node.nodeid

    def refuse(what: str):
        def start(*args, **kwargs):
            raise RuntimeError(f"{test} starts {what} but has none of the markers {', '.join(SLOW_MARKERS)}: mark it "
                               "(pyproject.toml lists them; make test-fast leaves marked tests out)")
        return start

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("a process"))
    ray = sys.modules.get("ray")
    if ray is not None:
        monkeypatch.setattr(ray, "init", refuse("Ray"))
    yield


@pytest.fixture(scope="session")
def flwr139_bin() -> Path:  # tests using it carry the flwr139 marker
    """``bin/`` of the flwr 1.39 (gRPC) venv, built by scripts/build_flwr_venv.py when missing.

    Cached in build/flwr139 (a stamp file; about 20 s from scratch, instant when cached). A failed
    build is an error, never a skip.
    """
    proc = subprocess.run(
        [sys.executable, str(_ROOT / "scripts" / "build_flwr_venv.py"), "--flwr", "1.39.0",
         "--dest", str(_ROOT / "build" / "flwr139")],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"building build/flwr139 failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return Path(proc.stdout.strip().splitlines()[-1]) / "bin"
