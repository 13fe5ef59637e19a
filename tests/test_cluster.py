"""fedmeta on an existing Ray cluster: two raylets on 127.0.0.1 (``ray start --head`` and a second ``ray start
--address``), started and stopped by these tests, every process by pid. The second raylet runs in its own
mount namespace with an empty tmpfs over one directory: a path the driver sees and that node does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fakes import flwr_run
from fedmeta import config as C
from fedmeta.clients.app import host_local_refusal, ray_cluster_size
from fedmeta.simulations import cluster
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.config import AUTO_NODES, ExperimentConfig
from fedmeta.simulations.preflight import InputError
from fedmeta.simulations.processes import pids_mentioning
from fedmeta.strategies.checkpoint import CheckpointDir


@pytest.fixture(scope="module")
def two_raylets():
    """``(address, root)``: a head raylet and a second one, 1 CPU each; ``root/hidden`` is empty for the second."""
    local = cluster.LocalCluster(raylets=2, cpus_per_raylet=1)
    with local:
        yield local.address, local.root
    assert not local.left, f"Ray processes left behind: {local.left}"
    assert not local.processes() and not pids_mentioning(str(local.root))


CFG = ExperimentConfig(algorithm=C.LOCAL_MOML, dataset="sinewave", num_clients=40, num_nodes=2, clients_per_round=10, num_rounds=3,
                       local_steps=2, inner_lr=0.01, lr=0.01, momentum=0.5, memory_policy="keep", evaluate_every=3, seed=5)


def _final_arrays(res) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in CheckpointDir(res["checkpoint"]).load().arrays.items()}


def _actor_logs(root) -> dict[str, set]:
    """Per raylet, its worker logs that name a ClientApp actor (an actor's worker writes ":actor_name:<class>")."""
    return {raylet: {f for f in (root / raylet).glob("session_*/logs/worker-*.out") if ":actor_name:ClientAppActor" in f.read_text(errors="replace")}
            for raylet in ("head", "worker1")}


def test_actor_slots_are_counted_per_node_like_flowers_actor_pool():
    nodes = [{"Resources": {"CPU": 3.0, "GPU": 1.0}}, {"Resources": {"CPU": 2.0}}, {"Resources": {}}]  # the last: a detached node
    assert cluster.actor_slots(nodes, num_cpus=1.0) == 5
    assert cluster.actor_slots(nodes, num_cpus=2.0) == 2  # 1 + 1, not floor(5 / 2)
    assert cluster.actor_slots(nodes, num_cpus=1.0, num_gpus=0.25) == 3  # the GPU node: min(3 CPUs, 4 quarter-GPUs)
    assert cluster.actor_slots(nodes, num_cpus=1.0, num_gpus=1.0) == 1
    cfg = CFG.replace(num_nodes=AUTO_NODES)
    assert cfg.with_nodes_for(2).num_nodes == 2 and cfg.with_nodes_for(0).num_nodes == 1
    assert cfg.with_nodes_for(10**6).num_nodes == CFG.num_partitions and CFG.with_nodes_for(7) is CFG
    with pytest.raises(ValueError, match="num-nodes = -1"):
        cfg.num_supernodes


def test_a_host_local_default_memory_dir_is_refused_on_a_multi_node_cluster(tmp_path):
    assert host_local_refusal(1, tmp_path) is None and host_local_refusal(0, tmp_path) is None
    assert host_local_refusal(2, tmp_path).startswith(f"memory-dir is not set and this 2-node Ray cluster would keep client memories in {tmp_path}")


@pytest.mark.ray
def test_a_multi_client_keep_run_on_two_raylets_equals_the_in_process_run(two_raylets, tmp_path):
    address, root = two_raylets
    shared = root / "runs"
    # num-nodes = -1: one node per actor slot of the cluster, 1 CPU on each raylet = 2 nodes (set explicitly in-process)
    there = sim_run.simulate(CFG.replace(ray_address=address, num_nodes=AUTO_NODES, results_dir=str(shared / "cluster")), progress=False)
    here = sim_run.simulate(CFG.replace(results_dir=str(tmp_path / "in-process")), progress=False)
    assert there["status"] == here["status"] == "ok"
    assert there["config"]["num-nodes"] == here["config"]["num-nodes"] == 2
    a, b = _final_arrays(there), _final_arrays(here)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert there["final"] == here["final"] and there["client_train"] == here["client_train"]
    assert any(row[C.MEMORY_ROUND] >= 0 for rows in there["client_train"].values() for row in rows.values())  # memories came back
    for raylet, logs in _actor_logs(root).items():  # both raylets ran ClientApp actors
        assert logs, (raylet, sorted(p.name for p in (root / raylet).glob("session_*/logs/*"))[:50])


@pytest.mark.ray
def test_every_raylet_takes_worker_ports_from_the_os(two_raylets):
    """`ray start` hands out worker and driver ports 10002, 10003, ... in every cluster; two clusters on one machine (the
    test workers' session Rays) then give a driver a port another cluster's process holds, and Ray aborts it. Each
    raylet of a LocalCluster takes its ports from the OS, as Ray started in-process does."""
    from fedmeta.simulations.processes import process_table

    _, root = two_raylets
    raylets = [argv for pid, (_, _, argv, _) in process_table().items() if argv and argv[0].endswith("/raylet") and str(root) in " ".join(argv)]
    assert len(raylets) == 2
    assert all("--min_worker_port=0" in argv and "--max_worker_port=0" in argv for argv in raylets), raylets


@pytest.mark.ray
def test_a_memory_dir_one_raylet_cannot_see_fails_before_round_1(two_raylets):
    address, root = two_raylets
    results = root / "runs" / "hidden"
    with pytest.raises(InputError, match=rf"memory-dir {root / 'hidden'} is not shared by every node of the Ray cluster: node \w+ "
                                         rf"\(host .*\): cannot read .*set memory-dir to a directory every host mounts"):
        sim_run.simulate(CFG.replace(ray_address=address, memory_dir=str(root / "hidden"), results_dir=str(results)), progress=False)
    assert not list(results.glob("*.json"))  # no round ran


@pytest.mark.ray
def test_a_multi_node_cluster_gets_no_host_local_temporary_memory_dir(two_raylets, monkeypatch):
    address, root = two_raylets
    monkeypatch.setenv(cluster.RAY_ADDRESS_ENV, address)  # RAY_ADDRESS alone attaches
    with pytest.raises(InputError, match="memory-dir must be set to a directory every host of the 2-node Ray cluster mounts"):
        sim_run.simulate(CFG.replace(checkpoint=False, results_dir=str(root / "runs" / "tmp")), progress=False)
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:  # what a ClientApp actor sees: the multi-client node refuses the host-local default memory dir
        assert ray_cluster_size() == 2
    finally:
        ray.shutdown()
    assert ray_cluster_size() == 0


@pytest.mark.ray
def test_flwr_run_attaches_through_ray_address(two_raylets, tmp_path):
    """`flwr run .` with RAY_ADDRESS in the environment of the local SuperLink it starts: Flower's simulation runtime
    attaches to the cluster (Flower 1.42's federation init-args cannot name an address) and both raylets run clients."""
    address, root = two_raylets
    before = _actor_logs(root)
    runs = root / "runs" / "flwr"
    run_config = (f"dataset='sinewave' num-clients=20 num-nodes=2 clients-per-round=6 num-rounds=2 evaluate-every=2 local-steps=2 "
                  f"memory-policy='keep' memory-dir='{runs / 'memory'}' results-dir='{runs}'")
    # Flower's default federation asks 2 CPUs per ClientApp; each raylet here has 1
    flwr_run(tmp_path, run_config, 2, env={cluster.RAY_ADDRESS_ENV: address}, federation="client-resources-num-cpus=1")
    res = json.loads((runs / "local-moml-sinewave-n20-seed0.json").read_text())
    assert res["status"] == "ok" and res["final_round"] == 2
    assert list((runs / "memory").rglob("*")), "no memory bank in the shared memory-dir"
    for raylet, logs in _actor_logs(root).items():
        assert logs - before[raylet], f"{raylet} ran no ClientApp actor for flwr run"


def test_an_address_where_no_cluster_answers_fails_in_one_line(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--algorithms", "local-moml", "--dataset", "sinewave", "--num-clients", "4", "--clients-per-round", "2", "--num-rounds", "1",
            "--ray-address", f"127.0.0.1:{port}", "--results-dir", str(tmp_path)]
    assert sim_run.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedmeta-sim: error: ray-address 127.0.0.1:{port}: no Ray cluster answers there")
