"""Test doubles and helpers shared by the tests (imported as ``from fakes import ...``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import config as C
from fedmeta.simulations.processes import pids_mentioning, pids_with_env


def set_task_identity() -> None:
    """Instruction messages need the process-global task identity outside a running app."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    """Duck-typed Grid: nodes with random-looking ids (``offset + step * partition``) that answer the partition query."""

    def __init__(self, num_nodes: int, offset: int = 7000, step: int = 13):
        self.node_to_pid = {offset + step * p: p for p in reversed(range(num_nodes))}
        self.pid_to_node = {p: n for n, p in self.node_to_pid.items()}
        self.sent: list[list[Message]] = []

    def get_node_ids(self):
        return set(self.node_to_pid)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            pid = self.node_to_pid[m.metadata.dst_node_id]
            out.append(Message(RecordDict({"metrics": MetricRecord({C.PARTITION_ID: pid})}), reply_to=m))
        return out


# --- `flwr run .` on Flower's auto-started local SuperLink -------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flwr_processes(home: str) -> set[int]:
    """Every process of a ``flwr run`` under the private FLWR_HOME ``home``: named on its command line (the SuperLink
    and its superexec) or inherited in the environment (the simulation runtime and the Ray it may start)."""
    return set(pids_mentioning(home)) | pids_with_env("FLWR_HOME", home)


def _stop_all(home: str) -> None:
    """Stop every process of the run (:func:`_flwr_processes`), by pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _flwr_processes(home):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _flwr_processes(home) and time.monotonic() < deadline:
            time.sleep(0.2)


def flwr_run(tmp_path: Path, run_config: str, supernodes: int, env: dict[str, str] | None = None,
             federation: str = "") -> subprocess.CompletedProcess:
    """``flwr run .`` (this repository) on Flower's local simulation SuperLink under a private FLWR_HOME, with
    ``env`` added to the environment and ``federation`` (``key=value ...``) to ``--federation-config``; every process it
    started is stopped (by pid) and checked gone."""
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    try:
        proc = subprocess.run(
            ["flwr", "run", str(ROOT), "--run-config", run_config, "--federation-config", f"num-supernodes={supernodes} {federation}".strip(), "--stream"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
    finally:
        _stop_all(str(home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _flwr_processes(str(home))
    return proc
