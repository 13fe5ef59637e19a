"""Durable client memory: the disk store, its file format and checks, and the ClientApp wiring."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta.strategies.screening import reply_view
from fedmeta import config as C
from fedmeta.clients import ContextMemory, DiskMemory, MemoryFileError, file_digest, make_client_app, params_digest
from fedmeta.clients import memory as M
from fedmeta import memory_bank as B
from fedmeta.stored_params import param_spec
from fedmeta.data import ClientData
from fedmeta.models import mlp

CPU = torch.device("cpu")


def _context(
    root: Path | None = None, pid: int = 0, run_id: int = 7, node_id: int = 11, run_config: dict | None = None
) -> Context:
    """A node's Context as the SuperNode builds it; ``root`` sets node-config ``memory-dir``."""
    node_config = {C.PARTITION_ID: pid, "num-partitions": 2}
    if root is not None:
        node_config[C.MEMORY_DIR] = str(root)
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def _u(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(3, 2, generator=g), "layer.bias": torch.randn(3, generator=g, dtype=torch.float64)}


def _model():
    return mlp((4, 8, 3))


def _data(seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    return ClientData(
        x_train=torch.randn(40, 4, generator=g), y_train=torch.randint(0, 3, (40,), generator=g),
        x_test=torch.randn(20, 4, generator=g), y_test=torch.randint(0, 3, (20,), generator=g),
    )


def _train_message(server_round: int, memory_policy: str = "keep") -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    cfg = {C.ALGORITHM: "local-moml", C.SERVER_ROUND: server_round, C.SEED: 1,
           **C.LocalMOMLConfig(local_steps=2, memory_policy=memory_policy).to_wire()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same meta-model every round: only u differs
        arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in _model().state_dict().items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(cfg)})
    return Message(content, dst_node_id=11, message_type=MessageType.TRAIN)


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


# --- the store ---------------------------------------------------------------------------------


def test_disk_memory_is_a_noop_on_first_round_and_round_trips_exactly(tmp_path):
    ctx, store = _context(tmp_path), DiskMemory(tmp_path)
    assert store.load(ctx, CPU) is None and store.written_in_round(ctx) is None
    u = _u()
    store.save(ctx, u, server_round=4)
    assert store.path(ctx) == tmp_path / "run-7" / "partition-0.pt" and store.path(ctx).is_file()
    assert _equal(store.load(ctx, CPU, expected=param_spec(u)), u) and store.written_in_round(ctx) == 4
    assert len(ctx.state) == 0  # nothing went to context.state
    store.save(ctx, _u(1), server_round=5)
    assert _equal(store.load(ctx, CPU), _u(1)) and store.written_in_round(ctx) == 5
    store.clear(ctx)
    assert store.load(ctx, CPU) is None and not store.path(ctx).exists()
    store.clear(ctx)  # clearing nothing is fine


def test_files_are_keyed_by_run_and_partition_and_an_explicit_experiment_name(tmp_path):
    store = DiskMemory(tmp_path)
    store.save(_context(pid=0, run_id=7), _u(0), 1)
    store.save(_context(pid=1, run_id=7), _u(1), 1)
    assert _equal(store.load(_context(pid=1, run_id=7), CPU), _u(1))
    assert store.load(_context(pid=0, run_id=8), CPU) is None  # a new run starts without memory
    named = {M.EXPERIMENT: "moml-seed3"}
    store.save(_context(run_id=7, run_config=named), _u(2), 3)
    assert (tmp_path / "experiment-moml-seed3" / "partition-0.pt").is_file()
    assert _equal(store.load(_context(run_id=8, run_config=named), CPU), _u(2))  # a named experiment spans runs
    for bad in ("../escape", ".hidden", "a/b", 5):
        with pytest.raises(ValueError, match="experiment"):
            store.load(_context(run_config={M.EXPERIMENT: bad}), CPU)


def test_a_crash_mid_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path, monkeypatch):
    ctx, store = _context(), DiskMemory(tmp_path)
    store.save(ctx, _u(0), server_round=1)
    before = store.path(ctx).read_bytes()

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(ctx, _u(1), server_round=2)
    monkeypatch.undo()
    assert store.path(ctx).read_bytes() == before
    assert os.listdir(store.path(ctx).parent) == ["partition-0.pt"]
    assert _equal(store.load(ctx, CPU), _u(0)) and store.written_in_round(ctx) == 1


