"""Server checkpoints: after every round, the global model, the round and the run's history, written
so that a process killed at any instant leaves a checkpoint to resume from.

A checkpoint is a directory::

    checkpoint.pt   format tag, version, the last completed round k, num_rounds, the memory key,
                    the run's fingerprint, the sampler state and the global model after round k
                    (tensors only: read with ``torch.load(weights_only=True)``)
    rounds.jsonl    the history, one JSON object per completed round: aggregated train and evaluate
                    metrics, each client's train and evaluation metrics, the round's wall time and
                    its rejected replies
    stopped.json    only when the strategy stopped the run because no client could train
                    (``max_failed_rounds``): the round and the reason. A fresh run may replace such
                    a checkpoint; ``resume`` continues it like any unfinished one.

Writing round k (:meth:`CheckpointDir.commit`): append the round's line to ``rounds.jsonl`` and
fsync it, then write ``checkpoint.pt`` to a temporary file, fsync it, rename it over the old one
(atomic on POSIX) and fsync the directory. A kill before the rename leaves checkpoint k-1 and, at
worst, a complete or torn line for round k after it; on load, lines after the checkpoint's round are
ignored (and dropped when a run resumes), so the history always ends at the model's round. Each
round appends one line, so the cost per round does not grow with the length of the run.

The sampler needs no state of its own: the clients of round r are a function of (seed, r) only
(:func:`~fedmeta.strategies.aggregation.sample_partitions`), so the seed (in the fingerprint) and
the round are its complete state, recorded under ``sampler``.

The memory key: a fresh run draws a random name (``resume-<12 hex digits>``) that its train
messages carry under ``memory-key``. Clients key their stored personalized models by it instead of
Flower's run id (which a resumed run does not share), and load the newest version written before
the current round (see :mod:`fedmeta.clients.memory`), so a resumed round starts from the memories
it started from the first time.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord
from fedmeta.files import atomic_write

logger = logging.getLogger("fedmeta")

FORMAT = "fedmeta-server-checkpoint"
VERSION = 1
MODEL_FILE = "checkpoint.pt"
HISTORY_FILE = "rounds.jsonl"
STOPPED_FILE = "stopped.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or from a different run."""


@dataclass
class Checkpoint:
    """What a checkpoint directory holds after round ``round``."""

    round: int
    num_rounds: int
    memory_key: str
    fingerprint: dict[str, Any]
    arrays: ArrayRecord
    history: list[dict[str, Any]] = field(default_factory=list)
    """The history lines of rounds ``1..round``, in order."""

    @property
    def finished(self) -> bool:
        return self.round >= self.num_rounds


def new_memory_key() -> str:
    return f"resume-{uuid.uuid4().hex[:12]}"


def normalized(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, int keys strings)."""
    return json.loads(json.dumps(value))


def fingerprint_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The settings that differ between a checkpoint's run and this one, or ``None``."""
    stored, current = normalized(stored), normalized(current)
    unset = object()

    def show(value: Any) -> str:
        return "(unset)" if value is unset else repr(value)

    diffs = [
        f"{k}: checkpoint {show(stored.get(k, unset))}, now {show(current.get(k, unset))}"
        for k in sorted(set(stored) | set(current))
        if stored.get(k, unset) != current.get(k, unset)
    ]
    return "; ".join(diffs) if diffs else None


