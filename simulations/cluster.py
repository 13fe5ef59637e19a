"""Running fedmeta's simulations on an existing Ray cluster (docs/cluster.md).

``ray-address`` (or the ``RAY_ADDRESS`` environment variable) makes :func:`fedmeta.simulations.run.simulate`
connect to a running cluster instead of starting Ray inside the process: the ServerApp stays in the
driver, Flower's ClientApp actors are placed by Ray on every node of the cluster. Flower serves a
virtual node from whichever actor is free, so a node's LocalMOML memories (and the checkpoint they
live beside) must be on storage every host sees. Before round 1, :func:`check_shared_storage` has
one Ray task on every alive node read a probe file the driver wrote and write one back; a node that
cannot see the directory stops the run with one line naming the node, its host and the path. A
single-node cluster needs no check; a multi-node cluster is never given a host-local temporary
directory (see :func:`temp_memory_refusal`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

RAY_ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_CLUSTER_ENV = "FEDMETA_LOCAL_CLUSTER"
"""Set to a :class:`LocalCluster`'s directory in the environment of every process it starts."""


class SharedStorageError(RuntimeError):
    """A directory the clients need is not visible from every node of the cluster."""


def cluster_address(configured: str) -> str | None:
    """The cluster to attach to: the ``ray-address`` setting, else ``RAY_ADDRESS``, else None (start Ray in-process)."""
    return configured or os.environ.get(RAY_ADDRESS_ENV) or None


