"""Issue 5, gRPC: a real deployment with flwr 1.39, whose SuperNodes talk gRPC (``grpc-rere``).

SuperLink + 3 SuperNodes on 127.0.0.1 from the flwr 1.39 venv in build/flwr139 (built and cached by
scripts/build_flwr_venv.py through the ``flwr139_bin`` fixture), 2 rounds of cross-silo LocalMOML on
Fashion-MNIST partitions, launched by :class:`fedmeta.simulations.deploy.LocalDeployment`; one SuperNode
runs with ``--isolation process`` (its executor a process of its own), the other two with ``subprocess``.

The transport is checked on the sockets, not only on the command lines: the SuperLink listens on a
separate gRPC Fleet API port, every SuperNode holds an established TCP connection to that port and
none to the SuperLink's HTTP port (with flwr >= 1.40 they would talk HTTP to that one port).

Not marked slow or skipped: ``make test`` (and CI) run it. About 1 minute with a cached venv on 2
cores, plus about 20-60 s to build the venv from scratch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.simulations.deploy import clean_environ

ROOT = Path(__file__).resolve().parents[1]
FLWR = "1.39.0"
LISTEN, ESTABLISHED = "0A", "01"  # TCP states in /proc/net/tcp{,6}
pytestmark = [pytest.mark.deploy, pytest.mark.flwr139]


# --- sockets from /proc (no dependency on ss/netstat) --------------------------------------------


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """Every TCP socket of this network namespace: (local port, remote port, state, inode)."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3], int(f[9])))
    return rows


