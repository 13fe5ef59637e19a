"""Where a client keeps its personalized model u between rounds (LocalMOML's memory).

Two stores behind one interface (``load`` / ``save`` / ``clear`` / ``written_in_round``):

* :class:`ContextMemory` keeps u in ``context.state``. That is the default, and the right store in
  simulation. In deployment the SuperNode holds ``context.state`` in RAM only, so u is lost when
  the SuperNode restarts.
* :class:`DiskMemory` keeps u in files per experiment and partition on the node's disk, so a
  SuperNode that is killed and restarted between rounds continues from the u it had. The
  ``ClientApp`` uses it when the node config names a directory (``memory-dir``, see
  :func:`fedmeta.clients.app.make_client_app`).

File layout::

    <memory-dir>/<experiment-key>/partition-<partition-id>.pt        the newest version of u
    <memory-dir>/<experiment-key>/partition-<partition-id>.prev.pt   the version before it, if any

The experiment key is ``run-<run id>`` by default. The SuperLink assigns the run id once per run,
and a restarted SuperNode reads it from the messages of that run, so the key survives a restart
and differs between runs. A run that sets the run-config key ``experiment`` (a name such as
``moml-seed3``) uses ``experiment-<name>`` instead. Every run with that name then shares the same
memory, which is how a later run picks up the personalized models of an earlier one.

Versions and resume. A server that checkpoints after every round sends its train messages the
config key ``memory-key`` (a name such as ``resume-3f9a0c1d2e4b``); the client then passes it as
``memory_key`` (the experiment key becomes ``experiment-<memory-key>``, which a resumed run, with
a new run id, shares) and loads with ``before_round=server_round``: the newest version written in a
round *before* this one. A run killed during round k+1 and resumed from checkpoint k re-runs round
k+1; a client that had already saved its round-(k+1) u then gets the u it started round k+1 from,
not that one. For this the disk stores keep two versions per client: ``save(round=r)`` keeps the
newest version written before round r (the *keeper*) beside the new one and drops every other,
including versions of rounds >= r left by the abandoned run (so they can never be loaded again).
Without ``memory_key`` and ``before_round`` the stores behave as a single-version store: ``load``
returns the newest version. :class:`ContextMemory` keeps one version only (``context.state`` does
not survive the process anyway); with ``before_round`` it treats a u written in that round or later
as absent.

A file is written to a temporary file in the same directory, fsynced and renamed over the old
one (``os.replace``, atomic on POSIX), so a crash mid-write leaves the previous file intact. The
orphaned ``.partition-<i>.pt.*.tmp`` file that a crash can leave behind is never read. On load, a
file that cannot be parsed, was written by something else, belongs to another experiment or
partition, or does not fit the model raises :class:`MemoryFileError`. Such a file is never
silently treated as "no memory". Files are read with ``torch.load(weights_only=True)``, so a
foreign pickle cannot run code.

A third store, :class:`~fedmeta.memory_bank.MemoryBank` (:mod:`fedmeta.memory_bank`, no Flower), serves a node
that hosts many clients.
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor

from fedmeta import config as C
from fedmeta import files
from fedmeta.files import fsync_dir
from fedmeta.stored_params import MemoryFileError, ParamSpec, dtype_named, params_digest, spec_mismatch
from fedmeta.meta import Params

EXPERIMENT = "experiment"
"""Optional run-config key naming the experiment whose memory a run reads and writes (default: the run id)."""

FORMAT = "fedmeta-client-memory"
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Memory(Protocol):
    """What the ``ClientApp`` needs from a store of the personalized model u.

    The keywords are passed only when the server checkpoints (its messages carry ``memory-key``):
    ``memory_key`` names the memory instead of the run (see :func:`experiment_key`), ``before_round``
    asks for the newest version written in a round before it (see the module docstring).
    """

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None, *,
             before_round: int | None = None, memory_key: str | None = None) -> Params | None: ...

    def save(self, context: Context, params: Params, server_round: int, *, memory_key: str | None = None) -> None: ...

    def clear(self, context: Context, *, memory_key: str | None = None) -> None: ...

    def written_in_round(
        self, context: Context, *, before_round: int | None = None, memory_key: str | None = None
    ) -> int | None: ...


def partition_id(context: Context) -> int:
    """The node's ``partition-id`` from its node config."""
    try:
        return int(context.node_config[C.PARTITION_ID])
    except KeyError:
        raise ValueError(
            f"node_config has no {C.PARTITION_ID!r}: start the SuperNode with "
            f"--node-config '{C.PARTITION_ID}=<i> num-partitions=<n>'"
        ) from None