def _corrupt(path: Path, how: str, tmp_path: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random bytes":
        path.write_bytes(os.urandom(len(data)))
    elif how == "bit flip in a tensor":
        flipped = bytearray(data)
        i = data.find(_u(0)["layer.weight"].numpy().tobytes())
        assert i > 0
        flipped[i + 3] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif how == "plain pickle":
        path.write_bytes(pickle.dumps({"format": M.FORMAT, "version": M.VERSION}))
    elif how == "another torch file":
        torch.save({"weight": torch.zeros(3)}, path)
    elif how == "malicious pickle":
        torch.save({"format": M.FORMAT, "payload": _Touch(tmp_path / "pwned")}, path)


class _Touch:
    """Unpickling this (without weights_only) would create a file: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize(
    "how, why",
    [
        ("truncated", "truncated, corrupt or foreign"),
        ("empty", "truncated, corrupt or foreign"),
        ("random bytes", "truncated, corrupt or foreign"),
        ("bit flip in a tensor", "corrupted on disk"),
        ("plain pickle", "truncated, corrupt or foreign"),
        ("another torch file", "not a fedmeta client-memory file"),
        ("malicious pickle", "GLOBAL"),
    ],
)
def test_a_corrupt_or_foreign_file_is_rejected_naming_the_file(tmp_path, how, why):
    ctx, store = _context(), DiskMemory(tmp_path)
    store.save(ctx, _u(0), server_round=1)
    _corrupt(store.path(ctx), how, tmp_path)
    for read in (lambda: store.load(ctx, CPU), lambda: store.written_in_round(ctx), lambda: file_digest(store.path(ctx))):
        with pytest.raises(MemoryFileError, match=why) as err:
            read()
        assert str(store.path(ctx)) in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_a_file_of_another_partition_or_experiment_or_model_is_rejected(tmp_path):
    store = DiskMemory(tmp_path)
    store.save(_context(pid=0, run_id=7), _u(0), 1)
    src = store.path(_context(pid=0, run_id=7))
    shutil.copy(src, store.path(_context(pid=1, run_id=7)))
    with pytest.raises(MemoryFileError, match="belongs to partition 0, this node is partition 1"):
        store.load(_context(pid=1, run_id=7), CPU)
    store.path(_context(run_id=8)).parent.mkdir()
    shutil.copy(src, store.path(_context(run_id=8)))
    with pytest.raises(MemoryFileError, match="belongs to experiment 'run-7', this client runs 'run-8'"):
        store.load(_context(run_id=8), CPU)
    spec = param_spec(_u(0))
    other_shape = {**spec, "layer.weight": ((2, 3), torch.float32)}
    other_dtype = {**spec, "layer.bias": ((3,), torch.float32)}
    for changed in (other_shape, other_dtype, {"other": ((3,), torch.float32)}):
        with pytest.raises(MemoryFileError, match="does not fit the model"):
            store.load(_context(run_id=7), CPU, expected=changed)


def test_context_memory_checks_the_model_too():
    ctx = _context()
    ContextMemory().save(ctx, _u(0), 1)
    with pytest.raises(ValueError, match="does not fit the model"):
        ContextMemory().load(ctx, CPU, expected={"layer.weight": ((3, 2), torch.float32)})


def test_digest_identifies_the_parameters_and_fits_an_int64_metric(tmp_path):
    u = _u(0)
    d = params_digest(u)
    assert d == params_digest({k: v.clone() for k, v in reversed(list(u.items()))})
    assert 0 <= d < 2**63
    nudged = {**u, "layer.weight": u["layer.weight"].clone()}
    nudged["layer.weight"][0, 0] += 1e-6
    assert params_digest(nudged) != d
    assert params_digest({**u, "layer.bias": u["layer.bias"].float()}) != d  # dtype counts
    store, ctx = DiskMemory(tmp_path), _context()
    store.save(ctx, u, 1)
    assert file_digest(store.path(ctx)) == d
    store.save(ctx, nudged, 2)
    assert file_digest(store.path(ctx)) == params_digest(nudged)


# --- the ClientApp -----------------------------------------------------------------------------


def test_train_handler_uses_disk_memory_when_node_config_names_a_directory(tmp_path):
    app = make_client_app(_model, lambda pid: _data(pid))
    ctx = _context(tmp_path)
    first = reply_view(app(_train_message(1), ctx).content)
    assert (first[C.MEMORY_ROUND], first[C.MEMORY_DIGEST]) == (-1, -1)
    path = tmp_path / "run-7" / "partition-0.pt"
    assert path.is_file() and len(ctx.state) == 0
    saved_round1 = file_digest(path)

    # A restarted SuperNode: a new node id and an empty context.state, same run and node config.
    restarted = _context(tmp_path, node_id=99)
    second = reply_view(app(_train_message(2), restarted).content)
    assert (second[C.MEMORY_ROUND], second[C.MEMORY_DIGEST]) == (1, saved_round1)
    assert file_digest(path) != saved_round1 and DiskMemory(tmp_path).written_in_round(restarted) == 2

    # A node that loses its memory (both versions) instead starts over: the restart above really did read the file.
    path.unlink()
    path.with_name("partition-0.prev.pt").unlink()
    fresh = reply_view(app(_train_message(3), _context(tmp_path, node_id=5)).content)
    assert (fresh[C.MEMORY_ROUND], fresh[C.MEMORY_DIGEST]) == (-1, -1)


def test_train_handler_refuses_a_corrupt_memory_file_instead_of_starting_over(tmp_path):
    app = make_client_app(_model, lambda pid: _data(pid))
    app(_train_message(1), _context(tmp_path))
    path = tmp_path / "run-7" / "partition-0.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MemoryFileError, match="partition-0.pt"):
        app(_train_message(2), _context(tmp_path))


def test_train_handler_refuses_memory_of_another_model(tmp_path):
    ctx = _context(tmp_path)
    DiskMemory(tmp_path).save(ctx, {k: v.detach() for k, v in mlp((4, 5, 3)).named_parameters()}, 1)
    with pytest.raises(MemoryFileError, match="does not fit the model"):
        make_client_app(_model, lambda pid: _data(pid))(_train_message(2), ctx)


def test_reset_policy_clears_the_disk_memory(tmp_path):
    app = make_client_app(_model, lambda pid: _data(pid))
    app(_train_message(1), _context(tmp_path))
    reply = reply_view(app(_train_message(2, memory_policy="reset"), _context(tmp_path)).content)
    assert (reply[C.MEMORY_ROUND], reply[C.MEMORY_DIGEST]) == (-1, -1)
    assert not (tmp_path / "run-7" / "partition-0.pt").exists()


def test_simulation_default_stays_context_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_client_app(_model, lambda pid: _data(pid))
    ctx = _context()  # simulation: node config has only partition-id and num-partitions
    app(_train_message(1), ctx)
    assert ContextMemory().written_in_round(ctx) == 1 and list(tmp_path.iterdir()) == []
    u1 = ContextMemory().load(ctx, CPU)
    reply = reply_view(app(_train_message(2), ctx).content)
    assert (reply[C.MEMORY_ROUND], reply[C.MEMORY_DIGEST]) == (1, params_digest(u1))


def test_an_injected_store_wins_over_node_config(tmp_path):
    app = make_client_app(_model, lambda pid: _data(pid), memory=ContextMemory())
    ctx = _context(tmp_path)
    app(_train_message(1), ctx)
    assert ContextMemory().written_in_round(ctx) == 1 and list(tmp_path.iterdir()) == []


# --- MemoryBank: many clients per node in one memory-mapped file ---------------------------------

_BANK_IDS = [7, 3, 19, 42, 0, 11, 5, 23]  # not sorted, not contiguous: rows follow this order


def _bank_spec(dtype: torch.dtype = torch.float32) -> dict:
    return {"l2.weight": ((2, 3), dtype), "l1.weight": ((3, 4), dtype), "l1.bias": ((3,), dtype)}


def _stacked(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, *shape, generator=g).to(dtype) for k, (shape, _) in _bank_spec().items()}


def _unstack(u: dict, i: int) -> dict:
    return {k: v[i] for k, v in u.items()}


def _bits_equal(a: dict, b: dict) -> bool:
    """Bit-exact equality (NaN payloads included), names, shapes and dtypes."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def _row_bytes(bank_dir: Path, row: int, spec: dict) -> bytes:
    """The bytes of both slots of client row ``row`` (data rows 2*row and 2*row+1)."""
    layout = B._RowLayout.of(spec)
    n = layout.length * layout.dtype.itemsize
    with open(bank_dir / layout.data_file, "rb") as fh:
        fh.seek(row * B.BANK_SLOTS * n)
        return fh.read(B.BANK_SLOTS * n)


def _slot_rounds(bank_dir: Path) -> list[set[int]]:
    """Per client row, the rounds of the versions its slots hold (read from rows.meta directly)."""
    rounds = np.fromfile(bank_dir / "rows.meta", dtype=B._ROW_RECORD)["round"].reshape(-1, B.BANK_SLOTS)
    return [{int(r) for r in row if r >= 0} for row in rounds]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bank_round_trips_a_subset_exactly_and_untouched_clients_have_no_memory(tmp_path, dtype):
    spec = _bank_spec(dtype)
    bank = B.MemoryBank(tmp_path / "bank", _BANK_IDS, spec)
    assert bank.load(_BANK_IDS, CPU) == (None, [-1] * len(_BANK_IDS))
    ids = [42, 7, 23]
    u = _stacked(3, dtype=dtype)
    u["l1.bias"][1, 0] = float("nan")  # bits, not values: NaN survives too
    bank.save(ids, u, server_round=4)
    got, rounds = bank.load(ids, CPU)
    assert rounds == [4, 4, 4] and _bits_equal(got, u)
    # another order, with clients that have no memory: their rows are zeros, their round -1
    got, rounds = bank.load([3, 23, 42, 0, 7], CPU)
    assert rounds == [-1, 4, 4, -1, 4]
    for pos, src in ((1, 2), (2, 0), (4, 1)):
        assert _bits_equal(_unstack(got, pos), _unstack(u, src))
    for pos in (0, 3):
        assert all(torch.count_nonzero(v[pos]) == 0 for v in got.values())
    assert bank.load([3, 0, 19], CPU) == (None, [-1, -1, -1])
    assert set(os.listdir(tmp_path / "bank")) == {"header.json", f"u.{str(dtype)[6:]}", "rows.meta"}
    bank.clear([42, 42])
    got, rounds = bank.load([42, 7], CPU)
    assert rounds == [-1, 4] and _bits_equal(_unstack(got, 1), _unstack(u, 1))
    assert all(torch.count_nonzero(v[0]) == 0 for v in got.values())
    bank.close()
    with pytest.raises(ValueError, match="closed"):
        bank.load([7], CPU)


def test_bank_save_leaves_the_rows_of_other_clients_bit_identical(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    first = [7, 3, 19, 42, 0]
    bank.save(first, _stacked(5, seed=1), server_round=1)
    before = {cid: _row_bytes(path, _BANK_IDS.index(cid), spec) for cid in _BANK_IDS}
    second = [19, 11]  # overlaps the first batch in 19 only
    bank.save(second, _stacked(2, seed=2), server_round=2)
    for cid in _BANK_IDS:
        changed = _row_bytes(path, _BANK_IDS.index(cid), spec) != before[cid]
        assert changed == (cid in second), cid
    got, rounds = bank.load(_BANK_IDS, CPU)
    assert rounds == [1, 1, 2, 1, 1, 2, -1, -1]
    u1, u2 = _stacked(5, seed=1), _stacked(2, seed=2)
    for cid, src in ((7, 0), (3, 1), (42, 3), (0, 4)):
        assert _bits_equal(_unstack(got, _BANK_IDS.index(cid)), _unstack(u1, src))
    assert _bits_equal(_unstack(got, _BANK_IDS.index(19)), _unstack(u2, 0))


@pytest.mark.subprocess
def test_bank_saves_are_seen_by_a_new_bank_object_and_by_another_process(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    u = _stacked(3, seed=5)
    bank.save([5, 0, 42], u, server_round=3)
    other = B.MemoryBank(path, _BANK_IDS, spec)  # what a second worker process would open
    got, rounds = other.load([42, 5, 0], CPU)
    assert rounds == [3, 3, 3] and _bits_equal(got, {k: v[[2, 0, 1]] for k, v in u.items()})
    revived = pickle.loads(pickle.dumps(bank))  # how a bank reaches a Ray actor: path, ids and spec only
    assert len(pickle.dumps(bank)) < 2000 and revived.digests([5]) == bank.digests([5])

    # A real other process: checks what this one saved, saves for other clients, which this
    # process's still-open bank must see on its next load.
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_memory import _stacked, _bank_spec, _BANK_IDS
from fedmeta import memory_bank as B
bank = B.MemoryBank({str(path)!r}, _BANK_IDS, _bank_spec())
print(bank.digests([5, 0, 42, 7]))
bank.save([7, 5], _stacked(2, seed=9), server_round=4)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    expected = [M.params_digest(_unstack(u, i)) for i in (0, 1, 2)] + [-1]
    assert out.stdout.strip() == str(expected)
    got, rounds = bank.load([7, 5, 0], CPU)
    assert rounds == [4, 4, 3]
    assert _bits_equal(_unstack(got, 0), _unstack(_stacked(2, seed=9), 0))
    assert _bits_equal(_unstack(got, 1), _unstack(_stacked(2, seed=9), 1))
    assert _bits_equal(_unstack(got, 2), _unstack(u, 1))  # client 0, saved by this process


def test_bank_refuses_a_directory_made_for_other_clients_or_another_model(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    B.MemoryBank(path, _BANK_IDS, spec).save([7], _stacked(1), 1)
    data_before = (path / "u.float32").read_bytes()
    cases = [
        (list(reversed(_BANK_IDS)), spec, "same 8 clients in another order"),
        (_BANK_IDS[:-1], spec, r"other clients .*not hosted here: \[23\]"),
        (_BANK_IDS + [99], spec, r"not in it: \[99\]"),
        (_BANK_IDS, {**spec, "l1.bias": ((4,), torch.float32)}, r"'l1.bias' has shape \(3,\) .* expects \(4,\)"),
        (_BANK_IDS, _bank_spec(torch.float64), "dtype float32, the model expects .* float64"),
        (_BANK_IDS, {**spec, "l3.weight": ((1,), torch.float32)}, "do not match the model's"),
    ]
    for ids, other_spec, why in cases:
        with pytest.raises(M.MemoryFileError, match=why) as err:
            B.MemoryBank(path, ids, other_spec)
        assert str(path) in str(err.value)
    assert (path / "u.float32").read_bytes() == data_before  # nothing was reinitialised
    assert B.MemoryBank(path, _BANK_IDS, spec).load([7], CPU)[1] == [1]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a bank")
    with pytest.raises(M.MemoryFileError, match="no header.json"):
        B.MemoryBank(foreign, _BANK_IDS, spec)
    assert os.listdir(foreign) == ["notes.txt"]

    header = json.loads((path / "header.json").read_text())
    for field, value, why in (("format", "x", "no format tag"), ("version", 99, "format version 99")):
        (path / "header.json").write_text(json.dumps({**header, field: value}))
        with pytest.raises(M.MemoryFileError, match=why):
            B.MemoryBank(path, _BANK_IDS, spec)
    (path / "header.json").write_text(json.dumps(header))
    with open(path / "rows.meta", "r+b") as fh:
        fh.truncate(16 * 3)
    with pytest.raises(M.MemoryFileError, match="rows.meta has 48 bytes, expected 256"):  # 8 clients x 2 slots x 16
        B.MemoryBank(path, _BANK_IDS, spec)
    assert not list(tmp_path.glob(".*.tmp"))  # no leftover of the atomic creation


def test_bank_detects_a_corrupt_row_naming_the_client(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    bank.save([19, 42, 0], _stacked(3), 1)
    layout = B._RowLayout.of(spec)
    offset = B.BANK_SLOTS * _BANK_IDS.index(42) * layout.length * 4 + 17  # slot 0: a first save's target
    with open(path / "u.float32", "r+b") as fh:  # a flipped bit, written by someone else
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x04]))
    for read in (lambda: bank.load([19, 42, 0], CPU), lambda: bank.digests([42])):
        with pytest.raises(M.MemoryFileError, match=r"client 42 does not match its checksum") as err:
            read()
        assert str(path) in str(err.value)
    assert bank.load([19, 0], CPU)[1] == [1, 1]  # the other clients are fine
    bank.clear([42])
    assert bank.load([42], CPU) == (None, [-1])
    bank.save([42], _stacked(1, seed=3), 2)
    assert _bits_equal(bank.load([42], CPU)[0], _stacked(1, seed=3))


def test_bank_a_save_that_dies_before_its_records_leaves_the_previous_version(tmp_path, monkeypatch):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    bank.save([3, 5], _stacked(2, seed=1), 1)

    def crash(self, rows, records):
        raise OSError("killed between the rows and their records")

    monkeypatch.setattr(B.MemoryBank, "_write_records", crash)
    with pytest.raises(OSError, match="killed"):
        bank.save([5, 11], _stacked(2, seed=2), 2)  # 5 had memory, 11 had none
    monkeypatch.undo()
    reopened = B.MemoryBank(path, _BANK_IDS, spec)
    got, rounds = reopened.load([3, 5, 11], CPU)  # no checksum error: no record vouches for the new rows
    u1 = _stacked(2, seed=1)
    assert rounds == [1, 1, -1]
    assert _bits_equal(_unstack(got, 0), _unstack(u1, 0)) and _bits_equal(_unstack(got, 1), _unstack(u1, 1))
    assert all(torch.count_nonzero(v[2]) == 0 for v in got.values())  # half-written, but never had memory


def test_bank_rejects_unknown_clients_and_u_that_does_not_fit(tmp_path):
    spec = _bank_spec()
    bank = B.MemoryBank(tmp_path / "bank", _BANK_IDS, spec)
    for call in (lambda: bank.load([7, 1234], CPU), lambda: bank.save([1234], _stacked(1), 1),
                 lambda: bank.clear([1234]), lambda: bank.digests([1234])):
        with pytest.raises(ValueError, match=r"clients \[1234\] are not hosted"):
            call()
    u = _stacked(2)
    bad = [
        ({**u, "l1.bias": u["l1.bias"].double()}, r"u\['l1.bias'\] has shape \(2, 3\) and dtype torch.float64"),
        ({**u, "l1.bias": u["l1.bias"][:, :2]}, r"expected \(2, 3\)"),
        ({**u, "l1.bias": u["l1.bias"][:1]}, r"stacked over 2 clients"),
        ({k: v for k, v in u.items() if k != "l1.bias"}, "stores"),
    ]
    for params, why in bad:
        with pytest.raises(ValueError, match=why):
            bank.save([7, 3], params, 1)
    with pytest.raises(ValueError, match=r"client ids \[7\] appear more than once"):
        bank.save([7, 7], u, 1)
    with pytest.raises(ValueError, match="server_round must be >= 0"):
        bank.save([7, 3], u, -1)
    with pytest.raises(ValueError, match="appear more than once"):
        B.MemoryBank(tmp_path / "other", [1, 2, 1], spec)
    with pytest.raises(ValueError, match="one dtype"):
        B.MemoryBank(tmp_path / "other", [1], {**spec, "l1.bias": ((3,), torch.float64)})
    assert not (tmp_path / "other").exists()
    assert bank.load([7, 3], CPU) == (None, [-1, -1])  # nothing was written by the refused saves


def test_bank_digests_equal_params_digest_of_each_client_u(tmp_path):
    bank = B.MemoryBank(tmp_path / "bank", _BANK_IDS, _bank_spec())
    u = _stacked(3, seed=4)
    bank.save([23, 0, 11], u, 2)
    assert bank.digests([0, 7, 23, 11]) == [
        params_digest(_unstack(u, 1)), -1, params_digest(_unstack(u, 0)), params_digest(_unstack(u, 2))
    ]
    assert len(set(bank.digests([0, 23, 11]))) == 3


def test_bank_path():
    assert B.bank_path(Path("/m"), "run-7", 2, 4) == Path("/m/run-7/node-2-of-4")
    with pytest.raises(ValueError, match=r"node 4 is not in \[0, 4\)"):
        B.bank_path(Path("/m"), "run-7", 4, 4)


def test_bank_of_10000_clients_is_sparse_and_touches_only_the_rows_it_saves(tmp_path):
    n, p, b = 10_000, 33_450, 100  # the MLP of the brief: 1.34 GB of float32 if dense
    f32 = torch.float32
    spec = {"0.weight": ((64, 400), f32), "0.bias": ((64,), f32), "2.weight": ((7786,), f32)}
    path = tmp_path / "bank"
    bank = B.MemoryBank(path, range(n), spec)

    def disk() -> int:
        return sum(os.stat(f).st_blocks * 512 for f in path.iterdir())

    assert os.stat(path / "u.float32").st_size == n * 2 * p * 4  # two versions per client: 2.7 GB if dense
    assert disk() < 1_000_000  # the header and 320 kB of records; the data file has no blocks
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:b].tolist()
    u = {k: torch.randn(b, *shape) for k, (shape, _) in spec.items()}
    bank.save(ids, u, 1)
    used = disk()
    # 100 rows are 13.4 MB of data themselves (the brief's "< 10 MB" is below that): allow the rows,
    # the pages they share with neighbours, the records and the header, and nothing more.
    assert used < b * p * 4 + b * 2 * 4096 + 1_000_000, used
    assert used < 0.02 * n * p * 4
    got, rounds = bank.load(ids, CPU)
    assert rounds == [1] * b and _bits_equal(got, u)
    bank.save(ids, {k: v + 1 for k, v in u.items()}, 2)  # the second version of the same clients: their other slot
    assert disk() < 2 * b * p * 4 + b * 4 * 4096 + 1_000_000


def test_bank_replaced_or_removed_under_an_open_bank_is_noticed(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, spec, sync=False)  # sync only changes durability, not what is read
    bank.save([7], _stacked(1), 1)
    assert pickle.loads(pickle.dumps(bank)).sync is False
    shutil.rmtree(path)
    with pytest.raises(M.MemoryFileError, match="removed while it was open"):
        bank.load([7], CPU)
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    bank.save([7], _stacked(1), 1)
    shutil.rmtree(path)
    B.MemoryBank(path, _BANK_IDS, spec)  # another process starts this memory afresh
    assert bank.load([7], CPU) == (None, [-1])  # the new files, not the stale mapping
    shutil.rmtree(path)
    B.MemoryBank(path, _BANK_IDS[:4], spec)  # ... or puts other clients' memory there
    with pytest.raises(M.MemoryFileError, match="other clients"):
        bank.load([7], CPU)


# --- versions: resuming a run from a checkpoint (memory-key, before_round) --------------------------


class _Killed(BaseException):
    """Stands for the process being killed at that point (not an Exception: no handler may swallow it)."""


def _disk_versions(store: DiskMemory, ctx: Context, memory_key: str | None = None) -> dict[str, int]:
    """The versions on disk, file name -> round (read directly, validated)."""
    out = {}
    for previous in (False, True):
        path = store.path(ctx, memory_key=memory_key, previous=previous)
        if path.exists():
            out[path.name] = M.read_memory_file(path).server_round
    return out


def test_context_memory_before_round_treats_a_later_u_as_absent():
    ctx, store = _context(), ContextMemory()
    store.save(ctx, _u(0), 3, memory_key="resume-abc")  # the key is accepted and ignored
    assert store.load(ctx, CPU, before_round=3) is None and store.written_in_round(ctx, before_round=3) is None
    assert _equal(store.load(ctx, CPU, before_round=4, memory_key="resume-abc"), _u(0))
    assert store.written_in_round(ctx, before_round=4) == 3 and store.written_in_round(ctx) == 3
    assert _equal(store.load(ctx, CPU), _u(0))
    store.clear(ctx, memory_key="resume-abc")
    assert store.load(ctx, CPU) is None


def test_disk_memory_keeps_the_newest_version_and_the_one_before_it(tmp_path):
    ctx, store = _context(), DiskMemory(tmp_path)
    for r in (1, 2, 3):
        store.save(ctx, _u(r), r)
    # Kept: round 3 (partition-0.pt) and round 2 (partition-0.prev.pt); round 1 is gone.
    assert _disk_versions(store, ctx) == {"partition-0.pt": 3, "partition-0.prev.pt": 2}
    assert sorted(os.listdir(store.path(ctx).parent)) == ["partition-0.prev.pt", "partition-0.pt"]  # no temp file
    for before, want in ((None, 3), (4, 3), (99, 3), (3, 2)):
        assert _equal(store.load(ctx, CPU, before_round=before), _u(want)), before
        assert store.written_in_round(ctx, before_round=before) == want
    assert store.load(ctx, CPU, before_round=2) is None and store.written_in_round(ctx, before_round=2) is None
    assert store.load(ctx, CPU, before_round=1) is None
    store.clear(ctx)
    assert _disk_versions(store, ctx) == {} and store.load(ctx, CPU) is None


def test_disk_memory_resume_reruns_a_round_from_the_u_it_first_started_from(tmp_path):
    key, store = "resume-3f9a0c1d2e4b", DiskMemory(tmp_path)
    first_run = _context(run_id=7)
    for r in (1, 2, 3):  # checkpoint after round 2; killed during round 3, after this client saved it
        store.save(first_run, _u(r), r, memory_key=key)
    resumed = _context(run_id=8)  # the resumed run has a new run id, the same memory-key
    assert _equal(store.load(resumed, CPU, before_round=3, memory_key=key), _u(2))
    assert store.written_in_round(resumed, before_round=3, memory_key=key) == 2
    store.save(resumed, _u(30), 3, memory_key=key)  # round 3 re-run: another u
    assert _disk_versions(store, resumed, key) == {"partition-0.pt": 3, "partition-0.prev.pt": 2}
    assert _equal(store.load(resumed, CPU, before_round=4, memory_key=key), _u(30))
    assert _equal(store.load(resumed, CPU, before_round=3, memory_key=key), _u(2))
    assert store.load(resumed, CPU, before_round=2, memory_key=key) is None


@pytest.mark.parametrize(
    "history, kept",
    [
        ((4, 5), {"partition-0.pt": 3}),  # both from the abandoned future: no keeper
        ((2, 5), {"partition-0.pt": 3, "partition-0.prev.pt": 2}),  # keeper in .prev.pt, the future in .pt
        ((1, 2), {"partition-0.pt": 3, "partition-0.prev.pt": 2}),  # the ordinary case
        ((3,), {"partition-0.pt": 3}),  # the same round again: replaced
    ],
)
def test_disk_memory_save_drops_versions_of_an_abandoned_future(tmp_path, history, kept):
    ctx, store = _context(), DiskMemory(tmp_path)
    for r in history:
        store.save(ctx, _u(r), r)
    store.save(ctx, _u(33), 3)
    assert _disk_versions(store, ctx) == kept
    assert _equal(store.load(ctx, CPU, before_round=10), _u(33)) and store.written_in_round(ctx, before_round=10) == 3
    assert _equal(store.load(ctx, CPU), _u(33))
    below = store.load(ctx, CPU, before_round=3)
    assert (below is None) if len(kept) == 1 else _equal(below, _u(2))


@pytest.mark.parametrize("sync", [True, False])
def test_disk_memory_killed_mid_save_keeps_the_keeper_loadable(tmp_path, monkeypatch, sync):
    ctx, store = _context(), DiskMemory(tmp_path, sync=sync)
    store.save(ctx, _u(1), 1)
    store.save(ctx, _u(2), 2)
    calls = []

    def killed_after_first_step(self, path):
        calls.append(path)
        raise _Killed  # right after os.replace(partition-0.pt -> partition-0.prev.pt)

    monkeypatch.setattr(DiskMemory, "_sync_dir", killed_after_first_step)
    with pytest.raises(_Killed):
        store.save(ctx, _u(3), 3)
    monkeypatch.undo()
    assert len(calls) == 1
    fresh = DiskMemory(tmp_path)  # a restarted node
    assert _disk_versions(fresh, ctx) == {"partition-0.prev.pt": 2}  # the keeper, under its other name
    assert _equal(fresh.load(ctx, CPU, before_round=3), _u(2)) and fresh.written_in_round(ctx, before_round=3) == 2
    assert _equal(fresh.load(ctx, CPU), _u(2))  # the newest there is
    fresh.save(ctx, _u(30), 3)  # the re-run round completes the save
    assert _disk_versions(fresh, ctx) == {"partition-0.pt": 3, "partition-0.prev.pt": 2}
    assert _equal(fresh.load(ctx, CPU, before_round=4), _u(30))


def test_disk_memory_sync_false_skips_every_fsync(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])  # a spy: the real fsync runs
    ctx = _context()
    for r in (1, 2, 3):
        DiskMemory(tmp_path, sync=False).save(ctx, _u(r), r)
    assert calls == []
    DiskMemory(tmp_path).save(ctx, _u(4), 4)
    assert len(calls) == 3  # the new file, the directory after the rename to .prev.pt, after the rename to .pt
    assert _disk_versions(DiskMemory(tmp_path), ctx) == {"partition-0.pt": 4, "partition-0.prev.pt": 3}


