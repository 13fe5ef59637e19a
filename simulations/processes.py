"""The process table (Linux ``/proc``), read in one place: which processes belong to a launcher,
and stopping them by pid and process group. Used by :mod:`fedmeta.simulations.deploy`, by the
benchmarks' memory and CPU samplers and by the tests that start processes (every process a test
starts is stopped by the test, by pid)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: ``[state, ppid, ...]`` (``proc(5)``: utime and stime at 11 and 12,
    the start time at 19), ``None`` if the process is gone. The one parser of a stat line."""
    try:
        text = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def stat_table() -> dict[int, list[str]]:
    """Every live process's :func:`stat_fields` (zombies left out): the table without command lines and
    environments, cheap enough to sample a few times a second."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) and fields[0] != "Z":
            table[int(entry)] = fields
    return table


def tree(root: int, table: Mapping[int, list[str]]) -> list[int]:
    """``root`` and all its live descendants, from a :func:`stat_table`."""
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _read_proc(pid: int) -> tuple[int, str, list[str], bytes] | None:
    """(ppid, state, argv, environ) of a live process, ``None`` if it is gone."""
    base = Path("/proc") / str(pid)
    fields_ = stat_fields(pid)
    try:
        argv = (base / "cmdline").read_bytes().decode(errors="replace").split("\0")
        try:
            environ = (base / "environ").read_bytes()
        except OSError:
            environ = b""
    except OSError:
        return None
    if fields_ is None:
        return None
    return int(fields_[1]), fields_[0], argv, environ


def process_table() -> dict[int, tuple[int, str, list[str], bytes]]:
    """Every live process: pid -> (ppid, state, argv, environ)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _read_proc(int(entry))) is not None:
            table[int(entry)] = info
    return table


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``: all but idle and iowait), ``None`` where
    there is no ``/proc/stat``. Two readings a wall interval apart give the cores busy on average in between."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first.split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def is_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited; only its parent has not reaped it)."""
    info = _read_proc(pid)
    return info is not None and info[1] != "Z"


def _ancestors(table: Mapping[int, tuple[int, str, list[str], bytes]], pid: int) -> set[int]:
    out = set()
    while pid in table and pid not in out and pid > 1:
        out.add(pid)
        pid = table[pid][0]
    return out


def pids_with_env(name: str, value: str) -> set[int]:
    """Live processes (not zombies, never this process or its ancestors) whose environment holds ``name=value``:
    what a launcher marks its processes with, found also when their command line names no path and they have
    re-parented to init. A process that renames itself (Ray's ``ray::DashboardAgent``) may overwrite the
    environment /proc shows: :func:`pids_holding` finds those."""
    table = process_table()
    spared = _ancestors(table, os.getpid())
    entry = f"{name}={value}".encode()
    return {p for p, (_, state, _, env) in table.items() if p not in spared and state != "Z" and entry in env.split(b"\0")}


def pids_holding(prefix: str) -> set[int]:
    """Live processes (never this process or its ancestors) with an open file below the directory ``prefix``: Ray's
    agents rename themselves and their title overwrites the environment /proc shows, but they keep their logs open."""
    me = _ancestors(process_table(), os.getpid())
    root = prefix.rstrip(os.sep) + os.sep
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(root):
                    found.add(int(entry))
                    break
            except OSError:
                continue
    return {p for p in found if is_alive(p)}


def related_processes(roots: Iterable[int], home: str | None = None) -> set[int]:
    """Live processes that belong to ``roots``: the roots, their descendants, processes started with
    ``--parent-pid`` of one of them (Flower's superexec and app processes, also after re-parenting),
    transitively, and -- with ``home`` -- every process whose ``FLWR_HOME`` lies below ``home`` (all
    processes of a :class:`LocalDeployment` inherit one). Never this process or its ancestors."""
    table = process_table()
    spared = _ancestors(table, os.getpid())
    found = {p for p in roots if p in table}
    if home:
        prefix = f"FLWR_HOME={home.rstrip(os.sep)}{os.sep}".encode()
        found |= {p for p, (_, _, _, env) in table.items() if any(e.startswith(prefix) for e in env.split(b"\0"))}
    found -= spared
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, argv, _) in table.items():
            if pid in found or pid in spared:
                continue
            parent = argv[argv.index("--parent-pid") + 1] if "--parent-pid" in argv[:-1] else None
            if ppid in found or (parent is not None and parent.isdigit() and int(parent) in found):
                found.add(pid)
                grew = True
    return {p for p in found if table[p][1] != "Z"}


def terminate(
    pids: Iterable[int],
    groups: Iterable[int] = (),
    timeout: float = 15.0,
    popens: Iterable[subprocess.Popen] = (),
    graceful: bool = True,
) -> set[int]:
    """SIGTERM ``pids`` and process ``groups``, SIGKILL whatever is alive after ``timeout`` s
    (``graceful=False``: SIGKILL at once, a simulated crash).

    ``popens`` (our own children among them) are reaped while waiting: Flower's superexec checks
    its ``--parent-pid`` with ``kill(pid, 0)``, which succeeds on a zombie, so it only exits once its
    parent has been reaped. Returns the pids still alive after SIGKILL (normally none).
    """
    pids, groups, popens = set(pids), set(groups), list(popens)
    steps = ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)) if graceful else ((signal.SIGKILL, 5.0),)
    for sig, wait in steps:
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        for p in pids:
            # One signal per process: Flower's handler restores the default action on the first
            # SIGTERM, so a second one would kill the SuperNode before it deregisters.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(p) not in groups:
                    os.kill(p, sig)
        deadline = time.monotonic() + wait
        while True:
            for po in popens:
                po.poll()
            pids = {p for p in pids if is_alive(p)}
            if not pids or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not pids:
            break
    for po in popens:  # the last of them may have died after the final poll
        with contextlib.suppress(subprocess.TimeoutExpired):
            po.wait(timeout=5)
    return pids


def descendants(root: int) -> dict[int, str]:
    """``pid -> command (argv[0])`` of every live descendant of ``root``."""
    table = process_table()
    out: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _, _, _) in table.items() if ppid in frontier and pid not in out}
        out.update({pid: table[pid][2][0] if table[pid][2] else "" for pid in frontier})
    return out


def pids_mentioning(text: str) -> list[int]:
    """Live processes (but this one) whose command line contains ``text``."""
    me = os.getpid()
    return [pid for pid, (_, state, argv, _) in process_table().items()
            if pid != me and state != "Z" and text in " ".join(argv)]


__all__ = ["descendants", "stat_fields", "stat_table", "tree", "is_alive", "pids_holding", "pids_mentioning", "pids_with_env", "process_table", "related_processes", "terminate"]