class CheckpointDir:
    """Read and write the checkpoint in ``path`` (see the module docstring).

    ``sync=False`` skips the fsyncs: a killed process still loses nothing (the page cache outlives
    it), a power cut may lose the last rounds.
    """

    def __init__(self, path: str | Path, *, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def stopped_file(self) -> Path:
        return self.path / STOPPED_FILE

    def exists(self) -> bool:
        return self.model_file.exists()

    def stopped(self) -> dict[str, Any] | None:
        """The reason the strategy stopped this run (see :meth:`mark_stopped`), or ``None``."""
        try:
            return json.loads(self.stopped_file.read_text())
        except (OSError, ValueError):
            return None

    def mark_stopped(self, server_round: int, reason: str) -> None:
        """Record that the run was stopped in ``server_round`` because no client could train."""
        self._atomic_write(self.stopped_file, json.dumps({"round": int(server_round), "reason": reason}).encode())

    # --- reading -------------------------------------------------------------------------------
    def load(self) -> Checkpoint:
        """The checkpoint and its history up to its round; :class:`CheckpointError` if unusable."""

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"checkpoint {self.model_file}: {why}")

        if not self.exists():
            raise CheckpointError(f"no checkpoint in {self.path} (no {MODEL_FILE}): nothing to resume")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                blob: Any = torch.load(self.model_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise bad(f"not readable as a tensors-only torch file ({type(e).__name__})") from e
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise bad(f"not a fedmeta server checkpoint (no format tag {FORMAT!r})")
        if blob.get("version") != VERSION:
            raise bad(f"format version {blob.get('version')!r}, this fedmeta reads version {VERSION}")
        missing = [k for k in ("round", "num_rounds", "memory_key", "fingerprint", "arrays") if k not in blob]
        if missing:
            raise bad(f"missing fields {missing}")
        rnd = blob["round"]
        history = self._read_history(rnd)
        return Checkpoint(rnd, blob["num_rounds"], blob["memory_key"], json.loads(blob["fingerprint"]),
                          ArrayRecord(blob["arrays"]), history)

    def _read_history(self, last_round: int) -> list[dict[str, Any]]:
        """Lines of rounds ``1..last_round``; a later or torn line (a kill mid-commit) is ignored."""
        lines = self.history_file.read_text().splitlines() if self.history_file.exists() else []
        history = []
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    break  # the torn last line of a round whose commit did not complete
                raise CheckpointError(f"{self.history_file}: line {i + 1} is not JSON (corrupted)") from None
            if entry.get("round", 0) > last_round:
                break
            history.append(entry)
        got = [e.get("round") for e in history]
        if got != list(range(1, last_round + 1)):
            raise CheckpointError(f"{self.history_file}: holds rounds {got[:5]}{'...' if len(got) > 5 else ''}, "
                                  f"expected 1..{last_round} for the checkpoint's round {last_round}")
        return history

    # --- writing -------------------------------------------------------------------------------
    def begin(self, arrays: ArrayRecord, *, num_rounds: int, memory_key: str, fingerprint: Mapping[str, Any],
              history: list[dict[str, Any]] | None = None, at_round: int = 0) -> None:
        """Start (or, on resume, re-base) the checkpoint: the history file holds exactly ``history``
        and the model file ``arrays`` as of round ``at_round``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.stopped_file.unlink(missing_ok=True)
        self._meta = {"num_rounds": int(num_rounds), "memory_key": memory_key, "fingerprint": json.dumps(normalized(fingerprint))}
        self._atomic_write(self.history_file, "".join(_line(e) for e in (history or [])).encode())
        self._write_model(at_round, arrays)

    def commit(self, server_round: int, arrays: ArrayRecord, entry: Mapping[str, Any]) -> None:
        """Record round ``server_round``: its history line, then the model (atomically)."""
        with self.history_file.open("ab") as fh:
            fh.write(_line({"round": server_round, **entry}).encode())
            fh.flush()
            if self.sync:
                os.fsync(fh.fileno())
        self._write_model(server_round, arrays)

    def _write_model(self, server_round: int, arrays: ArrayRecord) -> None:
        blob = {
            "format": FORMAT,
            "version": VERSION,
            "round": int(server_round),
            **self._meta,
            "sampler": {"next_round": int(server_round) + 1},
            "arrays": {k: v.detach().cpu() for k, v in arrays.to_torch_state_dict().items()},
        }
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        self._atomic_write(self.model_file, buffer.getvalue())

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """Temporary file in the same directory, fsync, rename over ``path``, fsync the directory."""
        atomic_write(path, lambda fh: fh.write(data), sync=self.sync)


def _line(entry: Mapping[str, Any]) -> str:
    # NaN/Inf metrics (a diverged run) are kept: Python's json reads back its own NaN/Infinity.
    return json.dumps(entry, separators=(",", ":"), allow_nan=True, default=_jsonable) + "\n"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint's history")


def check_can_start(path: str | Path, resume: bool) -> Checkpoint | None:
    """Before any work: the checkpoint a run resumes from, or ``None`` for a fresh run.

    A fresh run refuses to replace an unfinished checkpoint (it is a run that can be resumed); it
    replaces a finished one, and one whose run the strategy stopped because no client could train
    (:meth:`CheckpointDir.mark_stopped`). Resuming needs a checkpoint.
    """
    ckpt = CheckpointDir(path)
    if resume:
        return ckpt.load()
    if ckpt.exists():
        try:
            old = ckpt.load()
        except CheckpointError:
            old = None
        if (old is None or not old.finished) and ckpt.stopped() is None:
            where = f"round {old.round} of {old.num_rounds}" if old else "unreadable"
            raise CheckpointError(
                f"checkpoint-dir {ckpt.path} holds an unfinished run ({where}): resume it (--resume, run config "
                f"resume=true), or delete the directory or choose another checkpoint-dir to start afresh"
            )
        logger.info("replacing the %s run's checkpoint in %s", "stopped" if ckpt.stopped() else "finished", ckpt.path)
    return None


__all__ = ["Checkpoint", "CheckpointDir", "CheckpointError", "check_can_start", "fingerprint_mismatch", "new_memory_key"]
