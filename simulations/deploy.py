"""Launch a real Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, ``flwr run``.

``python -m fedmeta.simulations.deploy --nodes 3 --num-rounds 3`` (or ``fedmeta-deploy-local``)
starts a SuperLink and one SuperNode per partition as separate processes on the loopback
interface, waits until they are healthy, runs the fedmeta app of this repository against them with
``flwr run --stream``, prints where the results are, and stops every process it started, also
when something fails. ``--tls`` generates a CA and a server certificate first; ``--flwr-bin DIR``
uses the flwr executables of another environment (e.g. a venv with flwr 1.39). Every field of
:class:`~fedmeta.simulations.config.ExperimentConfig` is a flag, as for ``fedmeta-sim``.

The same commands, written out for a shell, are in ``docs/deployment.md``; the tests check that the
guide shows exactly what this module runs.

How SuperLink and SuperNodes talk depends on the flwr release. :func:`fedmeta.simulations.flwr_processes.transport_for` is the one
place that knows it:

* flwr <= 1.39: gRPC (``grpc-rere``). The SuperLink serves the Fleet API on its own port
  (``--fleet-api-address``) and the Control/Runtime HTTP API on ``--host``/``--port``; SuperNodes
  connect to the fleet port with ``--grpc-rere``.
* flwr >= 1.40: HTTP(S). The SuperLink serves every API on one ``--host``/``--port``; SuperNodes
  connect to it.

Everything else is the same for both: the ``flwr`` CLI reads its SuperLink connection from
``$FLWR_HOME/config.toml`` (1.39 does too, so the app's ``pyproject.toml`` is never rewritten), and
TLS uses ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` on the SuperLink and
``--root-certificates`` on SuperNodes and in the connection.

Process handling: each SuperLink, SuperNode and ``flwr run`` is started in its own process group
with its own ``FLWR_HOME`` under the work directory, output to a log file. The SuperLink starts a
``flower-superexec`` in a new session, and every SuperNode starts one that outlives it when the
SuperNode is killed; those carry ``--parent-pid`` and inherit ``FLWR_HOME``. :meth:`stop` therefore
signals the process groups it created *and* every process whose parent chain, ``--parent-pid`` or
``FLWR_HOME`` leads back to them, by PID: SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedmeta import config as C
from fedmeta.simulations.config import AUTO_NODES, ExperimentConfig
from fedmeta.extras import MissingExtra
from fedmeta.tracking import require
from fedmeta.simulations.preflight import check_inputs
from fedmeta.simulations.flwr_processes import (
    DATA_ENV, HOST, ISOLATIONS, MEMORY_DIR, NODE_READY, PROJECT_DIR, TASK_POLL_ENV, TASK_POLL_INTERVAL, Certificates, DeploymentError,
    FlwrRun, Process, app_config, clean_environ, connection_toml, flwr_run_command, flwr_version, free_port, log_tail,
    make_certificates, shell_line, superexec_command, superlink_command, supernode_command, transport_for,
)
from fedmeta.simulations.processes import is_alive, related_processes, terminate

logger = logging.getLogger("fedmeta")

# --- the deployment --------------------------------------------------------------------------------


class LocalDeployment:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1, started as real processes (a context manager).

    Parameters
    ----------
    nodes
        Number of SuperNodes; node i gets node config ``partition-id=i num-partitions=nodes``.
    workdir
        Where every process gets its ``FLWR_HOME``, log file, memory directory, certificates and the
        run results (default: a new temporary directory, kept for inspection).
    flwr_bin
        Directory holding ``flower-superlink``, ``flower-supernode``, ``flwr`` and ``python`` (a
        venv's ``bin/``); default: the directory of the running interpreter. Its flwr version picks
        the transport (:func:`transport_for`).
    project_dir
        The Flower app project to run (default: this repository).
    tls
        Run every connection over TLS, with a CA and a certificate for 127.0.0.1/localhost generated
        into ``<workdir>/certs`` at start (:func:`make_certificates`).
    certificates
        Use these existing files instead (e.g. made with openssl, see docs/deployment.md); implies TLS.
    memory
        Give node i the node config ``memory-dir=<workdir>/node-i/memory`` (clients keep their
        personalized models on disk there, so they survive a SuperNode restart).
    data_dirs
        Data directory of every node (one path) or of each node (a list); passed to the node's
        ClientApps as ``FEDMETA_DATA``. ``None``: inherit the launcher's environment.
    node_config
        Extra node-config keys for every node.
    max_wait_time
        SuperNode ``--max-wait-time``: seconds a SuperNode retries an unreachable SuperLink before it
        exits with an error (``None``: forever, Flower's default).
    startup_timeout
        Seconds to wait for the SuperLink's health endpoint and each SuperNode's registration.
    stop_timeout
        Seconds between SIGTERM and SIGKILL in :meth:`stop` and :meth:`stop_node`.
    isolation
        SuperNode ``--isolation`` (:data:`ISOLATIONS`) of every node (one mode) or of each node (a list): with
        ``process`` the node's ``flower-superexec`` is started as a process of its own beside it.
    task_poll_interval
        Seconds between the executors' polls for a task (:data:`TASK_POLL_ENV`; ``None``: Flower's default).
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        workdir: str | Path | None = None,
        flwr_bin: str | Path | None = None,
        project_dir: str | Path = PROJECT_DIR,
        tls: bool = False,
        certificates: Certificates | None = None,
        memory: bool = False,
        data_dirs: str | Path | Sequence[str | Path] | None = None,
        node_config: Mapping[str, Any] | None = None,
        max_wait_time: float | None = 60.0,
        startup_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        isolation: str | Sequence[str] = "subprocess",
        task_poll_interval: float | None = TASK_POLL_INTERVAL,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        modes = [isolation] * nodes if isinstance(isolation, str) else list(isolation)
        if len(modes) != nodes:
            raise ValueError(f"isolation has {len(modes)} entries for {nodes} nodes")
        for mode in modes:
            if mode not in ISOLATIONS:
                raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, got {mode!r}")
        if task_poll_interval is not None and not 0.01 <= task_poll_interval <= 60:
            raise ValueError(f"task_poll_interval must be in [0.01, 60] seconds (Flower's range) or None, got {task_poll_interval!r}")
        self.isolations: list[str] = modes
        """Each SuperNode's ``--isolation`` mode."""
        self.task_poll_interval = task_poll_interval
        self.nodes = nodes
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fedmeta-deploy-"))
        self.workdir = self.workdir.resolve()
        self.bin_dir = Path(flwr_bin).resolve() if flwr_bin is not None else Path(sys.executable).parent
        self.project_dir = Path(project_dir).resolve()
        self.version = flwr_version(self.bin_dir)
        self.transport = transport_for(self.version)
        self.certificates = certificates
        if tls and certificates is None:
            certs = self.workdir / "certs"
            self.certificates = Certificates(certs / "ca.pem", certs / "server.pem", certs / "server.key")
        self._generate_certificates = tls and certificates is None
        if isinstance(data_dirs, (str, Path)) or data_dirs is None:
            self.data_dirs: list[Path | None] = [Path(data_dirs).resolve() if data_dirs else None] * nodes
        else:
            if len(data_dirs) != nodes:
                raise ValueError(f"data_dirs has {len(data_dirs)} entries for {nodes} nodes")
            self.data_dirs = [Path(d).resolve() for d in data_dirs]
        self.memory = memory
        self.extra_node_config = dict(node_config or {})
        self.max_wait_time = max_wait_time
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.port = free_port()
        """SuperLink Control/Runtime HTTP API port (with the HTTP transport also the Fleet API)."""
        self.fleet_port = free_port() if self.transport.fleet_port_of_its_own else self.port
        self.node_ports = [free_port() for _ in range(nodes)]
        """Each SuperNode's Runtime API port."""
        self.superlink: Process | None = None
        self.supernodes: list[Process | None] = [None] * nodes
        self.executors: list[Process | None] = [None] * nodes
        """Each SuperNode's ``flower-superexec`` where its isolation is ``process`` (a process of its own), else ``None``."""
        self.node_ids: list[int | None] = [None] * nodes
        """The node id the SuperLink gave each SuperNode (a restarted SuperNode gets a new one)."""
        self.runs: list[FlwrRun] = []
        self.retired: list[Process] = []
        """SuperNode processes replaced by a restart (:meth:`start_node`)."""

    # --- addresses and files ---------------------------------------------------------------------
    @property
    def control_address(self) -> str:
        """Where the ``flwr`` CLI connects (SuperLink Control API)."""
        return f"{HOST}:{self.port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect (SuperLink Fleet API)."""
        return f"{HOST}:{self.fleet_port}"

    def node_dir(self, i: int) -> Path:
        return self.workdir / f"node-{i}"

    def memory_dir(self, i: int) -> Path | None:
        return self.node_dir(i) / "memory" if self.memory else None

    def node_config(self, i: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {C.PARTITION_ID: i, "num-partitions": self.nodes}
        if self.memory:
            cfg[MEMORY_DIR] = str(self.memory_dir(i))
        cfg.update(self.extra_node_config)
        return cfg

    def processes(self) -> list[Process]:
        """Every process started so far, running or not."""
        procs = [*self.retired, *(p for p in self.supernodes if p is not None), *(p for p in self.executors if p is not None),
                 *(r.process for r in self.runs)]
        return ([self.superlink] if self.superlink else []) + procs

    def live_processes(self) -> set[int]:
        """PIDs of every live process that belongs to this deployment (see :func:`related_processes`)."""
        return related_processes([p.pid for p in self.processes()], home=str(self.workdir))

    def _env(self, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        # flwr starts flower-superexec, flwr-serverapp and flwr-clientapp by name: PATH must find
        # the ones of this flwr environment first.
        return {
            "FLWR_HOME": str(home),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            **(extra or {}),
        }

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> Process:
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        with log.open("a") as fh:
            fh.write(f"\n### {time.strftime('%H:%M:%S')} {shell_line(argv)}\n")
            fh.flush()
            popen = subprocess.Popen(
                argv, env={**clean_environ(), **env}, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, start_new_session=True,
            )
        logger.info("started %s (pid %d): %s", name, popen.pid, shell_line(argv))
        return Process(name, argv, env, log, popen, offset)

    # --- start -----------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalDeployment:
        """Start the SuperLink and every SuperNode; return when all are healthy and registered."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._generate_certificates and self.certificates is not None and not self.certificates.ca.exists():
            self.certificates = make_certificates(self.certificates.ca.parent)
        self.start_superlink()
        for i in range(self.nodes):
            self.start_node(i, wait=False)
        for i in range(self.nodes):
            self.wait_for_node(i)
        return self

    def superlink_command(self) -> list[str]:
        return superlink_command(self.transport, port=self.port, fleet_port=self.fleet_port, tls=self.certificates, bin_dir=self.bin_dir)

    def supernode_command(self, i: int) -> list[str]:
        return supernode_command(self.transport, superlink=self.fleet_address, port=self.node_ports[i], node_config=self.node_config(i),
                                 tls=self.certificates, max_wait_time=self.max_wait_time, bin_dir=self.bin_dir,
                                 isolation=self.isolations[i])

    def superexec_command(self, i: int) -> list[str]:
        return superexec_command(self.node_ports[i], bin_dir=self.bin_dir)

    def node_env(self, i: int) -> dict[str, str]:
        """What SuperNode ``i`` (and its ``flower-superexec``) get on top of ``FLWR_HOME``: its data directory and
        the executor's poll interval."""
        data = self.data_dirs[i]
        return {**({DATA_ENV: str(data)} if data else {}),
                **({TASK_POLL_ENV: f"{self.task_poll_interval:g}"} if self.task_poll_interval is not None else {})}

    def start_superlink(self) -> Process:
        if self.superlink is not None and self.superlink.popen.poll() is None:
            raise DeploymentError("the SuperLink is already running")
        d = self.workdir / "superlink"
        self.superlink = self._spawn("superlink", self.superlink_command(), self._env(d / "home"), d / "superlink.log")
        self._wait_for_health()
        return self.superlink

    def _wait_for_health(self) -> None:
        assert self.superlink is not None
        scheme = "https" if self.certificates else "http"
        url = f"{scheme}://{HOST}:{self.port}/health"
        ctx = ssl.create_default_context(cafile=str(self.certificates.ca)) if self.certificates else None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.superlink.popen.poll() is not None:
                raise DeploymentError(f"the SuperLink exited with code {self.superlink.popen.returncode}:\n{log_tail(self.superlink.log)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not answer {url} within {self.startup_timeout:.0f} s:\n{log_tail(self.superlink.log)}")
            time.sleep(0.2)
        if self.transport.fleet_port_of_its_own:  # the gRPC Fleet API has no /health: wait for its port
            self._wait_for_port(self.fleet_port, deadline)

    def _wait_for_port(self, port: int, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"nothing listens on {HOST}:{port} after {self.startup_timeout:.0f} s")
            time.sleep(0.2)

    def start_node(self, i: int, *, wait: bool = True) -> Process:
        """Start SuperNode ``i`` (again, after :meth:`stop_node`): same command, node config, memory and
        data directory, Runtime API port and ``FLWR_HOME``. The SuperLink gives it a new node id, and
        its ``context.state`` starts empty (only ``memory-dir`` survives)."""
        if not 0 <= i < self.nodes:
            raise IndexError(f"node {i} out of range [0, {self.nodes})")
        current = self.supernodes[i]
        if current is not None and current.popen.poll() is None:
            raise DeploymentError(f"SuperNode {i} is already running (pid {current.pid})")
        if current is not None:
            self.retired.append(current)
        d = self.node_dir(i)
        if self.memory:
            self.memory_dir(i).mkdir(parents=True, exist_ok=True)
        proc = self._spawn(f"supernode-{i}", self.supernode_command(i), self._env(d / "home", self.node_env(i)), d / "supernode.log")
        self.supernodes[i] = proc
        self.node_ids[i] = None
        if self.isolations[i] == "process":  # its executor, a process of its own (it retries until the Runtime API answers)
            if self.executors[i] is not None:
                self.retired.append(self.executors[i])  # type: ignore[arg-type]
            self.executors[i] = self._spawn(f"superexec-{i}", self.superexec_command(i), self._env(d / "home", self.node_env(i)),
                                            d / "superexec.log")
        if wait:
            self.wait_for_node(i)
        return proc

    def wait_for_node(self, i: int) -> int:
        """Wait until SuperNode ``i`` logs its registration; return its node id."""
        proc = self.supernodes[i]
        if proc is None:
            raise DeploymentError(f"SuperNode {i} was never started")
        deadline = time.monotonic() + self.startup_timeout
        while True:
            with proc.log.open(errors="replace") as fh:
                fh.seek(proc.log_offset)
                text = fh.read()
            for line in text.splitlines():
                if NODE_READY in line:
                    self.node_ids[i] = int(line.split(NODE_READY)[1].split()[0])
                    return self.node_ids[i]  # type: ignore[return-value]
            if proc.popen.poll() is not None:
                raise DeploymentError(f"SuperNode {i} exited with code {proc.popen.returncode}:\n{log_tail(proc.log)}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNode {i} did not register within {self.startup_timeout:.0f} s:\n{log_tail(proc.log)}")
            time.sleep(0.2)

    # --- run -------------------------------------------------------------------------------------
    def run_config(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``--run-config`` for ``overrides`` (kebab- or snake-case ExperimentConfig keys).

        Adds ``num-clients`` (the nodes minus ``num-new-clients``), ``clients-per-round = 0`` (all
        nodes) unless given, and an absolute ``results-dir`` (default: a new directory under the
        work directory). Validated against the project's app config before anything is submitted.
        """
        values = {k.replace("_", "-"): v for k, v in (overrides or {}).items()}
        new = int(values.get("num-new-clients", 0))
        values.setdefault("num-clients", self.nodes - new)
        values.setdefault("clients-per-round", 0)
        results = Path(values.get("results-dir") or self.workdir / "runs" / f"run-{len(self.runs) + 1}")
        values["results-dir"] = str(results.resolve())
        if values.get("tracking-dir"):  # the ServerApp's working directory is flwr's, not this one
            values["tracking-dir"] = str(Path(values["tracking-dir"]).resolve())
        cfg = ExperimentConfig.from_mapping({**app_config(self.project_dir), **values})
        if cfg.num_nodes == AUTO_NODES:  # the ServerApp takes -1 as the SuperNodes' count: one client each, unless num-nodes says
            cfg = cfg.replace(num_nodes=0)
        if cfg.num_supernodes != self.nodes:
            raise ValueError(
                f"the run needs {cfg.num_supernodes} SuperNodes (num-nodes, or num-clients + num-new-clients when "
                f"num-nodes = 0), but the deployment has {self.nodes} SuperNodes"
            )
        # Send each value with the type its field has, as flwr checks it against pyproject's type.
        typed = cfg.to_dict()
        return {k: typed[k] for k in values}

    def cli_env(self) -> dict[str, str]:
        """Environment of the ``flwr`` CLI: its own ``FLWR_HOME`` whose config.toml names the SuperLink."""
        home = self.workdir / "cli" / "home"
        env = self._env(home, {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
        (home / "config.toml").write_text(connection_toml(self.control_address, self.certificates))
        return env

    def check_inputs(self, overrides: Mapping[str, Any] | None = None) -> str:
        """Check the run's data and model in this process (:func:`~fedmeta.simulations.preflight.check_inputs`,
        with node 0's data directory unless the run config names one); raises ``InputError`` (one line)."""
        cfg = ExperimentConfig.from_mapping({**app_config(self.project_dir), **self.run_config(overrides)})
        if not cfg.data_dir and self.data_dirs[0] is not None:
            cfg = cfg.replace(data_dir=str(self.data_dirs[0]))
        return check_inputs(cfg)

    def start_run(self, overrides: Mapping[str, Any] | None = None) -> FlwrRun:
        """Check the inputs (:meth:`check_inputs`), then submit the app with ``flwr run --stream`` and
        return at once (see :meth:`run`)."""
        if self.superlink is None or self.superlink.popen.poll() is not None:
            raise DeploymentError("the SuperLink is not running; use start() or a `with` block")
        self.check_inputs(overrides)
        rc = self.run_config(overrides)
        results_dir = Path(rc["results-dir"])
        results_dir.mkdir(parents=True, exist_ok=True)
        argv = flwr_run_command(self.project_dir, rc, bin_dir=self.bin_dir)
        k = len(self.runs) + 1
        started = time.time()
        proc = self._spawn(f"flwr-run-{k}", argv, self.cli_env(), self.workdir / "cli" / f"run-{k}.log")
        run = FlwrRun(self, proc, rc, results_dir, started)
        self.runs.append(run)
        return run

    def run(self, overrides: Mapping[str, Any] | None = None, *, timeout: float | None = 1800.0) -> dict[str, Any]:
        """Run the experiment ``overrides`` on the deployment and return its results JSON.

        The returned dict is what the ServerApp wrote (``fedmeta.simulations.apps.run_server``);
        :attr:`runs` keeps the command, its output and its wall time.
        """
        return self.start_run(overrides).wait(timeout)

    def _finish(self, run: FlwrRun, timeout: float | None) -> dict[str, Any]:
        try:
            code = run.process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._terminate([run.process])
            raise DeploymentError(f"flwr run did not finish within {timeout:.0f} s:\n{log_tail(run.process.log)}") from None
        run.seconds = time.time() - run.started
        found = sorted(p for p in run.results_dir.glob("*.json") if p.stat().st_mtime >= run.started - 1)
        if code != 0 or len(found) != 1:
            why = f"exited with code {code}" if code != 0 else f"left {len(found)} results files in {run.results_dir}"
            link = log_tail(self.superlink.log) if self.superlink else ""
            raise DeploymentError(f"flwr run {why}:\n{log_tail(run.process.log)}\n--- SuperLink log ---\n{link}")
        run.results_path = found[0]
        return json.loads(found[0].read_text())

    # --- stop ------------------------------------------------------------------------------------
    def _terminate(self, procs: Sequence[Process], *, graceful: bool = True, home: str | None = None) -> set[int]:
        """Signal ``procs``' process groups and every related process (:func:`related_processes`)."""
        pids = related_processes([p.pid for p in procs], home=home)
        groups = [p.pid for p in procs if p.popen.poll() is None]  # a group we created, still led by our child
        return terminate(pids, groups, self.stop_timeout, [p.popen for p in procs], graceful)

    def stop_node(self, i: int, *, graceful: bool = True) -> None:
        """Stop SuperNode ``i`` with its superexec and ClientApp processes.

        ``graceful`` sends SIGTERM: the SuperNode deactivates itself at the SuperLink, which drops it
        from ``grid.get_node_ids()`` at once and answers messages still addressed to it with a
        node-unavailable error. ``graceful=False`` is a crash (SIGKILL): the SuperLink keeps listing
        the node until its heartbeats are overdue.
        """
        procs = [p for p in (self.supernodes[i], self.executors[i]) if p is not None and p.popen.poll() is None]
        if not procs:
            return
        left = self._terminate(procs, graceful=graceful)
        if left:
            raise DeploymentError(f"SuperNode {i}: processes {sorted(left)} survived SIGKILL")

    def stop(self) -> None:
        """Stop every process this deployment started, also after a failure: SuperNodes first, then the
        SuperLink and any ``flwr run``, each with every related process (by PID and process group;
        SIGTERM, then SIGKILL after ``stop_timeout``). Raises if a process survives SIGKILL."""
        nodes = [p for p in self.processes() if p.name.startswith(("supernode", "superexec"))]
        left = self._terminate(nodes)
        left |= self._terminate([p for p in self.processes() if p not in nodes], home=str(self.workdir))
        # A process started while the others stopped (a ClientApp an executor was starting) is stopped too, and one
        # slow to die under load is waited for again.
        for _ in range(3):
            late = {p for p in left | self.live_processes() if is_alive(p)}
            if not late:
                break
            left = terminate(late, timeout=self.stop_timeout)
        left = {p for p in left | self.live_processes() if is_alive(p)}
        if left:
            raise DeploymentError(f"processes {sorted(left)} of the deployment in {self.workdir} survived SIGKILL")

    # --- documentation -----------------------------------------------------------------------------
    def shell_commands(self, overrides: Mapping[str, Any] | None = None) -> list[str]:
        """The commands this deployment runs for ``overrides``, one shell line each (environment as ``VAR=...``)."""
        lines = [shell_line(self.superlink_command(), {"FLWR_HOME": self.workdir / "superlink" / "home"})]
        for i in range(self.nodes):
            env = {"FLWR_HOME": self.node_dir(i) / "home", **self.node_env(i)}
            lines.append(shell_line(self.supernode_command(i), env))
            if self.isolations[i] == "process":
                lines.append(shell_line(self.superexec_command(i), env))
        lines.append(shell_line(flwr_run_command(self.project_dir, self.run_config(overrides), bin_dir=self.bin_dir),
                                {"FLWR_HOME": self.workdir / "cli" / "home"}))
        return lines


# --- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmeta-deploy-local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes to start, one partition each (default: 3)")
    p.add_argument("--tls", action="store_true", help="generate a CA and a server certificate and use TLS everywhere")
    p.add_argument("--certs", default=None, metavar="DIR", help="use TLS with DIR/ca.pem, DIR/server.pem, DIR/server.key (e.g. made with openssl)")
    p.add_argument("--flwr-bin", default=None, metavar="DIR", help="directory with the flwr executables (default: this interpreter's)")
    p.add_argument("--workdir", default=None, metavar="DIR", help="logs, FLWR_HOMEs, certificates (default: a new temporary directory)")
    p.add_argument("--memory", action="store_true", help="give every node a memory-dir (personalized models on disk)")
    p.add_argument("--isolation", choices=ISOLATIONS, default="subprocess",
                   help="SuperNode --isolation: subprocess (default; the SuperNode starts its executor) or process (a "
                        "flower-superexec of its own per SuperNode)")
    p.add_argument("--node-data-dir", default=None, metavar="DIR", help="data directory of every SuperNode (FEDMETA_DATA)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default: 3600)")
    p.add_argument("--verbose", action="store_true", help="log every process start")
    ExperimentConfig.add_arguments(p, defaults="pyproject's [tool.flwr.app.config]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    own = {"nodes", "tls", "certs", "flwr_bin", "workdir", "memory", "node_data_dir", "timeout", "verbose", "isolation"}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in own}
    overrides["results_dir"] = str(Path(overrides.get("results_dir", "results")).resolve())
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, stream=sys.stdout)
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    # SIGTERM/SIGHUP to the launcher still stop every process it started (the `with` block's exit).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        certs = Path(args.certs) if args.certs else None
        dep = LocalDeployment(args.nodes, workdir=args.workdir, flwr_bin=args.flwr_bin, tls=args.tls, memory=args.memory,
                              data_dirs=args.node_data_dir, isolation=args.isolation,
                              certificates=Certificates(certs / "ca.pem", certs / "server.pem", certs / "server.key") if certs else None)
        rc = dep.run_config(overrides)  # bad keys or values fail here, before any process starts
        require(ExperimentConfig.from_mapping({**app_config(dep.project_dir), **rc}).track)  # and a missing optional package
        logger.info("inputs: %s", dep.check_inputs(overrides))  # and missing data or a model that does not fit
    except (ValueError, MissingExtra, DeploymentError) as err:
        print(f"fedmeta-deploy-local: error: {err}", file=sys.stderr)
        return 2
    print(f"flwr {dep.version} ({dep.transport.name}), {args.nodes} SuperNodes on {HOST}{', TLS' if dep.certificates else ''}; work directory {dep.workdir}")
    for line in dep.shell_commands(overrides):
        print(f"  $ {line}")
    try:
        with dep:
            t0 = time.perf_counter()
            results = dep.run(overrides, timeout=args.timeout)
            run = dep.runs[-1]
    except DeploymentError as err:
        print(f"fedmeta-deploy-local: error: {err}\n(logs in {dep.workdir})", file=sys.stderr)
        return 1
    rounds = results.get("round_seconds", {})
    per_round = sum(rounds.values()) / len(rounds) if rounds else float("nan")
    print(f"done in {time.perf_counter() - t0:.1f} s: {len(results.get('train', {}))} rounds, {per_round:.2f} s per round "
          f"(ServerApp {results.get('seconds', float('nan')):.1f} s); all processes stopped")
    final = results.get("final") or {}
    if C.ACC_AFTER in final:
        print(f"personalized accuracy {final[C.ACC_AFTER]:.4f} +- {final[C.ACC_AFTER + '-std']:.4f} (before {final[C.ACC_BEFORE]:.4f})")
    print(f"results: {run.results_path}")
    print(f"logs: {dep.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
