"""Test doubles and helpers shared by the tests (imported as ``from fakes import ...``)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
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


# --- strategies against fake grids -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def reply(to: Message, w: np.ndarray, pid: int, num_examples: int, loss: float) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
            "metrics": MetricRecord({C.NUM_EXAMPLES: num_examples, C.TRAIN_LOSS: loss, C.PARTITION_ID: pid}),
        }
    )
    return Message(content, reply_to=to)


def train_messages(strategy, grid, server_round=1):
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    return list(strategy.configure_train(server_round, arrays, ConfigRecord({"user-key": 3}), grid))


class GroupGrid(FakeGrid):
    """Nodes that each host a block of clients and report them (``client-ids``) when asked."""

    def __init__(self, num_nodes: int, num_clients: int, offset: int = 9000):
        super().__init__(num_nodes, offset)
        self.num_clients = num_clients
        self.blocks = {p: [int(i) for i in b] for p, b in enumerate(np.array_split(np.arange(num_clients), num_nodes))}

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        out = []
        for m in messages:
            pid = self.node_to_pid[m.metadata.dst_node_id]
            assert m.content["config"][C.NUM_CLIENTS] == self.num_clients
            rec = MetricRecord({C.PARTITION_ID: pid, C.CLIENT_IDS: self.blocks[pid]})
            out.append(Message(RecordDict({"metrics": rec}), reply_to=m))
        return out


def group_reply(to: Message, models: dict[int, np.ndarray], examples: dict[int, int], weighting: str) -> Message:
    """What a multi-client node answers: its clients' average and per-client lists."""
    ids = list(to.content["config"][C.CLIENT_IDS])
    wts = np.array([examples[c] if weighting == "examples" else 1.0 for c in ids])
    mean = sum(wt * models[c] for wt, c in zip(wts, ids)) / wts.sum()
    metrics = MetricRecord({
        C.NUM_EXAMPLES: sum(examples[c] for c in ids), C.PARTITION_ID: 0, C.CLIENT_IDS: ids,
        C.PER_CLIENT + C.NUM_EXAMPLES: [examples[c] for c in ids],
        C.PER_CLIENT + C.TRAIN_LOSS: [float(c) for c in ids],
        C.PER_CLIENT + C.MEMORY_ROUND: [-1 for _ in ids],
    })
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(mean.astype(np.float32))}), "metrics": metrics}), reply_to=to)


# --- the README's snippets and a strategy on Ray -----------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def doc_snippet(name: str, lang: str = "python", page: str = "README.md") -> str:
    """The code block after ``<!-- snippet: name -->`` in ``page`` (a path from the repository's root,
    e.g. ``docs/tracking.md``); a block indented under a list item comes back without its indentation.
    ``tests/test_docs_examples.py`` checks that every code block of the docs is a snippet that a test reads."""
    pattern = rf"^(?P<indent>[ \t]*)<!-- snippet: {re.escape(name)} -->\n(?P=indent)```{lang}\n(?P<body>.*?)^(?P=indent)```"
    m = re.search(pattern, (ROOT / page).read_text(), re.S | re.M)
    assert m, f"{page} has no {lang} snippet {name!r}"
    indent = m.group("indent")
    return "".join(line[len(indent):] if line.startswith(indent) else line for line in m.group("body").splitlines(keepends=True))


def readme_snippet(name: str, lang: str = "python") -> str:
    """The code block after ``<!-- snippet: name -->`` in the README."""
    return doc_snippet(name, lang)


def simulate_strategy(strategy, cfg, client_app=None, **start_kwargs):
    """Run ``strategy`` in a user-written ServerApp against the fedmeta ClientApp (or ``client_app``) on Ray
    (``start_kwargs``: more arguments of ``strategy.start``)."""
    from flwr.serverapp import Grid, ServerApp

    from fedmeta.simulations.apps import build_client_app, initial_model
    from fedmeta.simulations.engine import run_on_ray

    box = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        box["result"] = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_model(cfg).state_dict()), num_rounds=cfg.num_rounds,
                                       **start_kwargs)

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_on_ray(app, client_app or build_client_app(cfg), num_supernodes=cfg.num_supernodes)
    return box["result"]


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


