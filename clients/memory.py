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

A third store, :class:`MemoryBank`, serves a node that hosts many clients (thousands of virtual
clients, a batch of which trains per round): the u of all of them (two versions each, as above) in
one memory-mapped file per node, of which only the rows of the clients in a batch are read or
written. It is Flower-free and batch-shaped (stacked u); see its docstring for the layout and the
crash guarantees.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor

from fedmeta import config as C
from fedmeta import files
from fedmeta.files import fsync_dir
from fedmeta.meta import Params

ParamSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Parameter name -> (shape, dtype): what a stored u must look like to fit the model."""

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

    def load(
        self,
        context: Context,
        device: torch.device,
        expected: ParamSpec | None = None,
        *,
        before_round: int | None = None,
        memory_key: str | None = None,
    ) -> Params | None: ...

    def save(self, context: Context, params: Params, server_round: int, *, memory_key: str | None = None) -> None: ...

    def clear(self, context: Context, *, memory_key: str | None = None) -> None: ...

    def written_in_round(
        self, context: Context, *, before_round: int | None = None, memory_key: str | None = None
    ) -> int | None: ...


class MemoryFileError(ValueError):
    """A memory file that cannot be used: unreadable, foreign, or not matching the model."""


def params_digest(params: Mapping[str, Tensor]) -> int:
    """A digest of a parameter dict that fits in an int64 MetricRecord value (60 bits of SHA-256).

    It covers every tensor's name, dtype, shape and bytes, in sorted name order, so equal digests
    mean bit-identical parameters whatever device they sit on.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int(h.hexdigest()[:15], 16)


def param_spec(params: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in params.items()}


def spec_mismatch(params: Mapping[str, Tensor], expected: ParamSpec) -> str | None:
    """Why ``params`` does not fit ``expected`` (names, then shapes and dtypes), or ``None`` if it does."""
    if set(params) != set(expected):
        return f"parameters {sorted(params)} do not match the model's {sorted(expected)}"
    for k, (shape, dtype) in expected.items():
        got = (tuple(params[k].shape), params[k].dtype)
        if got != (tuple(shape), dtype):
            return f"parameter {k!r} has shape {got[0]} and dtype {got[1]}, the model expects {tuple(shape)} and {dtype}"
    return None


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

    def load(
        self,
        context: Context,
        device: torch.device,
        expected: ParamSpec | None = None,
        *,
        before_round: int | None = None,
        memory_key: str | None = None,
    ) -> Params | None:
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
        recorded = {k: (tuple(int(n) for n in s["shape"]), _dtype(s["dtype"])) for k, s in spec.items()}
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


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def file_digest(path: Path) -> int:
    """:func:`params_digest` of the u stored in a memory file (validated), the value a client reports
    as ``memory-digest`` when it starts a round from this file."""
    return read_memory_file(path).digest


def write_memory_file(
    path: Path, experiment: str, partition: int, params: Params, server_round: int, *, sync: bool = True
) -> None:
    """Write u atomically: temp file in the same directory, fsync, ``os.replace``, fsync the directory.

    ``sync=False`` skips both fsyncs: still atomic for a killed process (the page cache outlives it),
    not durable across a power cut.
    """
    path = Path(path)
    files.replace(_write_temp(path, experiment, partition, params, server_round, sync=sync), path, sync=sync)


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

    def load(
        self,
        context: Context,
        device: torch.device,
        expected: ParamSpec | None = None,
        *,
        before_round: int | None = None,
        memory_key: str | None = None,
    ) -> Params | None:
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

BANK_FORMAT = "fedmeta-memory-bank"
BANK_VERSION = 2
BANK_HEADER = "header.json"
BANK_ROWS = "rows.meta"
BANK_SLOTS = 2
"""Versions of u kept per client: slot s of client row i is data row ``BANK_SLOTS * i + s``."""

_ROW_RECORD = np.dtype([("round", "<i8"), ("crc32", "<u8")])
"""One record per slot in ``rows.meta``: the round its u was written in (-1: no version) and the
CRC-32 of (client id, round, row bytes). One 16-byte aligned record, so both fields sit in one sector."""

_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
"""The numpy integer type of each item size: rows are stored as raw bits, so any torch dtype
(bfloat16 has no numpy type) round-trips bit-exactly, NaN payloads included."""

_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_CHECKSUM = "crc32 of the little-endian int64 pair (client id, round), then the row's bytes"


def bank_path(root: Path, experiment: str, node: int, num_nodes: int) -> Path:
    """``<root>/<experiment>/node-<node>-of-<num_nodes>``: the directory of one node's :class:`MemoryBank`."""
    node, num_nodes = operator.index(node), operator.index(num_nodes)
    if not 0 <= node < num_nodes:
        raise ValueError(f"node {node} is not in [0, {num_nodes})")
    return Path(root) / experiment / f"node-{node}-of-{num_nodes}"


@dataclass(frozen=True)
class _RowLayout:
    """Where each parameter sits in a bank row: sorted names, each flattened, one dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # first element of each parameter in the row
    sizes: tuple[int, ...]  # elements of each parameter
    dtype: torch.dtype
    length: int  # P: elements per row

    @classmethod
    def of(cls, spec: ParamSpec) -> _RowLayout:
        if not spec:
            raise ValueError("a MemoryBank needs a non-empty parameter spec")
        names = tuple(sorted(spec))
        shapes, offsets, sizes, dtypes, length = [], [], [], {}, 0
        for name in names:
            shape, dtype = spec[name]
            shape = tuple(operator.index(n) for n in shape)
            if any(n < 0 for n in shape):
                raise ValueError(f"parameter {name!r} has a negative dimension in shape {shape}")
            size = int(np.prod(shape, dtype=np.int64))
            shapes.append(shape), offsets.append(length), sizes.append(size)
            dtypes.setdefault(dtype, []).append(name)
            length += size
        if len(dtypes) != 1:
            by_dtype = {str(d).removeprefix("torch."): ns for d, ns in dtypes.items()}
            raise ValueError(f"a MemoryBank stores all parameters in one dtype, the spec mixes {by_dtype}")
        (dtype,) = dtypes
        if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype.itemsize not in _BITS:
            raise ValueError(f"a MemoryBank cannot store dtype {dtype!r}")
        if length == 0:
            raise ValueError("the parameter spec has no elements")
        return cls(names, tuple(shapes), tuple(offsets), tuple(sizes), dtype, length)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def data_file(self) -> str:
        return f"u.{self.dtype_name}"

    def params(self) -> list[dict[str, Any]]:
        return [{"name": n, "shape": list(s), "dtype": self.dtype_name} for n, s in zip(self.names, self.shapes)]


def _row_crc(client_id: int, server_round: int, row: np.ndarray) -> int:
    return zlib.crc32(row, zlib.crc32(struct.pack("<qq", client_id, server_round)))


def _preview(ids: Sequence[Any], n: int = 8) -> str:
    ids = list(ids)
    return repr(ids) if len(ids) <= n else f"[{', '.join(map(repr, ids[:n]))}, ... ({len(ids)} in all)]"


class MemoryBank:
    """The personalized models u of a fixed set of clients hosted by one node, in one memory-mapped file.

    Built for a node that hosts thousands of (virtual) clients of which a batch trains per round:
    ``load`` and ``save`` read and write only the rows of the clients named, so the memory of the
    clients that do not run never goes through RAM, Ray or a copy, and the store need not fit in RAM
    (the rows are file-backed pages the kernel can evict). Flower-free and batch-shaped: u is a dict
    name -> tensor stacked over the clients, ``[len(ids), *shape]``.

    Layout of the directory ``path``::

        header.json   format tag, version, byte order, the client ids (row order), the parameter spec
                      (sorted names, shapes, dtype), row length P, slots per client, file names,
                      checksum algorithm
        u.<dtype>     (num_clients, 2, P) raw bits in row-major order, memory-mapped: row 2*i+s holds
                      version (slot) s of client client_ids[i], its parameters in sorted name order,
                      each flattened
        rows.meta     (num_clients, 2) 16-byte records, memory-mapped, one per slot: int64 round its u
                      was written in (-1 = no version) and the CRC-32 of (client id, round, row bytes)

    ``u.<dtype>`` is created with ``truncate``, so it is sparse: an untouched bank costs almost no
    disk, and a row costs disk only once written. The two slots double its size (2 * num_clients *
    P * itemsize bytes), not its disk use until both slots of a client have been written.
    ``rows.meta`` is memory-mapped too rather than rewritten whole on each save: a save touches only
    its clients' records, so saves of disjoint clients from different processes cannot lose each
    other's updates, and every load reads the records from the shared page cache, never a stale copy
    (a bank replaced by another process since it was opened is detected by inode and re-opened and
    re-validated).

    A bank is created atomically (built in a temporary sibling directory, fsynced, renamed), so a
    crash never leaves a half-made bank; an orphaned ``.<name>.*.tmp`` directory is never read.
    Opening an existing directory checks the header against the client ids and spec given and
    raises :class:`MemoryFileError` on any difference (a bank of format version 1, with one slot
    per client, included): someone else's memory is never reinitialised.

    Versions (see the module docstring): ``load`` returns per client the slot with the largest
    round, or with ``before_round=r`` the largest round < r (none: round -1, zero row). ``save`` in
    round r keeps per client the slot with the largest round < r (the keeper) and writes the new u
    into the other slot (the target); a client without a keeper also loses the version in its other
    slot (a round >= r from an abandoned run), so a later load can never return it.

    Crash guarantees of :meth:`save` (the u of other clients, and every client's keeper, are never
    touched):

    * It marks the target records round -1 and flushes them (``msync``), then writes the target rows
      and flushes them, and only then writes the target records (round, checksum) and flushes those.
      When it returns, the new u is on disk. A record never vouches for bytes that are not on disk,
      and a round and its checksum, sharing one aligned 16-byte record, land together.
    * So a crash (process killed, power cut) at any point leaves each client's keeper intact and
      loadable, and a target slot it tore reads as "no version" (round -1), never as a checksum
      error: after the crash, ``load(before_round=r)`` returns what it returned before the save, and
      re-running the save completes it.
    * ``sync=False`` skips the flushes, which on a disk are most of the cost of a save (the data
      must reach the disk). A killed process still loses nothing and keeps the guarantees above: the
      mapping is the kernel's page cache, which outlives it. After a power cut or kernel crash the
      last saves may be lost or half on disk, in any order; the checksums still catch it: each
      version read is either consistent (perhaps older, as its round says) or raises
      :class:`MemoryFileError` naming the client, never silently garbage. Meant for simulation, where
      durability across power cuts does not matter.
    * CRC-32 misses a random corruption of a row with probability 2**-32; it catches every burst of
      up to 32 bits. Only the slots ``load`` chooses are verified.

    No locking: the bank relies on a node's messages being processed one at a time (possibly in
    different processes, which is fine: every call reads the shared files afresh). Concurrent saves
    of disjoint clients are safe; a load concurrent with a save of the same client may raise the
    checksum error above, never return a mix silently. A bank pickles as (path, ids, spec) and
    re-opens the files on unpickling, so passing it to a Ray actor ships no parameters.
    """

    def __init__(self, path: Path, client_ids: Sequence[int], spec: ParamSpec, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = bool(sync)
        ids = [operator.index(i) for i in client_ids]
        if not ids:
            raise ValueError("a MemoryBank needs at least one client id")
        if len(set(ids)) != len(ids):
            seen: set[int] = set()
            dup = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
            raise ValueError(f"client ids {_preview(dup)} appear more than once")
        if not all(-(2**63) <= i < 2**63 for i in ids):
            raise ValueError("client ids must fit in an int64")
        self.client_ids: tuple[int, ...] = tuple(ids)
        self.spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: (tuple(operator.index(n) for n in shape), dtype) for k, (shape, dtype) in spec.items()
        }
        self._layout = _RowLayout.of(self.spec)
        self._row = {cid: r for r, cid in enumerate(ids)}
        self._data: np.memmap | None = None
        self._records: np.memmap | None = None
        self._identity: tuple | None = None
        if not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            self._create()
        self._open()

    # -- public API --------------------------------------------------------------------------------

    def load(
        self, ids: Sequence[int], device: torch.device, *, before_round: int | None = None
    ) -> tuple[Params | None, list[int]]:
        """The stacked u of ``ids`` and, per client, the round it was written in (-1: no memory).

        Per client the newest version, or with ``before_round`` the newest written in a round
        < ``before_round``. u is a copy on ``device`` in the spec's dtype, ``[len(ids), *shape]`` per
        parameter, or ``None`` if no client in ``ids`` has such a version; rows of clients without
        one are zeros. Raises :class:`MemoryFileError` naming the clients whose chosen version fails
        its checksum.
        """
        self._current()
        ids, rows = self._rows_of(ids)
        slots = _slots_of(rows)
        records = self._records[slots]  # (b, 2) copy, read now from the shared mapping
        pick, rounds = _newest(records["round"], before_round)
        have = rounds >= 0
        if not have.any():
            return None, rounds.tolist()
        chosen = slots[np.arange(len(ids)), pick]
        records = records[np.arange(len(ids)), pick]
        records["round"] = rounds  # -1 where no version qualifies: never verified
        order = np.argsort(chosen, kind="stable")
        block = self._data[chosen[order]]  # one fancy-indexed copy, rows ascending
        self._verify([ids[j] for j in order], block, records[order])
        if not have.all():
            block[~have[order]] = 0  # another version's bytes, or whatever a torn write left
        inverse = None if _ascending(order) else np.argsort(order)
        u = {}
        for name, shape, a, n in self._params():
            # One numpy copy per parameter (gather and make contiguous): torch's multi-threaded copy of
            # strided memory was several times slower on a 2-core machine.
            part = block[:, a : a + n]
            part = np.ascontiguousarray(part) if inverse is None else part[inverse]
            t = torch.from_numpy(part).view(self._layout.dtype)
            u[name] = t.reshape(len(ids), *shape).to(device)
        return u, rounds.tolist()

    def save(self, ids: Sequence[int], u: Params, server_round: int) -> None:
        """Store the stacked u of ``ids`` (``[len(ids), *shape]`` per parameter) as written in ``server_round``.

        Per client into the slot that is not its keeper (the version with the largest round <
        ``server_round``): target records to -1, target rows, target records, each flushed (see the
        class docstring for the versions kept and what a crash leaves).
        """
        self._current()
        ids, rows = self._rows_of(ids, unique=True)
        server_round = operator.index(server_round)
        if server_round < 0:
            raise ValueError(f"server_round must be >= 0 (-1 marks 'no memory'), got {server_round}")
        layout, b = self._layout, len(ids)
        if set(u) != set(layout.names):
            raise ValueError(f"u has parameters {sorted(u)}, memory bank {self.path} stores {list(layout.names)}")
        for name, shape, _, _ in self._params():
            t = u[name]
            if tuple(t.shape) != (b, *shape) or t.dtype != layout.dtype:
                raise ValueError(
                    f"u[{name!r}] has shape {tuple(t.shape)} and dtype {t.dtype}, expected {(b, *shape)} "
                    f"(stacked over {b} clients) and {layout.dtype}"
                )
        if b == 0:
            return
        bits = _BITS[layout.dtype.itemsize]
        block = np.empty((b, layout.length), dtype=bits)  # rows in the order of ids
        for name, _, a, n in self._params():
            # The raw bits (bit-exact for any dtype), copied by numpy: torch's multi-threaded copy_
            # into foreign memory was an order of magnitude slower on a 2-core machine.
            src = u[name].detach().cpu().view(_TORCH_BITS[layout.dtype.itemsize]).numpy()
            block[:, a : a + n] = src.reshape(b, n)
        records = np.empty(b, dtype=_ROW_RECORD)
        records["round"] = server_round
        records["crc32"] = [_row_crc(cid, server_round, row) for cid, row in zip(ids, block)]

        slots = _slots_of(rows)
        old = self._records[slots]["round"]  # (b, 2)
        keep, kept = _newest(old, server_round)
        at = np.arange(b)
        target_slot = np.where(kept >= 0, 1 - keep, 0)  # no keeper: either slot will do
        target = slots[at, target_slot]
        other = slots[at, 1 - target_slot]
        # 1. No record may vouch for a target row while it is rewritten; a client without a keeper
        #    also loses its other slot (a version of round >= server_round that an abandoned run left).
        abandoned = (kept < 0) & (old[at, 1 - target_slot] != -1)
        retire = np.concatenate([target[old[at, target_slot] != -1], other[abandoned]])
        if retire.size:
            empty = np.zeros(retire.size, dtype=_ROW_RECORD)
            empty["round"] = -1
            self._write_records(np.sort(retire), empty)
        # 2. The rows, ascending (sequential writes), flushed before ...
        order = np.argsort(target, kind="stable")
        if not _ascending(order):
            target, block, records = target[order], block[order], records[order]
        self._write_rows(target, block)
        # 3. ... the records that vouch for them.
        self._write_records(target, records)

    def clear(self, ids: Sequence[int]) -> None:
        """Mark ``ids`` as having no memory, both versions (their rows' bytes are left as they are but never read)."""
        self._current()
        slots = _slots_of(np.unique(self._rows_of(ids)[1])).reshape(-1)
        records = np.zeros(len(slots), dtype=_ROW_RECORD)
        records["round"] = -1
        self._write_records(slots, records)

    def digests(self, ids: Sequence[int], *, before_round: int | None = None) -> list[int]:
        """:func:`params_digest` of each client's u that :meth:`load` returns (as the unstacked dict), or -1 if none."""
        u, rounds = self.load(ids, torch.device("cpu"), before_round=before_round)
        return [-1 if r < 0 else params_digest({k: v[i] for k, v in u.items()}) for i, r in enumerate(rounds)]

    def close(self) -> None:
        """Unmap the files (dropping the only references to the mappings). Idempotent."""
        self._data = self._records = self._identity = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "client_ids": self.client_ids, "spec": self.spec, "sync": self.sync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["client_ids"], state["spec"], sync=state["sync"])  # type: ignore[misc]

    def __repr__(self) -> str:
        layout = self._layout
        return f"MemoryBank({str(self.path)!r}, {len(self.client_ids)} clients x {layout.length} {layout.dtype_name})"

    # -- internals ---------------------------------------------------------------------------------

    def _params(self):
        layout = self._layout
        return zip(layout.names, layout.shapes, layout.offsets, layout.sizes)

    def _header(self) -> dict[str, Any]:
        layout = self._layout
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "byteorder": sys.byteorder,
            "client_ids": list(self.client_ids),
            "params": layout.params(),
            "row_length": layout.length,
            "slots": BANK_SLOTS,
            "data_file": layout.data_file,
            "rows_file": BANK_ROWS,
            "rows_record": [[name, _ROW_RECORD[name].str] for name in _ROW_RECORD.names],
            "checksum": _CHECKSUM,
        }

    def _sizes(self) -> dict[str, int]:
        n, layout = len(self.client_ids) * BANK_SLOTS, self._layout
        return {layout.data_file: n * layout.length * layout.dtype.itemsize, BANK_ROWS: n * _ROW_RECORD.itemsize}

    def _create(self) -> None:
        """Build the bank in a temporary sibling directory and rename it into place."""
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.path.name}.", suffix=".tmp"))
        try:
            sizes = self._sizes()
            with open(tmp / self._layout.data_file, "wb") as fh:
                fh.truncate(sizes[self._layout.data_file])  # sparse: no blocks until a row is written
                os.fsync(fh.fileno())
            records = np.zeros(len(self.client_ids) * BANK_SLOTS, dtype=_ROW_RECORD)
            records["round"] = -1
            with open(tmp / BANK_ROWS, "wb") as fh:
                fh.write(records.tobytes())
                os.fsync(fh.fileno())
            with open(tmp / BANK_HEADER, "w") as fh:
                json.dump(self._header(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            try:
                os.rename(tmp, self.path)  # replaces an empty directory; fails on a non-empty one
            except OSError:
                if not self.path.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process created it first: open that
                return
            fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _open(self) -> None:
        """Read and check the header and file sizes, then map the files."""
        path = self.path

        def bad(why: str) -> MemoryFileError:
            return MemoryFileError(
                f"memory bank {path}: {why}; it is not the memory of these clients and this model: "
                f"use another directory, or delete it to start their memory afresh"
            )

        try:
            text = (path / BANK_HEADER).read_text()
        except (FileNotFoundError, NotADirectoryError):
            raise bad(f"no {BANK_HEADER}, so it is not a memory bank") from None
        try:
            found = json.loads(text)
        except ValueError as e:
            raise bad(f"{BANK_HEADER} is not valid JSON ({e})") from e
        want = self._header()
        if not isinstance(found, dict) or found.get("format") != BANK_FORMAT:
            raise bad(f"{BANK_HEADER} has no format tag {BANK_FORMAT!r}")
        if found.get("version") != BANK_VERSION:
            raise bad(f"format version {found.get('version')!r}, this fedmeta reads version {BANK_VERSION}")
        if found.get("byteorder") != want["byteorder"]:
            raise bad(f"written with byte order {found.get('byteorder')!r}, this machine is {want['byteorder']!r}")
        if found.get("client_ids") != want["client_ids"]:
            raise bad(self._ids_mismatch(found.get("client_ids")))
        if found.get("params") != want["params"]:
            raise bad(self._params_mismatch(found.get("params")))
        for key in ("row_length", "slots", "data_file", "rows_file", "rows_record", "checksum"):
            if found.get(key) != want[key]:
                raise bad(f"header field {key!r} is {found.get(key)!r}, expected {want[key]!r}")
        for name, size in self._sizes().items():
            try:
                got = os.stat(path / name).st_size
            except FileNotFoundError:
                raise bad(f"{name} is missing") from None
            if got != size:  # checked before mapping: numpy would extend a short file, the kernel SIGBUS past its end
                raise bad(f"{name} has {got} bytes, expected {size} (truncated or foreign)")
        layout, n = self._layout, len(self.client_ids) * BANK_SLOTS
        self._data = np.memmap(
            path / layout.data_file, dtype=_BITS[layout.dtype.itemsize], mode="r+", shape=(n, layout.length)
        )
        self._records = np.memmap(path / BANK_ROWS, dtype=_ROW_RECORD, mode="r+", shape=(n,))
        self._identity = self._stat_files()

    def _ids_mismatch(self, theirs: Any) -> str:
        ours = list(self.client_ids)
        if not isinstance(theirs, list) or not all(isinstance(i, int) for i in theirs):
            return "its client ids are unreadable"
        if sorted(theirs) == sorted(ours):
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
            return (
                f"it holds the same {len(ours)} clients in another order "
                f"(row {i} is client {theirs[i]}, here {ours[i]})"
            )
        missing, foreign = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        return (
            f"it holds {len(theirs)} other clients than the {len(ours)} this node hosts "
            f"(not in it: {_preview(missing)}; not hosted here: {_preview(foreign)})"
        )

    def _params_mismatch(self, theirs: Any) -> str:
        try:
            got = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in theirs}
        except (KeyError, TypeError) as e:
            return f"its parameter spec is unreadable ({type(e).__name__}: {e})"
        want = {p["name"]: (tuple(p["shape"]), p["dtype"]) for p in self._layout.params()}
        if set(got) != set(want):
            return f"its parameters {sorted(got)} do not match the model's {sorted(want)}"
        for k in sorted(want):
            if got[k] != want[k]:
                return (
                    f"parameter {k!r} has shape {got[k][0]} and dtype {got[k][1]}, "
                    f"the model expects {want[k][0]} and {want[k][1]}"
                )
        return "its parameter list is not in sorted name order"

    def _stat_files(self) -> tuple:
        out = []
        for name in (self._layout.data_file, BANK_ROWS):
            st = os.stat(self.path / name)
            out.append((st.st_dev, st.st_ino, st.st_size))
        return tuple(out)

    def _current(self) -> None:
        """Fail if closed; re-open (and re-validate) if another process replaced the files since."""
        if self._data is None:
            raise ValueError(f"memory bank {self.path} is closed")
        try:
            now = self._stat_files()
        except FileNotFoundError:
            self.close()
            raise MemoryFileError(f"memory bank {self.path}: its files were removed while it was open") from None
        if now != self._identity:
            self.close()
            self._open()

    def _rows_of(self, ids: Sequence[int], unique: bool = False) -> tuple[list[int], np.ndarray]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError(f"client ids must be integers, got {ids!r:.200}") from None
        unknown = [i for i in ids if i not in self._row]
        if unknown:
            raise ValueError(
                f"clients {_preview(unknown)} are not hosted by memory bank {self.path} "
                f"({len(self.client_ids)} clients: {_preview(self.client_ids, 4)})"
            )
        if unique and len(set(ids)) != len(ids):
            seen: set[int] = set()
            dup = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
            raise ValueError(f"client ids {_preview(dup)} appear more than once")
        return ids, np.fromiter((self._row[i] for i in ids), dtype=np.intp, count=len(ids))

    def _verify(self, ids: list[int], block: np.ndarray, records: np.ndarray) -> None:
        bad = [
            cid
            for cid, row, r, crc in zip(ids, block, records["round"].tolist(), records["crc32"].tolist())
            if r >= 0 and _row_crc(cid, r, row) != crc
        ]
        if bad:
            who = f"client {bad[0]}" if len(bad) == 1 else f"clients {_preview(bad)}"
            raise MemoryFileError(
                f"memory bank {self.path}: the stored u of {who} does not match its checksum (a save that did "
                f"not complete, or corrupted on disk); clear it to start that memory afresh"
            )

    def _write_rows(self, rows: np.ndarray, block: np.ndarray) -> None:
        """Write ``block[j]`` to data row ``rows[j]`` through a file descriptor (the mapping sees it: one
        page cache), then ``fdatasync`` if ``sync``. ``pwrite`` rather than stores into the mapping: a
        store faults each page in first, and the fault's readahead of a sparse file's holes (the
        neighbouring slot) made saving new clients' rows several times slower; a full disk is then
        an ``OSError``, not a SIGBUS."""
        fd = os.open(self.path / self._layout.data_file, os.O_WRONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != self._identity[0]:
                raise MemoryFileError(f"memory bank {self.path}: its files were replaced while saving")
            nbytes = block.shape[1] * block.itemsize
            for r, row in zip(rows.tolist(), block):
                view, offset = memoryview(row).cast("B"), r * nbytes
                while view:
                    n = os.pwrite(fd, view, offset)
                    if n <= 0:
                        raise OSError(f"memory bank {self.path}: pwrite wrote nothing at offset {offset}")
                    view, offset = view[n:], offset + n
            if self.sync:
                os.fdatasync(fd)  # the rows reach the disk before the records that vouch for them
        finally:
            os.close(fd)

    def _write_records(self, rows: np.ndarray, records: np.ndarray) -> None:
        self._records[rows] = records
        if self.sync:
            self._records.flush()


def _slots_of(rows: np.ndarray) -> np.ndarray:
    """``(len(rows), BANK_SLOTS)``: the data rows (and record indices) of the slots of each client row."""
    return rows[:, None] * BANK_SLOTS + np.arange(BANK_SLOTS)


def _newest(rounds: np.ndarray, before_round: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per client (row of ``rounds``, one column per slot): the slot with the largest round >= 0 and
    < ``before_round`` (any round if ``None``), and that round; round -1 (slot 0) if none qualifies."""
    ok = rounds >= 0
    if before_round is not None:
        ok &= rounds < operator.index(before_round)
    masked = np.where(ok, rounds, -1)
    pick = masked.argmax(axis=1)
    return pick, masked[np.arange(len(rounds)), pick]


def _ascending(order: np.ndarray) -> bool:
    return bool(np.all(order[:-1] < order[1:]))