def test_disk_memory_reads_and_validates_only_the_files_that_decide(tmp_path):
    ctx, store = _context(), DiskMemory(tmp_path)
    store.save(ctx, _u(0), 1)
    store.save(ctx, _u(2), 2)
    prev = store.path(ctx, previous=True)
    prev.write_bytes(prev.read_bytes()[:100])
    assert _equal(store.load(ctx, CPU), _u(2)) and _equal(store.load(ctx, CPU, before_round=3), _u(2))  # .pt decides
    for read in (lambda: store.load(ctx, CPU, before_round=2), lambda: store.written_in_round(ctx, before_round=2)):
        with pytest.raises(MemoryFileError, match="partition-0.prev.pt: not readable"):
            read()
    with pytest.raises(MemoryFileError, match="partition-0.prev.pt"):
        store.save(ctx, _u(3), 2)  # re-running round 2 needs the round of .prev.pt to know what to keep
    store.save(ctx, _u(3), 3)  # .pt (round 2) is the keeper: the corrupt .prev.pt is replaced unread
    assert _disk_versions(store, ctx) == {"partition-0.pt": 3, "partition-0.prev.pt": 2}
    newest = store.path(ctx)
    newest.write_bytes(b"")
    with pytest.raises(MemoryFileError, match=r"partition-0\.pt: not readable"):  # needed for every decision
        store.load(ctx, CPU, before_round=3)
    store.save(_context(pid=1), _u(0), 1)
    with pytest.raises(MemoryFileError, match="does not fit the model"):  # the model is checked on the chosen file
        store.load(_context(pid=1), CPU, expected={"layer.weight": ((3, 2), torch.float32)})