def experiment_key(context: Context, memory_key: str | None = None) -> str:
    """The name of the directory holding a run's memory.

    ``experiment-<memory_key>`` if ``memory_key`` is given (the server's ``memory-key``, sent when it
    checkpoints, so that a resumed run finds the memory of the run it resumes), else
    ``experiment-<name>`` if the run config names one under ``experiment``, else ``run-<run id>``.
    """
    if memory_key is not None and memory_key != "":
        if not isinstance(memory_key, str) or not _NAME.fullmatch(memory_key):
            raise ValueError(
                f"config {C.MEMORY_KEY!r} must be 1-100 characters from [A-Za-z0-9._-] starting with a letter "
                f"or digit (pattern {_NAME.pattern!r}; it names a directory), got {memory_key!r}"
            )
        return f"experiment-{memory_key}"
    name = context.run_config.get(EXPERIMENT, "")
    if name == "":
        return f"run-{int(context.run_id)}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"run config {EXPERIMENT!r} must be 1-100 characters from [A-Za-z0-9._-] starting with a letter "
            f"or digit (it names a directory), got {name!r}"
        )
    return f"experiment-{name}"


def memory_path(root: Path, experiment: str, partition: int, *, previous: bool = False) -> Path:
    """``<root>/<experiment>/partition-<partition>.pt`` (the newest version of u), or with ``previous``
    ``partition-<partition>.prev.pt`` (the version before it)."""
    suffix = ".prev.pt" if previous else ".pt"
    return Path(root) / experiment / f"partition-{int(partition)}{suffix}"


class ContextMemory:
    """The personalized model u kept in ``context.state`` (LocalMOML's memory).

    One load/save pair so that a disk-backed store can replace it. ``load`` returns ``None`` on a
    client's first round (nothing stored yet). The round in which u was written is stored beside
    it, so a client can tell how old its memory is. One version only: ``save`` replaces it, and with
    ``before_round`` a u written in that round or later (or in an unknown round) counts as absent.
    ``memory_key`` is accepted and ignored (``context.state`` belongs to one process of one run).
    """

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None, *,
             before_round: int | None = None, memory_key: str | None = None) -> Params | None:
        if C.PERSONALIZED_MODEL not in context.state:
            return None
        if before_round is not None and self.written_in_round(context, before_round=before_round) is None:
            return None
        params = context.state[C.PERSONALIZED_MODEL].to_torch_state_dict()
        if expected is not None and (why := spec_mismatch(params, expected)):
            raise ValueError(f"the personalized model in context.state does not fit the model: {why}")
        return {k: v.to(device) for k, v in params.items()}

    def save(self, context: Context, params: Params, server_round: int, *, memory_key: str | None = None) -> None:
        context.state[C.PERSONALIZED_MODEL] = ArrayRecord({k: v.detach().cpu() for k, v in params.items()})
        context.state[C.MEMORY_META] = ConfigRecord({C.SERVER_ROUND: server_round})

    def clear(self, context: Context, *, memory_key: str | None = None) -> None:
        for key in (C.PERSONALIZED_MODEL, C.MEMORY_META):
            if key in context.state:
                del context.state[key]

    def written_in_round(
        self, context: Context, *, before_round: int | None = None, memory_key: str | None = None
    ) -> int | None:
        if C.MEMORY_META not in context.state:
            return None
        written = int(context.state[C.MEMORY_META][C.SERVER_ROUND])
        return None if before_round is not None and written >= before_round else written


@dataclass(frozen=True)
class MemoryFile:
    """The validated content of one memory file."""

    path: Path
    experiment: str
    partition: int
    server_round: int
    params: dict[str, Tensor]

    @property
    def digest(self) -> int:
        return params_digest(self.params)