class ClusterUnreachable(RuntimeError):
    """Nothing answers at the configured Ray address."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to ``host:port`` (``ray://`` stripped; ``auto`` and port-less addresses are left to Ray),
    so that a wrong address fails in one line instead of Ray retrying for minutes."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterUnreachable(f"ray-address {address}: no Ray cluster answers there ({err.strerror or err}); start one with "
                                 "`ray start --head --port <port>` or fix ray-address / RAY_ADDRESS (docs/cluster.md)") from None


def connect(address: str) -> list[dict[str, Any]]:
    """Connect this process to the cluster at ``address`` (as Flower's Ray backend would, with the driver's
    ``sys.path`` in the workers' ``PYTHONPATH``) and return its alive nodes. Flower's backend then finds Ray
    initialised and uses this connection. Raises :class:`ClusterUnreachable` when nothing listens there."""
    import ray

    if not ray.is_initialized():
        check_reachable(address)
        pythonpath = os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
        ray.init(address=address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    return alive_nodes()


def disconnect() -> None:
    """Detach this process from the cluster (the cluster keeps running)."""
    import ray

    ray.shutdown()


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _probe(path: str, token: str, reply: str) -> dict[str, Any]:
    """On one node: read the driver's probe file and write one back."""
    probe, here = Path(path) / f".fedmeta-probe-{token}", {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        seen = probe.read_text()
    except OSError as err:
        return {**here, "error": f"cannot read {probe}: {err.strerror or err}"}
    if seen != token:
        return {**here, "error": f"{probe} holds other content than the driver wrote"}
    try:
        (Path(path) / f".fedmeta-probe-{token}-{reply}").write_text(reply)
    except OSError as err:
        return {**here, "error": f"cannot write in {path}: {err.strerror or err}"}
    return here


def check_shared_storage(paths: Mapping[str, str | Path], nodes: list[dict[str, Any]]) -> None:
    """Every directory in ``paths`` (setting name -> path) must be readable and writable from every node
    in ``nodes`` (one Ray task pinned to each). Raises :class:`SharedStorageError` naming the first node,
    its host and the path that fails; removes the probe files."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if len(nodes) <= 1:
        return
    probe = ray.remote(num_cpus=0)(_probe)
    for name, path in paths.items():
        directory = Path(path).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        (directory / f".fedmeta-probe-{token}").write_text(token)
        try:
            refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(directory), token, n["NodeID"][:12]) for n in nodes}
            results = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
            for n in nodes:
                got = results[n["NodeID"]]
                if "error" in got:
                    raise SharedStorageError(
                        f"{name} {directory} is not shared by every node of the Ray cluster: node {n['NodeID'][:12]} "
                        f"(host {got['host']}, {n.get('NodeManagerAddress', '?')}): {got['error']}; on a multi-node cluster set "
                        f"{name} to a directory every host mounts (docs/cluster.md)")
                back = directory / f".fedmeta-probe-{token}-{n['NodeID'][:12]}"
                if not back.exists():
                    raise SharedStorageError(
                        f"{name} {directory} is not shared by every node of the Ray cluster: node {n['NodeID'][:12]} (host "
                        f"{got['host']}) wrote its probe file where this process cannot see it; set {name} to a directory every "
                        "host mounts (docs/cluster.md)")
        finally:
            for f in directory.glob(f".fedmeta-probe-{token}*"):
                f.unlink(missing_ok=True)


def temp_memory_refusal(num_nodes_in_cluster: int) -> str | None:
    """Why multi-client nodes cannot keep their memories in a temporary directory of this host (a run without
    ``memory-dir`` and without a checkpoint) on a cluster of ``num_nodes_in_cluster`` Ray nodes, or None."""
    if num_nodes_in_cluster > 1:
        return (f"memory-dir must be set to a directory every host of the {num_nodes_in_cluster}-node Ray cluster mounts "
                "(multi-client nodes keep client memories on disk, and a temporary directory of this host is not seen by the "
                "others; docs/cluster.md)")
    return None

def actor_slots(nodes: list[Mapping[str, Any]], num_cpus: float, num_gpus: float = 0.0) -> int:
    """How many ClientApp actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs fit on ``nodes`` (Ray's node
    records: ``{"Resources": {"CPU": .., "GPU": ..}}``), counted per node as Flower's actor pool counts
    them: on each node the floor of its CPUs / ``num_cpus``, and with ``num_gpus`` > 0 at most the floor
    of its GPUs / ``num_gpus``. ``num-nodes = -1`` gives a run one multi-client node per slot, so every
    actor on every host has a node to train."""
    total = 0
    for node in nodes:
        res = node.get("Resources") or {}
        fit = int(res.get("CPU", 0) // num_cpus)
        if num_gpus > 0:
            fit = min(fit, int(res.get("GPU", 0) // num_gpus))
        total += fit
    return total


def local_resources() -> list[dict[str, Any]]:
    """This machine as one Ray node record (what Ray started in-process sees): its cores and CUDA devices."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [{"Resources": {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}}]


def local_cluster_processes(root: str | Path) -> set[int]:
    """Every live process of the :class:`LocalCluster` in ``root``: those whose command line names its directory,
    those that inherited its marker from ``ray start`` (its client server names no path), and those holding a file
    open below it (Ray's agents rename themselves, and the new title overwrites the environment /proc shows). Also
    finds the processes of a cluster whose owner died before stopping it."""
    from fedmeta.simulations.processes import pids_holding, pids_mentioning, pids_with_env

    root = str(root)
    return set(pids_mentioning(root)) | pids_with_env(LOCAL_CLUSTER_ENV, root) | pids_holding(root)


class LocalCluster:
    """A Ray cluster of ``raylets`` raylets on 127.0.0.1 (``ray start --head`` plus ``ray start --address``), for
    tests and benchmarks; every process it starts is stopped by pid (``ray stop`` would stop every Ray on the
    machine). ``hidden``: a directory every raylet but the head sees as an empty tmpfs (each runs in its own
    mount namespace), standing in for a host without a shared mount. Use as a context manager."""

    def __init__(self, raylets: int = 2, cpus_per_raylet: int = 1, hidden: bool = True, timeout: float = 60.0) -> None:
        # Ray's session sockets live under --temp-dir, and a Unix socket path has at most 107 bytes: a short root
        self.root = Path(tempfile.mkdtemp(prefix="fedmeta-rc-", dir="/tmp"))
        self.hidden = self.root / "hidden"
        self.raylets, self.cpus, self.use_hidden, self.timeout = raylets, cpus_per_raylet, hidden, timeout
        self.address = ""
        self.workers: list[subprocess.Popen] = []

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def __enter__(self) -> "LocalCluster":
        import ray

        self.hidden.mkdir()
        env = {k: v for k, v in os.environ.items() if k != RAY_ADDRESS_ENV}
        env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
        env[LOCAL_CLUSTER_ENV] = str(self.root)  # inherited by every process Ray starts, renamed or re-parented
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        # Worker and driver ports from the OS, as Ray started in-process has them: `ray start` otherwise hands out
        # 10002, 10003, ... in every cluster, so two clusters on one machine (the test workers' session Rays) give a
        # driver a port another cluster's process holds, and Ray aborts that driver (grpc_server.cc: "Failed to start
        # the grpc server. The specified port is 10002").
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus), "--disable-usage-stats",
                  "--min-worker-port", "0", "--max-worker-port", "0"]
        try:
            head = subprocess.run([self._ray(), "start", "--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir",
                                   str(self.root / "head"), *common], env=env, capture_output=True, text=True, timeout=120)
            if head.returncode != 0:
                raise RuntimeError(f"ray start --head failed: {head.stdout[-2000:]}{head.stderr[-2000:]}")
            for i in range(1, self.raylets):
                start = f"{self._ray()} start --address {self.address} --temp-dir {self.root / f'worker{i}'} {' '.join(common)} --block"
                argv = (["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {self.hidden} && exec {start}"]
                        if self.use_hidden else ["sh", "-c", f"exec {start}"])
                self.workers.append(subprocess.Popen(argv, env=env, stdout=open(self.root / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            deadline = time.monotonic() + self.timeout
            while len(alive_nodes()) < self.raylets and time.monotonic() < deadline:
                time.sleep(0.3)
            if len(alive_nodes()) < self.raylets:
                raise RuntimeError(f"only {len(alive_nodes())} of {self.raylets} raylets joined: "
                                   + (self.root / "worker1.log").read_text()[-2000:])
        except BaseException:
            self.__exit__()
            raise
        finally:
            ray.shutdown()
        return self

    def processes(self) -> set[int]:
        """Every live process of this cluster (:func:`local_cluster_processes`)."""
        return local_cluster_processes(self.root)

    def __exit__(self, *exc: Any) -> None:
        from fedmeta.simulations.processes import terminate

        for _ in range(2):  # a raylet may start a worker while the first pass stops it
            terminate(self.processes(), popens=self.workers, timeout=5.0)
        self.left = self.processes()
        shutil.rmtree(self.root, ignore_errors=True)

__all__ = ["ClusterUnreachable", "LOCAL_CLUSTER_ENV", "LocalCluster", "local_cluster_processes", "RAY_ADDRESS_ENV", "actor_slots", "check_reachable", "local_resources", "SharedStorageError", "alive_nodes", "check_shared_storage", "cluster_address", "connect", "disconnect",
           "temp_memory_refusal"]