def test_memory_key_names_the_directory_and_is_validated(tmp_path):
    store, key = DiskMemory(tmp_path), "resume-abc"
    named = {M.EXPERIMENT: "moml-seed3"}
    store.save(_context(run_id=7, run_config=named), _u(0), 1, memory_key=key)  # memory-key wins over experiment
    assert (tmp_path / "experiment-resume-abc" / "partition-0.pt").is_file()
    assert M.experiment_key(_context(), key) == "experiment-resume-abc"
    assert M.experiment_key(_context(), "") == M.experiment_key(_context(), None) == "run-7"
    assert _equal(store.load(_context(run_id=9), CPU, memory_key=key), _u(0))  # a resumed run: new run id
    assert store.load(_context(run_id=7, run_config=named), CPU) is None  # without the key: the experiment's memory
    store.clear(_context(run_id=9), memory_key=key)
    assert not (tmp_path / "experiment-resume-abc" / "partition-0.pt").exists()
    for bad in ("../escape", ".hidden", "a/b", "x" * 101, 5):
        with pytest.raises(ValueError, match="memory-key") as err:
            store.load(_context(), CPU, memory_key=bad)
        assert repr(bad) in str(err.value) and M._NAME.pattern in str(err.value)


def test_bank_keeps_the_newest_version_and_the_one_before_it(tmp_path):
    path, ids = tmp_path / "bank", [42, 7, 23]
    bank = B.MemoryBank(path, _BANK_IDS, _bank_spec())
    for r in (1, 2, 3):
        bank.save(ids, _stacked(3, seed=r), r)
    # Kept per client: rounds 3 and 2 (one per slot); round 1 is gone.
    assert [_slot_rounds(path)[_BANK_IDS.index(c)] for c in ids] == [{2, 3}] * 3
    for before, want in ((None, 3), (4, 3), (3, 2)):
        got, rounds = bank.load(ids, CPU, before_round=before)
        assert rounds == [want] * 3 and _bits_equal(got, _stacked(3, seed=want)), before
        assert bank.digests(ids, before_round=before) == [params_digest(_unstack(got, i)) for i in range(3)]
    assert bank.load(ids, CPU, before_round=2) == (None, [-1, -1, -1])
    assert bank.digests([7, 3], before_round=2) == [-1, -1]
    got, rounds = bank.load([23, 3, 42], CPU, before_round=3)  # a client without memory among them
    assert rounds == [2, -1, 2] and all(torch.count_nonzero(v[1]) == 0 for v in got.values())
    assert _bits_equal(_unstack(got, 0), _unstack(_stacked(3, seed=2), 2))
    bank.clear([7])
    assert _slot_rounds(path)[_BANK_IDS.index(7)] == set() and bank.load([7], CPU, before_round=3) == (None, [-1])