def read_memory_file(
    path: Path,
    *,
    experiment: str | None = None,
    partition: int | None = None,
    expected: ParamSpec | None = None,
) -> MemoryFile:
    """Read and validate a memory file; raise :class:`MemoryFileError` naming the file and the fault.

    ``experiment``, ``partition`` and ``expected`` (the model's parameter spec) are checked when given.
    """
    path = Path(path)

    def bad(why: str) -> MemoryFileError:
        return _file_error(path, why)

    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            blob: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, random bytes, a pickle with non-tensor globals, ...
        cause = f"{type(e).__name__}: {_load_error(e)}"
        raise bad(f"not readable as a tensors-only torch file: truncated, corrupt or foreign ({cause})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise bad(f"not a fedmeta client-memory file (no format tag {FORMAT!r})")
    if blob.get("version") != VERSION:
        raise bad(f"format version {blob.get('version')!r}, this fedmeta reads version {VERSION}")
    fields = ("experiment", "partition", "server-round", "spec", "params", "digest")
    if missing := [k for k in fields if k not in blob]:
        raise bad(f"missing fields {missing}")
    if experiment is not None and blob["experiment"] != experiment:
        raise bad(f"belongs to experiment {blob['experiment']!r}, this client runs {experiment!r}")
    if partition is not None and blob["partition"] != partition:
        raise bad(f"belongs to partition {blob['partition']!r}, this node is partition {partition}")
    params, spec = blob["params"], blob["spec"]
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in params.items()):
        raise bad("its params are not a dict of named tensors")
    try:
        recorded = {k: (tuple(int(n) for n in s["shape"]), dtype_named(s["dtype"])) for k, s in spec.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise bad(f"unreadable parameter spec ({type(e).__name__}: {e})") from e
    if why := spec_mismatch(params, recorded):
        raise bad(f"its tensors disagree with its own header: {why}")
    if blob["digest"] != params_digest(params):
        raise bad("its tensors do not match the digest written with them (corrupted on disk)")
    if expected is not None and (why := spec_mismatch(params, expected)):
        raise bad(f"does not fit the model: {why}")
    if not isinstance(blob["server-round"], int):
        raise bad(f"server-round {blob['server-round']!r} is not an int")
    return MemoryFile(path, str(blob["experiment"]), int(blob["partition"]), blob["server-round"], params)


def _file_error(path: Path, why: str) -> MemoryFileError:
    return MemoryFileError(f"memory file {path}: {why}; delete it to start this client's memory afresh")


def _load_error(e: Exception) -> str:
    """The informative part of a ``torch.load`` error, without torch's advice to retry with
    ``weights_only=False`` (exactly what must not be done with a foreign file)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if any("Weights only load failed" in ln for ln in lines):
        # The cause is the line naming the refused global or opcode ("Unsupported operand 174").
        found = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in lines if "nsupported" in ln]
        return (found[0] if found and found[0] else "refused by torch.load(weights_only=True)").split(". ")[0].rstrip(".")
    return lines[0].split(". ")[0].rstrip(".") if lines else "no data"


def file_digest(path: Path) -> int:
    """:func:`params_digest` of the u stored in a memory file (validated), the value a client reports
    as ``memory-digest`` when it starts a round from this file."""
    return read_memory_file(path).digest


def _write_temp(path: Path, experiment: str, partition: int, params: Params, server_round: int, *, sync: bool) -> Path:
    """Write u to a new temporary file beside ``path`` (fsynced if ``sync``) and return its path.

    The temporary file is removed if writing fails; one left behind by a kill is never read.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "experiment": experiment,
        "partition": int(partition),
        "server-round": int(server_round),
        "spec": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "params": tensors,
        "digest": params_digest(tensors),  # catches bit rot inside the tensors, which torch.load does not
    }
    return files.write_temp(path, lambda fh: torch.save(blob, fh), sync=sync)