def flwr_run(tmp_path: Path, run_config: str, supernodes: int | None, env: dict[str, str] | None = None,
             federation: str = "") -> subprocess.CompletedProcess:
    """``flwr run .`` (this repository) on Flower's local simulation SuperLink under a private FLWR_HOME, with
    ``env`` added to the environment and ``federation`` (``key=value ...``) to ``--federation-config``
    (``supernodes=None``: as many SuperNodes as Flower's default federation has); every process it started is
    stopped (by pid) and checked gone."""
    home = tmp_path / "flwr-home"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # Flower starts its own Ray unless ``env`` says
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    federation = f"{'' if supernodes is None else f'num-supernodes={supernodes}'} {federation}".strip()
    federation_args = ["--federation-config", federation] if federation else []
    try:
        proc = subprocess.run(
            ["flwr", "run", str(ROOT), "--run-config", run_config, *federation_args, "--stream"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
    finally:
        _stop_all(str(home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _flwr_processes(str(home))
    return proc


# --- real deployments on 127.0.0.1 (the ``deployment`` fixture) --------------------------------------


def descendants_of_pytest() -> set[int]:
    """Live (non-zombie) descendants of this test process."""
    from fedmeta.simulations.processes import process_table

    table = process_table()
    found, grew = set(), True
    while grew:
        grew = False
        for pid, (ppid, state, _, _) in table.items():
            if pid not in found and state != "Z" and (ppid == os.getpid() or ppid in found):
                found.add(pid)
                grew = True
    return found


class Deployments:
    """What the ``deployment`` fixture gives a test: :meth:`start` launches a
    :class:`~fedmeta.simulations.deploy.LocalDeployment` (SuperLink and SuperNodes on 127.0.0.1) and returns it
    running; :meth:`watch` notes the processes alive now (ClientApps come and go); :meth:`stop` stops every
    deployment and checks that nothing they started is alive: their own processes by PID, every process seen
    while they ran (superexecs, ServerApps, ClientApps), anything with FLWR_HOME below their work directories,
    and any new descendant of the test process. The fixture calls :meth:`stop` at teardown if the test did not."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.baseline = workdir, descendants_of_pytest()
        self.started: list = []
        self.seen: set[int] = set()
        self.stopped = False

    def start(self, nodes: int, **kwargs):
        from fedmeta.simulations.deploy import LocalDeployment

        kwargs.setdefault("workdir", self.workdir / f"deploy{len(self.started) or ''}")
        dep = LocalDeployment(nodes, **kwargs)
        self.started.append(dep)
        dep.__enter__()  # stops what it started if the start fails
        self.watch()
        return dep

    def watch(self) -> None:
        for dep in self.started:
            self.seen |= dep.live_processes()

    def stop(self) -> None:
        from fedmeta.simulations.deploy import is_alive

        if self.stopped:
            return
        self.stopped = True
        self.watch()
        for dep in reversed(self.started):
            dep.__exit__(None, None, None)
        started = {p.pid for dep in self.started for p in dep.processes()}
        assert started and self.seen
        assert not [p for p in self.seen | started if is_alive(p)]
        assert not [dep.live_processes() for dep in self.started if dep.live_processes()]
        assert not descendants_of_pytest() - self.baseline


# --- provenance (issue 22) ----------------------------------------------------------------------------


def check_provenance(block: dict, config: dict | None = None) -> None:
    """The keys of :data:`fedmeta.provenance.KEYS`, filled: used by the writers' tests too."""
    from fedmeta import provenance as P

    assert tuple(block) == P.KEYS
    assert set(block["versions"]) == set(P.DISTRIBUTIONS) and block["versions"]["torch"] and block["versions"]["numpy"]
    assert block["versions"]["fedmeta"] == __import__("fedmeta").__version__
    assert set(block["git"]) >= {"commit", "dirty"}
    assert block["cpu"]["cores"] >= 1 and block["cpu"]["usable_cores"] >= 1
    assert isinstance(block["gpus"], list) and block["python"].count(".") == 2 and block["command"]
    assert block["wall_seconds"] >= 0 and block["started"][:2] == "20" and block["started"].endswith("+00:00")
    if config is not None:
        assert block["config"] == config