def test_bank_resume_reruns_a_round_from_the_u_it_first_started_from(tmp_path):
    path, spec, ids = tmp_path / "bank", _bank_spec(), [5, 19]
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    for r in (1, 2, 3):  # checkpoint after round 2; killed during round 3, after these clients saved it
        bank.save(ids, _stacked(2, seed=r), r)
    resumed = B.MemoryBank(path, _BANK_IDS, spec)
    got, rounds = resumed.load(ids, CPU, before_round=3)
    assert rounds == [2, 2] and _bits_equal(got, _stacked(2, seed=2))
    resumed.save(ids, _stacked(2, seed=30), 3)  # round 3 re-run: other values
    got, rounds = resumed.load(ids, CPU, before_round=4)
    assert rounds == [3, 3] and _bits_equal(got, _stacked(2, seed=30))
    assert [_slot_rounds(path)[_BANK_IDS.index(c)] for c in ids] == [{2, 3}] * 2
    assert _bits_equal(resumed.load(ids, CPU, before_round=3)[0], _stacked(2, seed=2))


def test_bank_save_drops_versions_of_an_abandoned_future(tmp_path):
    path = tmp_path / "bank"
    bank = B.MemoryBank(path, _BANK_IDS, _bank_spec())
    bank.save([19], _stacked(1, seed=1), 1)  # 7: {5, 4}; 3: {5, 2}; 19: {2, 1}; 0: nothing
    bank.save([7, 3], _stacked(2, seed=4), 4)
    bank.save([3, 19], _stacked(2, seed=2), 2)  # 3's round 4 is an abandoned future: dropped
    bank.save([7, 3], _stacked(2, seed=5), 5)
    assert [_slot_rounds(path)[_BANK_IDS.index(c)] for c in (7, 3, 19, 0)] == [{4, 5}, {2, 5}, {1, 2}, set()]
    ids, u3 = [7, 3, 19, 0], _stacked(4, seed=33)
    bank.save(ids, u3, 3)
    assert [_slot_rounds(path)[_BANK_IDS.index(c)] for c in ids] == [{3}, {2, 3}, {2, 3}, {3}]
    for before in (None, 10):
        got, rounds = bank.load(ids, CPU, before_round=before)
        assert rounds == [3] * 4 and _bits_equal(got, u3)
    got, rounds = bank.load(ids, CPU, before_round=3)
    assert rounds == [-1, 2, 2, -1]
    assert _bits_equal(_unstack(got, 1), _unstack(_stacked(2, seed=2), 0))
    assert _bits_equal(_unstack(got, 2), _unstack(_stacked(2, seed=2), 1))