class DiskMemory:
    """The personalized model u kept on the node's disk under ``root`` (see the module docstring).

    Same interface as :class:`ContextMemory`; holds no state of its own, so a fresh instance (a new
    ClientApp process, a restarted SuperNode) sees what an earlier one saved. ``memory_key`` selects
    the directory (:func:`experiment_key`).

    Two versions per partition, ``partition-<p>.pt`` (the newest) and ``partition-<p>.prev.pt`` (an
    older one): every state :meth:`save` leaves, even half done, has ``.prev.pt`` older than ``.pt``.
    ``load()`` returns the newest version (``.pt``, else ``.prev.pt``); ``load(before_round=r)`` the
    one with the largest round < r, or ``None``. The files needed to decide are read and validated,
    and a faulty one raises :class:`MemoryFileError` naming it; ``.prev.pt`` is not read when ``.pt``
    decides. :meth:`save` in round r keeps the version with the largest round < r (the keeper) as
    ``.prev.pt`` and the new u as ``.pt``, and removes any other: the new file is written to a temp
    file first, then the keeper is renamed to ``.prev.pt`` if it was ``.pt``, or an abandoned
    ``.prev.pt`` (round >= r, no keeper) is removed, then the temp file is renamed to ``.pt``. Each
    step is atomic and the directory is fsynced after it, so a kill at any point leaves the keeper
    loadable under one of the two names and never exposes a half-written file. ``sync=False`` skips
    every fsync (for simulations: a killed process loses nothing, the page cache outlives it).
    """

    def __init__(self, root: Path, *, sync: bool = True) -> None:
        self.root = Path(root)
        self.sync = bool(sync)

    def path(self, context: Context, *, memory_key: str | None = None, previous: bool = False) -> Path:
        """The newest version's file, or with ``previous`` the older version's."""
        return memory_path(self.root, experiment_key(context, memory_key), partition_id(context), previous=previous)

    def _read(self, context: Context, memory_key: str | None, previous: bool) -> MemoryFile | None:
        path = self.path(context, memory_key=memory_key, previous=previous)
        try:
            return read_memory_file(
                path, experiment=experiment_key(context, memory_key), partition=partition_id(context)
            )
        except FileNotFoundError:
            return None  # first round of this partition in this experiment, or no older version

    def _choose(self, context: Context, before_round: int | None, memory_key: str | None) -> MemoryFile | None:
        """The newest version written before ``before_round`` (any round if ``None``), or ``None``."""
        limit = None if before_round is None else operator.index(before_round)
        for previous in (False, True):  # .prev.pt is always older than .pt: the first that fits is the newest
            stored = self._read(context, memory_key, previous)
            if stored is not None and (limit is None or stored.server_round < limit):
                return stored
        return None

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None, *,
             before_round: int | None = None, memory_key: str | None = None) -> Params | None:
        stored = self._choose(context, before_round, memory_key)
        if stored is None:
            return None
        if expected is not None and (why := spec_mismatch(stored.params, expected)):
            raise _file_error(stored.path, f"does not fit the model: {why}")
        return {k: v.to(device) for k, v in stored.params.items()}

    def written_in_round(
        self, context: Context, *, before_round: int | None = None, memory_key: str | None = None
    ) -> int | None:
        """The round of the version :meth:`load` returns with the same keywords, or ``None``."""
        stored = self._choose(context, before_round, memory_key)
        return None if stored is None else stored.server_round

    def save(self, context: Context, params: Params, server_round: int, *, memory_key: str | None = None) -> None:
        server_round = operator.index(server_round)
        experiment, partition = experiment_key(context, memory_key), partition_id(context)
        newest = self.path(context, memory_key=memory_key)
        prev = self.path(context, memory_key=memory_key, previous=True)
        # Which version to keep: the newest one written before server_round (see the class docstring).
        stored = self._read(context, memory_key, previous=False)
        if stored is not None and stored.server_round < server_round:
            keeper = newest
        else:
            older = self._read(context, memory_key, previous=True)
            keeper = prev if older is not None and older.server_round < server_round else None
        tmp = _write_temp(newest, experiment, partition, params, server_round, sync=self.sync)
        try:
            if keeper == newest:
                os.replace(newest, prev)  # drops the older version; the keeper stays loadable as .prev.pt
                self._sync_dir(newest.parent)
            elif keeper is None and prev.exists():
                prev.unlink()  # an abandoned future (round >= server_round): never to be loaded again
                self._sync_dir(newest.parent)
            os.replace(tmp, newest)  # over an abandoned or older version, or nothing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(newest.parent)

    def clear(self, context: Context, *, memory_key: str | None = None) -> None:
        for previous in (False, True):
            self.path(context, memory_key=memory_key, previous=previous).unlink(missing_ok=True)

    def _sync_dir(self, path: Path) -> None:
        if self.sync:
            fsync_dir(path)


# --- many clients per node: a memory-mapped bank ---------------------------------------------------
