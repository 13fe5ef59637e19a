"""Where a client keeps its personalized model u between rounds (LocalMOML's memory).

Two stores behind one interface (``load`` / ``save`` / ``clear`` / ``written_in_round``):

* :class:`ContextMemory` keeps u in ``context.state``. That is the default, and the right store in
  simulation. In deployment the SuperNode holds ``context.state`` in RAM only, so u is lost when
  the SuperNode restarts.
* :class:`DiskMemory` keeps u in one file per experiment and partition on the node's disk, so a
  SuperNode that is killed and restarted between rounds continues from the u it had. The
  ``ClientApp`` uses it when the node config names a directory (``memory-dir``, see
  :func:`fedmeta.clients.app.make_client_app`).

File layout::

    <memory-dir>/<experiment-key>/partition-<partition-id>.pt

The experiment key is ``run-<run id>`` by default. The SuperLink assigns the run id once per run,
and a restarted SuperNode reads it from the messages of that run, so the key survives a restart
and differs between runs. A run that sets the run-config key ``experiment`` (a name such as
``moml-seed3``) uses ``experiment-<name>`` instead. Every run with that name then shares the same
memory, which is how a later run picks up the personalized models of an earlier one.

A file is written to a temporary file in the same directory, fsynced and renamed over the old
one (``os.replace``, atomic on POSIX), so a crash mid-write leaves the previous file intact. The
orphaned ``.partition-<i>.pt.*.tmp`` file that a crash can leave behind is never read. On load, a
file that cannot be parsed, was written by something else, belongs to another experiment or
partition, or does not fit the model raises :class:`MemoryFileError`. Such a file is never
silently treated as "no memory". Files are read with ``torch.load(weights_only=True)``, so a
foreign pickle cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor

from fedmeta import config as C
from fedmeta.meta import Params

ParamSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Parameter name -> (shape, dtype): what a stored u must look like to fit the model."""

EXPERIMENT = "experiment"
"""Optional run-config key naming the experiment whose memory a run reads and writes (default: the run id)."""

FORMAT = "fedmeta-client-memory"
VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Memory(Protocol):
    """What the ``ClientApp`` needs from a store of the personalized model u."""

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None) -> Params | None: ...

    def save(self, context: Context, params: Params, server_round: int) -> None: ...

    def clear(self, context: Context) -> None: ...

    def written_in_round(self, context: Context) -> int | None: ...


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


def experiment_key(context: Context) -> str:
    """``experiment-<name>`` if the run config names one under ``experiment``, else ``run-<run id>``."""
    name = context.run_config.get(EXPERIMENT, "")
    if name == "":
        return f"run-{int(context.run_id)}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"run config {EXPERIMENT!r} must be 1-100 characters from [A-Za-z0-9._-] starting with a letter "
            f"or digit (it names a directory), got {name!r}"
        )
    return f"experiment-{name}"


def memory_path(root: Path, experiment: str, partition: int) -> Path:
    """``<root>/<experiment>/partition-<partition>.pt``."""
    return Path(root) / experiment / f"partition-{int(partition)}.pt"


class ContextMemory:
    """The personalized model u kept in ``context.state`` (LocalMOML's memory).

    One load/save pair so that a disk-backed store can replace it. ``load`` returns ``None`` on a
    client's first round (nothing stored yet). The round in which u was written is stored beside
    it, so a client can tell how old its memory is.
    """

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None) -> Params | None:
        if C.PERSONALIZED_MODEL not in context.state:
            return None
        params = context.state[C.PERSONALIZED_MODEL].to_torch_state_dict()
        if expected is not None and (why := spec_mismatch(params, expected)):
            raise ValueError(f"the personalized model in context.state does not fit the model: {why}")
        return {k: v.to(device) for k, v in params.items()}

    def save(self, context: Context, params: Params, server_round: int) -> None:
        context.state[C.PERSONALIZED_MODEL] = ArrayRecord({k: v.detach().cpu() for k, v in params.items()})
        context.state[C.MEMORY_META] = ConfigRecord({C.SERVER_ROUND: server_round})

    def clear(self, context: Context) -> None:
        for key in (C.PERSONALIZED_MODEL, C.MEMORY_META):
            if key in context.state:
                del context.state[key]

    def written_in_round(self, context: Context) -> int | None:
        if C.MEMORY_META not in context.state:
            return None
        return int(context.state[C.MEMORY_META][C.SERVER_ROUND])


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
        return MemoryFileError(f"memory file {path}: {why}; delete it to start this client's memory afresh")

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


def write_memory_file(path: Path, experiment: str, partition: int, params: Params, server_round: int) -> None:
    """Write u atomically: temp file in the same directory, fsync, ``os.replace``, fsync the directory."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable: without this a power cut can bring back the old file.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DiskMemory:
    """The personalized model u kept on the node's disk under ``root`` (see the module docstring).

    Same interface as :class:`ContextMemory`; holds no state of its own, so a fresh instance (a new
    ClientApp process, a restarted SuperNode) sees what an earlier one saved.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, context: Context) -> Path:
        return memory_path(self.root, experiment_key(context), partition_id(context))

    def _read(self, context: Context, expected: ParamSpec | None = None) -> MemoryFile | None:
        path = self.path(context)
        try:
            return read_memory_file(
                path, experiment=experiment_key(context), partition=partition_id(context), expected=expected
            )
        except FileNotFoundError:
            return None  # first round of this partition in this experiment

    def load(self, context: Context, device: torch.device, expected: ParamSpec | None = None) -> Params | None:
        stored = self._read(context, expected)
        return None if stored is None else {k: v.to(device) for k, v in stored.params.items()}

    def save(self, context: Context, params: Params, server_round: int) -> None:
        write_memory_file(self.path(context), experiment_key(context), partition_id(context), params, server_round)

    def clear(self, context: Context) -> None:
        self.path(context).unlink(missing_ok=True)

    def written_in_round(self, context: Context) -> int | None:
        stored = self._read(context)
        return None if stored is None else stored.server_round