def _bank_crash_setup(path: Path, spec: dict) -> B.MemoryBank:
    """Client 7: {1, 2}; 3: {1}; 19: {1, 2}, not in the crashing save; 0: nothing."""
    bank = B.MemoryBank(path, _BANK_IDS, spec)
    bank.save([7, 3, 19], _stacked(3, seed=1), 1)
    bank.save([7, 19], _stacked(2, seed=2), 2)
    return bank


def _check_after_bank_crash(path: Path, spec: dict) -> None:
    """What a crash of ``save([7, 3, 0], round 3)`` after the rows, before their records, must leave."""
    fresh = B.MemoryBank(path, _BANK_IDS, spec)  # a restarted node; nothing below may raise
    u1, u2 = _stacked(3, seed=1), _stacked(2, seed=2)
    for before in (None, 3, 4):
        got, rounds = fresh.load([7, 3, 19, 0], CPU, before_round=before)
        assert rounds == [2, 1, 2, -1], before  # every keeper, and 19 untouched
        assert _bits_equal(_unstack(got, 0), _unstack(u2, 0)) and _bits_equal(_unstack(got, 1), _unstack(u1, 1))
        assert _bits_equal(_unstack(got, 2), _unstack(u2, 1))
        assert all(torch.count_nonzero(v[3]) == 0 for v in got.values())
    assert [_slot_rounds(path)[_BANK_IDS.index(c)] for c in (7, 3, 19, 0)] == [{2}, {1}, {1, 2}, set()]
    fresh.save([7, 3, 0], _stacked(3, seed=3), 3)  # the re-run round completes the save
    got, rounds = fresh.load([7, 3, 0], CPU, before_round=4)
    assert rounds == [3, 3, 3] and _bits_equal(got, _stacked(3, seed=3))
    assert fresh.load([7, 3, 0], CPU, before_round=3)[1] == [2, 1, -1]


