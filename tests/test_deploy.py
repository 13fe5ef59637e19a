"""Issue 5: real deployments on 127.0.0.1 with the current flwr (HTTP transport), launched by
:class:`fedmeta.simulations.deploy.LocalDeployment` -- the commands docs/deployment.md shows -- through the
``deployment`` fixture (tests/conftest.py).

(a) SuperLink + 3 SuperNodes with TLS (self-signed certificates), a SuperNode without the CA refused, and
    2 rounds of cross-silo LocalMOML on Fashion-MNIST partitions compared with the same config in
    simulation; (b) 2 SuperNodes without TLS hosting 6 clients, one of them killed after round 1 and
    restarted, compared likewise; (c) a SuperNode killed after round 1 and restarted with the same node
    config and data directory continues from the personalized model it saved on disk (``subprocess``
    isolation in (b), ``process`` isolation in (c)); (d) a SuperNode facing an unreachable SuperLink exits
    with a clear message in bounded time. After each test, no process it started is alive (by PID, by the
    deployment's FLWR_HOMEs, and as descendants of pytest).

About 2.5 minutes on 2 cores: every message runs in a fresh ClientApp process, and an idle SuperNode
polls the SuperLink every 3 s (Flower's fixed interval).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fakes import descendants_of_pytest
from fedmeta import config as C
from fedmeta.simulations import deploy, flwr_processes
from fedmeta.simulations.deploy import HOST, LocalDeployment

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.deploy

TINY = {
    "algorithm": "local-moml",
    "dataset": "fashion-mnist",
    "partition": "dirichlet",  # the Fallah split needs an even number of clients
    "train-per-client": 60,
    "test-per-client": 20,
    "num-rounds": 2,
    "local-steps": 1,
    "evaluate-every": 2,  # evaluate once, after the last round
    "clients-per-round": 0,  # cross-silo
}


# --- helpers -----------------------------------------------------------------------------------------


def _node_received(proc: deploy.Process, message_type: str) -> bool:
    """The SuperNode's log since its (re)start shows that it pulled a ``message_type`` message."""
    return f"Receiving: {message_type} message" in proc.log.read_text(errors="replace")[proc.log_offset :]


def _data_dirs(tmp_path: Path, n: int) -> list[Path]:
    """One data directory per node, holding (links to) the Fashion-MNIST files found on this machine."""
    from fedmeta.data import locate_dataset

    raw = locate_dataset("fashion-mnist") / "FashionMNIST" / "raw"
    dirs = []
    for i in range(n):
        d = tmp_path / f"data-{i}"
        (d / "FashionMNIST").mkdir(parents=True)
        (d / "FashionMNIST" / "raw").symlink_to(raw, target_is_directory=True)
        dirs.append(d)
    return dirs


def _metric_keys(results: dict) -> dict:
    return {
        "train_rounds": sorted(results["train"], key=int),
        "train_keys": {r: sorted(m) for r, m in results["train"].items()},
        "evaluate_rounds": sorted(results["evaluate"], key=int),
        "evaluate_keys": {r: sorted(m) for r, m in results["evaluate"].items()},
        "final_keys": sorted(results["final"]),
        "client_train_keys": {r: {p: sorted(m) for p, m in c.items()} for r, c in results["client_train"].items()},
        "trained_partitions": results["trained_partitions"],
        "clients": sorted(results["clients"], key=int),
        "final_round": results["final_round"],
    }


def _per_round(results: dict) -> float:
    rounds = results["round_seconds"]
    return sum(rounds.values()) / len(rounds)


# --- (a) + (b): TLS, a SuperNode without the CA refused, and the run compared with simulation ---------


