import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Quieter Ray in the simulation tests; set before Ray is imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

_ROOT = Path(__file__).resolve().parents[1]

# matplotlib lists the system's fonts (`fc-list`, a process) the first time it draws on a machine without its font
# cache; build the cache here, before the fast tests' guard below refuses processes, so that a plotting test does
# not fail or pass by which test happened to draw first.
import matplotlib.font_manager  # noqa: E402,F401

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


# --- one Ray for the session's in-process simulations ------------------------------------------------


SESSION_RAYS_ENV = "FEDMETA_TEST_SESSION_RAYS"
"""A directory, made by the pytest process that runs the session (pytest-xdist's controller) and inherited by its
workers, in which each notes the directory of its session's Ray."""


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        os.environ[SESSION_RAYS_ENV] = tempfile.mkdtemp(prefix="fedmeta-session-rays-")


@pytest.fixture(scope="session")
def _session_ray():
    """A one-raylet Ray on 127.0.0.1 with this machine's cores (``ray start --head``, what Ray started in-process
    would have), up for the whole session and stopped by pid at its end (:class:`LocalCluster`). Its directory is
    noted for :func:`pytest_sessionfinish`, which stops it if this process dies first."""
    from fedmeta.simulations.cluster import LocalCluster

    local = LocalCluster(raylets=1, cpus_per_raylet=os.cpu_count() or 1, hidden=False)
    with local:
        (Path(os.environ[SESSION_RAYS_ENV]) / local.root.name).write_text(str(local.root))
        yield local
    assert not local.left, f"Ray processes left behind: {local.left}"


def pytest_sessionfinish(session):
    """In the process that ran the session (pytest-xdist's controller, after its workers): stop, by pid, the session
    Ray of a worker that died before its fixture could (``make test`` runs a crashed worker's test once more, with
    pytest-rerunfailures), so that no process the suite started outlives it."""
    if hasattr(session.config, "workerinput") or not os.environ.get(SESSION_RAYS_ENV):
        return
    from fedmeta.simulations.cluster import local_cluster_processes
    from fedmeta.simulations.processes import terminate

    notes = Path(os.environ[SESSION_RAYS_ENV])
    for entry in sorted(notes.glob("*")):
        root = entry.read_text()
        if pids := local_cluster_processes(root):
            left = terminate(pids, timeout=5.0)
            print(f"\nconftest: stopped {len(pids) - len(left)} processes of the session Ray in {root}, left by a pytest "
                  f"process that died" + (f"; still alive: {sorted(left)}" if left else ""))
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(notes, ignore_errors=True)


@pytest.fixture
def ray_runner(request, _session_ray, monkeypatch):
    """Simulations in this test attach to the session's Ray instead of starting and stopping one each.

    ``RAY_ADDRESS`` is set for the test, so fedmeta's :func:`~fedmeta.simulations.run.simulate` (through
    ``cluster.connect``) and Flower's engine (``ray.init`` reads it) attach, and detach at the end of each run: Ray's
    start-up and shutdown (about 4 s a run on this machine) are paid once. Every run is still a Flower simulation
    on Ray with its own job, actors and object store entries. Tests that check what a user's first run does
    (Ray started in the process, a CLI in a process of its own) do not use it; a subprocess the test starts inherits
    the address unless its environment drops it. Requires the ``ray`` marker."""
    assert request.node.get_closest_marker("ray"), f"{request.node.nodeid} uses ray_runner without the ray marker"
    monkeypatch.setenv("RAY_ADDRESS", _session_ray.address)
    return _session_ray


# --- real deployments ---------------------------------------------------------------------------------


@pytest.fixture
def deployment(request, tmp_path):
    """Start real deployments for this test (:class:`fakes.Deployments`: ``deployment.start(3, tls=True)``); at the
    end every process they started is stopped and checked gone, by pid. Requires the ``deploy`` marker."""
    from fakes import Deployments

    assert request.node.get_closest_marker("deploy"), f"{request.node.nodeid} uses deployment without the deploy marker"
    deployments = Deployments(tmp_path)
    yield deployments
    deployments.stop()