def test_bank_killed_between_the_rows_and_their_records_keeps_every_keeper(tmp_path, monkeypatch):
    spec, path = _bank_spec(), tmp_path / "bank"
    bank = _bank_crash_setup(path, spec)
    real, calls = B.MemoryBank._write_records, []

    def killed_on_second_call(self, rows, records):
        calls.append(records["round"].tolist())
        if len(calls) == 2:
            raise _Killed  # the rows are written, their records not
        real(self, rows, records)

    monkeypatch.setattr(B.MemoryBank, "_write_records", killed_on_second_call)
    with pytest.raises(_Killed):
        bank.save([7, 3, 0], _stacked(3, seed=3), 3)
    monkeypatch.undo()
    assert calls == [[-1], [3, 3, 3]]  # 1: 7's target slot (round 1) retired; 2: the new records, never written
    _check_after_bank_crash(path, spec)


@pytest.mark.subprocess
def test_bank_a_real_kill_mid_save_keeps_every_keeper(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    _bank_crash_setup(path, spec).close()
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_memory import _stacked, _bank_spec, _BANK_IDS
from fedmeta import memory_bank as B
real, calls = B.MemoryBank._write_records, []
def die_on_second_call(self, rows, records):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)  # no cleanup, no flush: what SIGKILL leaves (the page cache keeps what was written)
    real(self, rows, records)
B.MemoryBank._write_records = die_on_second_call
B.MemoryBank({str(path)!r}, _BANK_IDS, _bank_spec(), sync=False).save([7, 3, 0], _stacked(3, seed=3), 3)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 9, out.stderr
    _check_after_bank_crash(path, spec)


def test_bank_of_format_version_1_is_refused(tmp_path):
    spec, path = _bank_spec(), tmp_path / "bank"
    B.MemoryBank(path, _BANK_IDS, spec).save([7], _stacked(1), 1)
    header = json.loads((path / "header.json").read_text())
    del header["slots"]  # the layout of version 1: one slot per client
    (path / "header.json").write_text(json.dumps({**header, "version": 1}))
    for name in ("u.float32", "rows.meta"):
        with open(path / name, "r+b") as fh:
            fh.truncate(os.stat(path / name).st_size // 2)
    with pytest.raises(M.MemoryFileError, match="format version 1, this fedmeta reads version 2") as err:
        B.MemoryBank(path, _BANK_IDS, spec)
    assert str(path) in str(err.value) and "delete it" in str(err.value)