@pytest.mark.ray  # the simulation it is compared with
def test_tls_deployment_of_three_nodes_refuses_a_node_without_the_ca_and_matches_simulation(ray_runner, deployment, tmp_path,
                                                                                            record_property):
    from fedmeta.simulations.config import ExperimentConfig
    from fedmeta.simulations.run import simulate

    pyproject = (ROOT / "pyproject.toml").read_bytes()
    dep = deployment.start(3, tls=True)
    assert dep.transport is flwr_processes.HTTP and flwr_processes.version_tuple(dep.version) >= (1, 40)
    assert dep.fleet_port == dep.port  # one HTTP port for Fleet, Control and Runtime APIs
    assert len(set(dep.node_ids)) == 3
    certs = dep.certificates
    assert certs is not None and certs.ca.is_file() and oct(certs.key.stat().st_mode & 0o777) == "0o600"
    link = dep.superlink_command()
    assert "--insecure" not in link and {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"} <= set(link)
    for p in dep.supernodes:
        assert p is not None and "--insecure" not in p.argv and dep.fleet_address in p.argv
        assert p.argv[p.argv.index("--root-certificates") + 1] == str(certs.ca)
    # The SuperLink speaks TLS only.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{dep.port}/health", timeout=5).read()

    # The same SuperNode command without the CA certificate: TLS verification fails, it exits. It retries for
    # its --max-wait-time while the run goes on beside it (it never registers, so the run never sees it).
    argv = dep.supernode_command(0)
    i = argv.index("--root-certificates")
    del argv[i : i + 2]
    argv[argv.index("--port") + 1] = str(deploy.free_port())
    argv[argv.index("--max-wait-time") + 1] = "15"
    home = dep.workdir / "node-without-ca"
    log = home / "supernode.log"
    home.mkdir()
    with log.open("w") as fh:
        rogue = subprocess.Popen(argv, env={**os.environ, **dep._env(home / "home")}, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deployment.seen.add(rogue.pid)

    deployed = dep.run(TINY, timeout=420)
    run = dep.runs[-1]
    code = rogue.wait(timeout=120)  # a hang guard: it gives up after --max-wait-time 15
    out = log.read_text(errors="replace")
    assert code != 0, out[-2000:]
    assert flwr_processes.NODE_FAILED in out and "CERTIFICATE_VERIFY_FAILED" in out, out[-2000:]
    assert deploy.NODE_READY not in out
    deployment.stop()
    assert not deploy.related_processes([rogue.pid], home=str(home))
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject

    # The same experiment (pyproject's app config + the same overrides) in simulation.
    # num-nodes = -1 became 0 in the deployment (one SuperNode per client): the simulation runs that layout too
    cfg = ExperimentConfig.from_mapping({**deploy.app_config(ROOT), **run.run_config, "results-dir": str(tmp_path / "sim"),
                                         "num-nodes": 0})
    t0 = time.perf_counter()
    simulated = json.loads(json.dumps(simulate(cfg), default=str))  # int keys -> str, as in the JSON file
    sim_wall = time.perf_counter() - t0

    assert deployed["config"] == simulated["config"] | {"results-dir": deployed["config"]["results-dir"]}
    assert _metric_keys(deployed) == _metric_keys(simulated)
    assert _metric_keys(deployed)["train_rounds"] == ["1", "2"]
    assert deployed["trained_partitions"] == {"1": [0, 1, 2], "2": [0, 1, 2]}
    for rnd in ("1", "2"):
        assert deployed["train"][rnd]["num-clients"] == 3 and deployed["train"][rnd]["num-failures"] == 0
    assert deployed["final"]["num-clients"] == 3 and deployed["final"]["num-failures"] == 0
    # Batches are drawn per (seed, partition, round) and the model is seeded: the runtimes compute the
    # same numbers, up to the order in which replies are summed.
    for rnd in ("1", "2"):
        assert deployed["train"][rnd][C.TRAIN_LOSS] == pytest.approx(simulated["train"][rnd][C.TRAIN_LOSS], rel=1e-4)
    for key in (C.LOSS_BEFORE, C.LOSS_AFTER):
        assert deployed["final"][key] == pytest.approx(simulated["final"][key], rel=1e-4)

    timing = {
        "deployment_seconds_per_round": round(_per_round(deployed), 2),
        "simulation_seconds_per_round": round(_per_round(simulated), 2),
        "deployment_round_seconds": {r: round(v, 2) for r, v in deployed["round_seconds"].items()},
        "simulation_round_seconds": {r: round(v, 2) for r, v in simulated["round_seconds"].items()},
        "deployment_flwr_run_wall": round(run.seconds, 1),
        "simulation_wall": round(sim_wall, 1),
    }
    for k, v in timing.items():
        record_property(k, v)
    print(f"\nseconds per round, same config (3 nodes, 2 rounds): {timing}")


def _wait_for_message(node: deploy.Process, message_type: str, run: deploy.FlwrRun) -> None:
    """Wait until SuperNode ``node`` has pulled a ``message_type`` message of ``run`` (a hang guard of 300 s)."""
    deadline = time.monotonic() + 300
    while not _node_received(node, message_type):
        assert run.process.popen.poll() is None, run.output()[-3000:]
        assert time.monotonic() < deadline, f"SuperNode never got its {message_type} message"
        time.sleep(0.1)


@pytest.mark.ray  # the simulation it is compared with
def test_two_supernodes_hosting_six_clients_one_restarted_match_simulation(ray_runner, deployment, tmp_path):
    """Multi-client nodes on real processes, without TLS: 2 SuperNodes host 3 clients each (node config
    ``num-partitions=2``), keep LocalMOML's memories in memory banks under their ``memory-dir``, and compute what
    the simulation with ``num-nodes=2`` computes, although SuperNode 1 is killed after round 1 and restarted
    (``subprocess`` isolation; the next test restarts one with ``process`` isolation): its three clients start
    round 2 from the memories their bank saved on disk in round 1."""
    import torch

    from fedmeta.memory_bank import MemoryBank
    from fedmeta.stored_params import param_spec
    from fedmeta.simulations.apps import initial_model
    from fedmeta.simulations.config import ExperimentConfig
    from fedmeta.simulations.run import simulate

    k = 1  # the SuperNode that is killed and restarted
    overrides = {**TINY, "num-clients": 6, "num-nodes": 2, "memory-policy": "keep", "evaluate-every": 1}
    dep = deployment.start(2, memory=True, data_dirs=_data_dirs(tmp_path, 2))
    assert all("--insecure" in p.argv and dep.fleet_address in p.argv for p in dep.supernodes if p)
    assert "--insecure" in dep.superlink_command() and dep.certificates is None
    assert dep.isolations == ["subprocess", "subprocess"] and dep.executors == [None, None]
    before, old_id = dep.supernodes[k], dep.node_ids[k]
    assert before is not None
    # Killed when its round-1 evaluate message arrives: after its round-1 train reply was aggregated, before
    # round 2 (see the next test for why this point, and not the train reply, is race-free).
    run = dep.start_run(overrides)
    _wait_for_message(before, "evaluate", run)
    deployment.watch()
    (bank_dir,) = dep.memory_dir(k).glob("experiment-resume-*/node-1-of-2")
    hosted = json.loads((bank_dir / "header.json").read_text())["client_ids"]
    cfg = ExperimentConfig.from_mapping({**deploy.app_config(ROOT), **run.run_config, "results-dir": str(tmp_path / "sim")})
    bank = MemoryBank(bank_dir, hosted, param_spec(initial_model(cfg).state_dict()))  # raises on another layout
    assert hosted == [3, 4, 5] and bank.load(hosted, torch.device("cpu"))[1] == [1, 1, 1]  # round-1 memories on disk
    bank.close()

    dep.stop_node(k)
    assert not deploy.related_processes([before.pid])
    after = dep.start_node(k)  # same node config, memory and data directory
    assert (after.argv, after.env) == (before.argv, before.env) and after.pid != before.pid
    assert dep.node_ids[k] != old_id
    deployed = run.wait(timeout=420)
    restarted_log = after.log.read_text(errors="replace")[after.log_offset :]
    deployment.stop()

    assert "Receiving: train message" in restarted_log  # round 2 went to the restarted node
    assert deployed["trained_partitions"] == {"1": list(range(6)), "2": list(range(6))}
    for rnd in ("1", "2"):
        assert deployed["train"][rnd]["num-clients"] == 6 and deployed["train"][rnd]["num-failures"] == 0
    assert deployed["evaluate"]["1"]["num-failures"] > 0  # the killed node's clients
    assert deployed["final"]["num-clients"] == 6 and deployed["final"]["num-failures"] == 0
    # Every client, the restarted node's three included, started round 2 from the memory it saved in round 1 (the
    # bank checks each row it loads against its checksum: the bytes written in round 1).
    assert all(deployed["client_train"]["2"][str(c)][C.MEMORY_ROUND] == 1 for c in range(6))
    banks = sorted(p.parent.name for p in dep.memory_dir(0).glob("experiment-resume-*/node-*/header.json"))
    banks += sorted(p.parent.name for p in dep.memory_dir(1).glob("experiment-resume-*/node-*/header.json"))
    assert banks == ["node-0-of-2", "node-1-of-2"]

    simulated = json.loads(json.dumps(simulate(cfg), default=str))
    for rnd in ("1", "2"):
        assert deployed["train"][rnd][C.TRAIN_LOSS] == pytest.approx(simulated["train"][rnd][C.TRAIN_LOSS], rel=1e-4)
    for key in (C.LOSS_BEFORE, C.LOSS_AFTER):
        assert deployed["final"][key] == pytest.approx(simulated["final"][key], rel=1e-4)


# --- (c) restart with memory on disk ------------------------------------------------------------------


def test_restarted_supernode_continues_from_the_personalized_model_it_saved(deployment, tmp_path):
    """With ``process`` isolation: the SuperNode's executor (``flower-superexec``, which starts the ClientApp
    processes) is a process of its own, stopped and restarted with it. (The test above restarts a SuperNode with
    ``subprocess`` isolation, whose executor is its child.)"""
    from fedmeta.clients.memory import read_memory_file

    k = 1  # the SuperNode that is killed and restarted
    dep = deployment.start(2, memory=True, data_dirs=_data_dirs(tmp_path, 2), isolation="process")
    before = dep.supernodes[k]
    assert before is not None
    executor = dep.executors[k]
    assert "--isolation" in before.argv and executor is not None and executor.popen.poll() is None
    assert executor.argv[-2:] == ["--runtime-api-address", f"127.0.0.1:{dep.node_ports[k]}"]
    assert before.env[deploy.TASK_POLL_ENV] == "0.05"
    assert f'{deploy.MEMORY_DIR}="{dep.memory_dir(k)}"' in before.argv[-1]
    assert before.env[deploy.DATA_ENV] == str(tmp_path / f"data-{k}")
    old_id = dep.node_ids[k]
    # Evaluate after round 1 too. The node pulls its round-1 evaluate message only after the
    # ServerApp has aggregated round-1 training (its train reply included), and the ServerApp
    # cannot start round 2 before that evaluate message is answered -- by the node or, once it
    # has deregistered, by the SuperLink with a node-unavailable error. Killing the node when the
    # message arrives therefore always lands between its round-1 reply and round 2, which then
    # waits until both partitions are served again. (Killing it right after its train reply
    # would race: a reply the ServerApp has not pulled yet when its node deregisters is replaced
    # by a node-unavailable error.)
    run = dep.start_run({**TINY, "evaluate-every": 1})
    _wait_for_message(before, "evaluate", run)
    deployment.watch()
    saved = read_memory_file(next(dep.memory_dir(k).glob(f"experiment-resume-*/partition-{k}.pt")))
    assert saved.partition == k and saved.server_round == 1

    dep.stop_node(k)  # SIGTERM: the SuperNode deregisters; its superexec and ClientApps go too
    assert not deploy.related_processes([before.pid])
    assert executor.popen.poll() is not None and not deploy.related_processes([executor.pid])
    after = dep.start_node(k)  # same node config, memory and data directory
    assert (after.argv, after.env) == (before.argv, before.env) and after.pid != before.pid
    new_executor = dep.executors[k]  # and a new executor beside it
    assert new_executor is not None and new_executor is not executor and new_executor.argv == executor.argv
    assert new_executor.popen.poll() is None
    assert dep.node_ids[k] != old_id  # the SuperLink sees a new node for partition k

    results = run.wait(timeout=420)
    restarted_log = after.log.read_text(errors="replace")[after.log_offset :]
    deployment.stop()

    assert sorted(results["train"], key=int) == ["1", "2"]
    assert all(results["train"][r]["num-clients"] == 2 and results["train"][r]["num-failures"] == 0 for r in ("1", "2"))
    assert (results["evaluate"]["1"]["num-clients"], results["evaluate"]["1"]["num-failures"]) == (1, 1)  # the killed node
    assert results["final"]["num-clients"] == 2 and results["final"]["num-failures"] == 0
    assert "Receiving: train message" in restarted_log  # round 2 went to the restarted node
    round2 = results["client_train"]["2"]
    # The restarted node started round 2 from the u it saved in round 1, bit for bit.
    assert round2[str(k)][C.MEMORY_ROUND] == 1
    assert round2[str(k)][C.MEMORY_DIGEST] == saved.digest
    assert all(round2[str(p)][C.MEMORY_ROUND] == 1 for p in range(2))
    assert all(results["client_train"]["1"][str(p)][C.MEMORY_DIGEST] == -1 for p in range(2))
    assert read_memory_file(saved.path).server_round == 2


# --- (d) unreachable SuperLink --------------------------------------------------------------------------


def test_supernode_with_an_unreachable_superlink_exits_with_a_clear_message(tmp_path):
    bin_dir = Path(sys.executable).parent
    transport = deploy.transport_for(deploy.flwr_version(bin_dir))
    nowhere = f"{HOST}:{deploy.free_port()}"  # nothing listens there
    argv = deploy.supernode_command(transport, superlink=nowhere, port=deploy.free_port(),
                                    node_config={C.PARTITION_ID: 0, "num-partitions": 1}, max_wait_time=5, bin_dir=bin_dir)
    home = tmp_path / "home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    baseline = descendants_of_pytest()
    log = tmp_path / "supernode.log"
    with log.open("w") as fh:
        node = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = node.wait(timeout=120)  # a hang guard: it gives up on its own after --max-wait-time 5
        finally:
            deploy.terminate(deploy.related_processes([node.pid], home=str(tmp_path)), [node.pid], 5, [node])
    out = log.read_text(errors="replace")
    assert code != 0, (code, out[-2000:])
    assert flwr_processes.NODE_FAILED in out and "Connection refused" in out and nowhere in out, out[-2000:]
    assert deploy.NODE_READY not in out
    # Its superexec follows it out once it has been reaped (it polls --parent-pid).
    deadline = time.monotonic() + 10
    while deploy.related_processes([node.pid], home=str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not deploy.related_processes([node.pid], home=str(tmp_path))
    assert not descendants_of_pytest() - baseline


# --- the guide shows what the launcher runs ----------------------------------------------------------


GUIDE_DIR = "/srv/fedmeta"
GUIDE_RUN = {"partition": "dirichlet", "num-rounds": 3, "results-dir": f"{GUIDE_DIR}/results"}


def _guide_commands(transport: flwr_processes.Transport, tls: bool, isolation: str = "subprocess") -> list[str]:
    """What :meth:`LocalDeployment.shell_commands` prints for the guide's layout: work directory
    /srv/fedmeta, SuperLink port 9091 (+ gRPC fleet port 9092), SuperNode ports 9094-9096, a memory
    and a data directory per node; executables by name, the app as ``.``."""
    dep = LocalDeployment(3, workdir=GUIDE_DIR, memory=True, data_dirs=[f"{GUIDE_DIR}/node-{i}/data" for i in range(3)],
                          isolation=isolation)
    dep.transport = transport
    dep.port, dep.fleet_port, dep.node_ports = 9091, 9092 if transport.fleet_port_of_its_own else 9091, [9094, 9095, 9096]
    if tls:
        certs = Path(GUIDE_DIR) / "certs"
        dep.certificates = deploy.Certificates(certs / "ca.pem", certs / "server.pem", certs / "server.key")
    return [line.replace(f"{dep.bin_dir}{os.sep}", "").replace(str(ROOT), ".") for line in dep.shell_commands(GUIDE_RUN)]


@pytest.mark.parametrize("transport", [flwr_processes.HTTP, flwr_processes.GRPC_RERE], ids=lambda t: t.name)
@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_the_deployment_guide_shows_the_launchers_commands(transport, tls):
    guide = (ROOT / "docs" / "deployment.md").read_text()
    flat = re.sub(r"[ \t]*\\\n[ \t]*", " ", guide)  # join continued shell lines
    for line in _guide_commands(transport, tls):
        assert line in flat, f"docs/deployment.md lacks:\n{line}"
    certs = deploy.Certificates(Path(f"{GUIDE_DIR}/certs/ca.pem"), Path("-"), Path("-")) if tls else None
    assert deploy.connection_toml(f"{HOST}:9091", certs) in guide


def test_the_deployment_guide_shows_the_launchers_process_isolation_commands():
    flat = re.sub(r"[ \t]*\\\n[ \t]*", " ", (ROOT / "docs" / "deployment.md").read_text())
    node0 = [line for line in _guide_commands(flwr_processes.HTTP, False, isolation="process") if "/node-0/" in line]
    assert len(node0) == 2 and "--isolation process" in node0[0] and "flower-superexec" in node0[1]
    for line in node0:
        assert line in flat, f"docs/deployment.md lacks:\n{line}"


def test_transport_is_chosen_by_the_flwr_version_in_one_place():
    assert deploy.transport_for("1.38.1") is flwr_processes.GRPC_RERE and deploy.transport_for("1.39.0") is flwr_processes.GRPC_RERE
    assert deploy.transport_for("1.40.0rc1") is flwr_processes.HTTP and deploy.transport_for("1.41.0") is flwr_processes.HTTP
    assert deploy.transport_for("2.0.0") is flwr_processes.HTTP
    grpc = deploy.supernode_command(flwr_processes.GRPC_RERE, superlink="127.0.0.1:2", port=3, node_config={"partition-id": 0})
    http = deploy.supernode_command(flwr_processes.HTTP, superlink="127.0.0.1:2", port=3, node_config={"partition-id": 0})
    assert [a for a in grpc if a not in http] == ["--grpc-rere"]
    link = deploy.superlink_command(flwr_processes.GRPC_RERE, port=1, fleet_port=2)
    assert link[link.index("--fleet-api-address") + 1] == "127.0.0.1:2"
    assert "--fleet-api-address" not in deploy.superlink_command(flwr_processes.HTTP, port=1)
    with pytest.raises(ValueError, match="cannot parse"):
        flwr_processes.version_tuple("unknown")


def test_isolation_is_one_mode_or_one_per_node(tmp_path):
    dep = LocalDeployment(3, workdir=tmp_path, isolation=["subprocess", "process", "subprocess"])
    assert dep.isolations == ["subprocess", "process", "subprocess"]
    assert ["--isolation" in dep.supernode_command(i) for i in range(3)] == [False, True, False]
    superexecs = [line for line in dep.shell_commands({"partition": "dirichlet"}) if "flower-superexec" in line]
    assert len(superexecs) == 1 and superexecs[0].endswith(f"--runtime-api-address 127.0.0.1:{dep.node_ports[1]}")  # node 1's
    assert LocalDeployment(2, workdir=tmp_path, isolation="process").isolations == ["process", "process"]
    with pytest.raises(ValueError, match="2 entries for 3 nodes"):
        LocalDeployment(3, workdir=tmp_path, isolation=["process", "process"])
    with pytest.raises(ValueError, match="isolation must be one of subprocess, process, got 'thread'"):
        LocalDeployment(2, workdir=tmp_path, isolation=["process", "thread"])


def test_run_config_is_validated_before_any_process_starts(tmp_path):
    dep = LocalDeployment(3, workdir=tmp_path)
    rc = dep.run_config({"num_rounds": 2, "partition": "dirichlet", "inner-lr": 1})
    assert rc["num-clients"] == 3 and rc["clients-per-round"] == 0 and rc["inner-lr"] == 1.0 and isinstance(rc["inner-lr"], float)
    assert Path(rc["results-dir"]).is_absolute()
    assert flwr_processes.config_arg(rc).startswith('num-rounds=2 partition="dirichlet" inner-lr=1.0 ')
    with pytest.raises(ValueError, match="did you mean 'num-rounds'"):
        dep.run_config({"num-round": 2})
    with pytest.raises(ValueError, match="3 SuperNodes"):
        dep.run_config({"num-clients": 4, "partition": "dirichlet"})
    with pytest.raises(ValueError, match="even"):  # the Fallah split needs an even number of clients
        dep.run_config({})
    assert dep.processes() == [] and not dep.live_processes()


def test_certificates_verify_as_a_chain_for_the_loopback_names(tmp_path):
    import ssl

    from cryptography import x509

    certs = deploy.make_certificates(tmp_path)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {HOST}
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(certs.cert), str(certs.key))  # the key belongs to the certificate
    assert oct(certs.key.stat().st_mode & 0o777) == "0o600"