def tcp_of(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of the TCP sockets process ``pid`` holds."""
    mine = _socket_inodes(pid)
    return [(lp, rp, st) for lp, rp, st, inode in _tcp_sockets() if inode in mine]


def listening_ports() -> set[int]:
    return {lp for lp, _, st, _ in _tcp_sockets() if st == LISTEN}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- the venv ---------------------------------------------------------------------------------------


def test_flwr139_venv_is_cached_and_has_its_own_flwr_and_grpc(flwr139_bin):
    """The fixture built (or found) the venv; a second build is a cache hit; flwr 1.39 and its own
    grpcio/protobuf win over the main venv's, torch comes from the main venv; fedmeta's apps import."""
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_flwr_venv.py"), "--flwr", FLWR,
                            "--dest", str(flwr139_bin.parent)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "cached" in again.stderr  # a cache hit: nothing rebuilt
    code = (
        "import importlib.metadata as md, flwr, grpc, google.protobuf, torch, fedmeta\n"
        "from fedmeta.simulations.apps import server_app, client_app\n"
        "print(flwr.__version__, md.version('flwr'), grpc.__file__, google.protobuf.__file__, torch.__file__, fedmeta.__file__, sep='|')\n"
    )
    out = subprocess.run([str(flwr139_bin / "python"), "-c", code], capture_output=True, text=True, cwd="/", timeout=300,
                         env=clean_environ())  # Ray, started by earlier tests, exports PYTHONPATH
    assert out.returncode == 0, out.stderr
    version, dist_version, grpc_file, pb_file, torch_file, fedmeta_file = out.stdout.strip().split("|")
    venv = str(flwr139_bin.parent)
    assert version == dist_version == FLWR
    assert grpc_file.startswith(venv) and pb_file.startswith(venv)
    assert not torch_file.startswith(venv)  # shared with the main venv, not copied
    assert fedmeta_file.startswith(str(ROOT))


# --- the deployment ----------------------------------------------------------------------------------


ISOLATIONS = ["subprocess", "process", "subprocess"]
"""Both isolation modes in one deployment: node 1's executor is a ``flower-superexec`` of its own, nodes 0 and 2
start theirs as children."""


def test_grpc_deployment_local_moml_cross_silo_three_nodes(flwr139_bin, deployment):
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    dep = deployment.start(3, flwr_bin=flwr139_bin, startup_timeout=120, stop_timeout=15, isolation=ISOLATIONS)
    assert dep.version == FLWR and dep.transport.name == "grpc-rere"
    assert dep.fleet_port != dep.port  # gRPC Fleet API on a port of its own

    connections: dict[int, list[tuple[int, int, str]]] = {}
    link = dep.superlink
    assert link is not None
    pids = dep.live_processes()
    link_log = link.log.read_text(errors="replace")
    assert f"Starting Fleet API (gRPC-rere) on 127.0.0.1:{dep.fleet_port}" in link_log, link_log[-3000:]
    assert (dep.fleet_port, 0, LISTEN) in tcp_of(link.pid)
    nodes = [p for p in dep.supernodes if p is not None]
    assert len(nodes) == 3 and all(n.popen.poll() is None for n in nodes)
    executors = [e for e in dep.executors if e is not None]
    assert [e is not None for e in dep.executors] == [mode == "process" for mode in ISOLATIONS]  # a flower-superexec of its own
    assert all(e.popen.poll() is None and e.argv[0].startswith(str(flwr139_bin)) for e in executors)
    for n, mode in zip(nodes, ISOLATIONS):
        assert "--grpc-rere" in n.argv and dep.fleet_address in n.argv
        assert ("--isolation" in n.argv) == (mode == "process")
        log = n.log.read_text(errors="replace")
        assert f"insecure channel to {dep.fleet_address}" in log and "SuperNode ID:" in log, log[-3000:]

    results = dep.run(
        {"algorithm": "local-moml", "partition": "dirichlet", "num-rounds": 2, "local-steps": 1, "evaluate-every": 2},
        timeout=480,
    )
    # The gRPC channels are long-lived: still established after the run, one per SuperNode.
    for n in nodes:
        connections[n.pid] = tcp_of(n.pid)
    pids |= dep.live_processes()
    seconds = dep.runs[-1].seconds
    deployment.stop()

    # --- transport: every SuperNode talks to the gRPC fleet port, none to the HTTP API port ---------
    for pid, conns in connections.items():
        to_link = [(lp, rp, st) for lp, rp, st in conns if rp in (dep.fleet_port, dep.port)]
        assert any(rp == dep.fleet_port and st == ESTABLISHED for _, rp, st in to_link), (pid, conns, dep.fleet_port)
        assert not any(rp == dep.port for _, rp, _ in to_link), (pid, conns, dep.port)

    # --- every process stopped, every port released -------------------------------------------------
    assert pids and not [p for p in pids if _alive(p)]
    assert not dep.live_processes()
    assert not listening_ports() & {dep.port, dep.fleet_port, *dep.node_ports}

    # --- results: 2 rounds of cross-silo LocalMOML on 3 partitions ------------------------------------
    assert results["config"]["algorithm"] == "local-moml"
    assert results["config"]["num-clients"] == 3 and results["config"]["clients-per-round"] == 0
    assert sorted(results["train"], key=int) == ["1", "2"]
    assert sorted(results["evaluate"], key=int) == ["2"] and results["final_round"] == 2
    assert results["trained_partitions"] == {"1": [0, 1, 2], "2": [0, 1, 2]}
    assert sorted(results["clients"], key=int) == ["0", "1", "2"]
    for rnd in ("1", "2"):
        train = results["train"][rnd]
        assert {"num-examples", "train-loss", "num-gradients", "num-clients"} <= set(train)
        assert train["num-clients"] == 3 and train.get("num-failures", 0) == 0
    final = results["final"]
    assert {"accuracy-before", "accuracy-after", "loss-before", "loss-after"} <= set(final)
    assert all(0.0 <= final[k] <= 1.0 for k in ("accuracy-before", "accuracy-after"))
    assert final["num-clients"] == 3 and final.get("num-failures", 0) == 0
    assert Path(dep.runs[-1].results_path).with_suffix(".csv").is_file()
    assert seconds is not None

    # flwr 1.39 reads the SuperLink connection from $FLWR_HOME/config.toml: pyproject.toml untouched.
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject
