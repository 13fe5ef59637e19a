"""The memories of many clients on one node: :class:`MemoryBank`, no Flower.

A third store, :class:`MemoryBank`, serves a node that hosts many clients (thousands of virtual
clients, a batch of which trains per round): the u of all of them (two versions each, as above) in
one memory-mapped file per node, of which only the rows of the clients in a batch are read or
written. It is Flower-free and batch-shaped (stacked u); see its docstring for the layout and the
crash guarantees.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedmeta.files import fsync_dir
from fedmeta.meta import Params
from fedmeta.stored_params import MemoryFileError, ParamSpec, params_digest

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
