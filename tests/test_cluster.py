"""fedmeta on an existing Ray cluster: two raylets on 127.0.0.1 (``ray start --head`` and a second ``ray start
--address``), started and stopped by these tests, every process by pid. The second raylet runs in its own
mount namespace with an empty tmpfs over one directory: a path the driver sees and that node does not."""

from __future__ import annotations

import numpy as np
import pytest

from fedmeta import config as C
from fedmeta.simulations import cluster
from fedmeta.simulations import run as sim_run
from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.preflight import InputError
from fedmeta.simulations.processes import pids_mentioning
from fedmeta.strategies.checkpoint import CheckpointDir

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_raylets():
    """``(address, root)``: a head raylet and a second one, 1 CPU each; ``root/hidden`` is empty for the second."""
    local = cluster.LocalCluster(raylets=2, cpus_per_raylet=1)
    with local:
        yield local.address, local.root
    assert not local.left, f"Ray processes left behind: {local.left}"
    assert not pids_mentioning(str(local.root))


CFG = ExperimentConfig(algorithm=C.LOCAL_MOML, dataset="sinewave", num_clients=40, num_nodes=2, clients_per_round=10, num_rounds=3,
                       local_steps=2, inner_lr=0.01, lr=0.01, momentum=0.5, memory_policy="keep", evaluate_every=3, seed=5)


def _final_arrays(res) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in CheckpointDir(res["checkpoint"]).load().arrays.items()}


def test_a_multi_client_keep_run_on_two_raylets_equals_the_in_process_run(two_raylets, tmp_path):
    address, root = two_raylets
    shared = root / "runs"
    there = sim_run.simulate(CFG.replace(ray_address=address, results_dir=str(shared / "cluster")), progress=False)
    here = sim_run.simulate(CFG.replace(results_dir=str(tmp_path / "in-process")), progress=False)
    assert there["status"] == here["status"] == "ok"
    a, b = _final_arrays(there), _final_arrays(here)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert there["final"] == here["final"] and there["client_train"] == here["client_train"]
    assert any(row[C.MEMORY_ROUND] >= 0 for rows in there["client_train"].values() for row in rows.values())  # memories came back
    for raylet in ("head", "worker1"):  # both raylets ran ClientApp actors: an actor's worker writes ":actor_name:<class>" to its log
        logs = [f for f in (root / raylet).glob("session_*/logs/worker-*.out") if ":actor_name:ClientAppActor" in f.read_text(errors="replace")]
        assert logs, (raylet, sorted(p.name for p in (root / raylet).glob("session_*/logs/*"))[:50])


def test_a_memory_dir_one_raylet_cannot_see_fails_before_round_1(two_raylets):
    address, root = two_raylets
    results = root / "runs" / "hidden"
    with pytest.raises(InputError, match=rf"memory-dir {root / 'hidden'} is not shared by every node of the Ray cluster: node \w+ "
                                         rf"\(host .*\): cannot read .*set memory-dir to a directory every host mounts"):
        sim_run.simulate(CFG.replace(ray_address=address, memory_dir=str(root / "hidden"), results_dir=str(results)), progress=False)
    assert not list(results.glob("*.json"))  # no round ran


def test_a_multi_node_cluster_gets_no_host_local_temporary_memory_dir(two_raylets, monkeypatch):
    address, root = two_raylets
    monkeypatch.setenv(cluster.RAY_ADDRESS_ENV, address)  # RAY_ADDRESS alone attaches
    with pytest.raises(InputError, match="memory-dir must be set to a directory every host of the 2-node Ray cluster mounts"):
        sim_run.simulate(CFG.replace(checkpoint=False, results_dir=str(root / "runs" / "tmp")), progress=False)


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
