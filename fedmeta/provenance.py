"""Where a results file came from: the code, the libraries, the machine, the settings and the command.

:func:`provenance` returns the block every results file carries under ``"provenance"`` (issue 22), so that
a number in a table can be traced to the commit, library versions and machine that produced it::

    {"git": {"commit": "9195f6a...", "dirty": false},
     "versions": {"fedmeta": "0.1.0", "torch": "2.14.1+cu130", "flwr": "1.42.0", "ray": "2.55.1", "numpy": "..."},
     "python": "3.11.7", "platform": "Linux-...", "cpu": {"model": "...", "cores": 2, "usable_cores": 2},
     "gpus": [], "torch_threads": 2, "config": {...}, "command": "python -m fedmeta.simulations.run ...",
     "started": "2026-12-04T17:02:11+00:00", "wall_seconds": 383.2}

Library versions are read from the installed distributions' metadata (nothing is imported for them, so the
core stays free of Flower and Ray). The commit comes from ``git`` run on the checkout that holds the
``fedmeta`` package; a copy without ``.git`` (e.g. a Flower App installed on a SuperNode) records
``{"commit": null, "dirty": null, "why": ...}`` instead of failing the run. It is read once, when this module is
imported (:func:`code_state`): a checkout that moves on during a long run does not change what its results say.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The directory holding the ``fedmeta`` package: the repository root in a checkout."""
DISTRIBUTIONS = ("fedmeta", "torch", "flwr", "ray", "numpy")
"""Distributions whose versions every results file records (``None``: not installed)."""
KEYS = ("git", "versions", "python", "platform", "cpu", "gpus", "torch_threads", "config", "command", "started", "wall_seconds")
"""The keys of the block, in order."""


def git_state(root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout at ``root`` (tracked files only: an untracked results
    directory does not make a tree dirty), or ``{"commit": None, "dirty": None, "why": ...}`` without one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True).stdout

    if not (root / ".git").exists():  # not a checkout (git would report an enclosing repository's state)
        return {"commit": None, "dirty": None, "why": f"{root} is not a git checkout"}
    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except Exception as err:  # no git, a broken checkout, a sandbox that refuses processes: the run still ends well
        why = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) and err.stderr else str(err)
        return {"commit": None, "dirty": None, "why": why.splitlines()[0] if why else type(err).__name__}
    return {"commit": commit, "dirty": dirty}


@functools.cache
def code_state(root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """:func:`git_state` of ``root`` the first time this process asks, then the same answer: the commit of the code
    the process imported, even if the checkout moves on (a ``git pull``) while a long run goes. Asked for the
    package's own checkout when this module is imported."""
    return git_state(root)


def versions(names: Sequence[str] = DISTRIBUTIONS) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu() -> dict[str, Any]:
    """The CPU model (``/proc/cpuinfo``, else the machine type), its logical cores and those this process may use."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model or os.uname().machine, "cores": os.cpu_count(), "usable_cores": usable}


def gpus() -> list[str]:
    """Names of the CUDA devices torch sees (empty without CUDA or without torch loaded)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _jsonable(value: Any) -> Any:
    """``value`` as JSON has it: mappings with string keys, tuples as lists, anything else unknown as its string."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def provenance(config: Mapping[str, Any] | None, *, started: float, argv: Sequence[str] | None = None,
               root: Path = PACKAGE_ROOT) -> dict[str, Any]:
    """The provenance block of a run that began at ``started`` (:func:`time.time`) with the resolved
    ``config``; ``argv`` defaults to this process's command line. ``wall_seconds`` is the time from
    ``started`` to this call."""
    torch = sys.modules.get("torch")
    return {
        "git": dict(code_state(root)),
        "versions": versions(),
        "python": platform.python_version(),
        "platform": "-".join(os.uname()[i] for i in (0, 2, 4)),  # system, release, machine (no process, unlike platform.platform)
        "cpu": cpu(),
        "gpus": gpus(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "config": _jsonable(config),
        "command": shlex.join([sys.executable, *sys.argv] if argv is None else list(argv)),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 3),
    }


RUNS_PREFIX = "Runs: "
"""How the line naming a table's provenance (:func:`describe`) begins in a reproduction's ``summary.md``."""


def describe(block: Mapping[str, Any]) -> str:
    """One line naming what a provenance block says produced a result: commit (and whether the tree was clean),
    date, library versions, Python and CPU, e.g. ``commit 417da75 (clean tree), 2026-12-04; fedmeta 0.1.0,
    torch 2.14.1+cu130, flwr 1.42.0, ray 2.55.1; Python 3.11.7; AMD EPYC 7B13, 2 cores``. What the docs print
    under each generated table (``scripts/docs_results.py``)."""
    git = block.get("git") or {}
    if git.get("commit"):
        state = {True: "uncommitted changes", False: "clean tree"}.get(git.get("dirty"), "tree state unknown")
        code = f"commit {git['commit'][:7]} ({state})"
    else:
        code = f"commit unknown ({git.get('why', 'not recorded')})"
    libs = ", ".join(f"{k} {v}" for k, v in (block.get("versions") or {}).items() if v and k != "numpy")
    cpu_ = block.get("cpu") or {}
    machine = f"{cpu_.get('model', '?')}, {cpu_.get('cores', '?')} cores" + (f", GPU {', '.join(block['gpus'])}" if block.get("gpus") else ", no GPU")
    return f"{code}, {str(block.get('started', '?'))[:10]}; {libs}; Python {block.get('python', '?')}; {machine}"


code_state(PACKAGE_ROOT)  # the checkout as this process imported it (see code_state); the key provenance() asks with


def command_parser(config_cls: Any, *, prog: str, doc: str | None) -> Any:
    """The command line of a one-process runner (``python -m fedmeta.centralized``, ``python -m fedmeta.dif_maml``): a flag
    per setting of ``config_cls`` (:meth:`fedmeta.settings.Settings.add_arguments`) and ``--json``."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    config_cls.add_arguments(p)
    p.add_argument("--json", dest="json_path", default=None, help="also write the run's record to this JSON file")
    return p


def run_command(parser: Any, config_cls: Any, argv: Sequence[str] | None, run: Any, summary: Any, *, check: Any = None) -> int:
    """Run a :func:`command_parser` command: a bad setting (or ``check(cfg)`` failing) exits 2 with one line before any
    work; else ``run(cfg, log=print)``, its ``summary(cfg, res)`` line, and with ``--json`` the run's record with its
    provenance."""
    import json

    from fedmeta.extras import MissingExtra
    from fedmeta.tracking import NONE, require

    args = vars(parser.parse_args(argv))
    json_path = args.pop("json_path")
    try:
        cfg = config_cls.from_mapping({k: v for k, v in args.items() if v is not None})
        if check is not None:
            check(cfg)
        require(getattr(cfg, "track", NONE))  # a missing optional package: one line, before any work
    except (ValueError, MissingExtra) as err:
        print(f"{parser.prog.removeprefix('python -m ')}: error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    res = run(cfg, log=lambda line: print(line, flush=True))
    print(summary(cfg, res))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({**res.to_dict(), "provenance": provenance(cfg.to_dict(), started=started)}, fh, indent=1)
    return 0
