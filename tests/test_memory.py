"""Durable client memory: the disk store, its file format and checks, and the ClientApp wiring."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import config as C
from fedmeta.clients import ContextMemory, DiskMemory, MemoryFileError, file_digest, make_client_app, params_digest
from fedmeta.clients import memory as M
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
    assert _equal(store.load(ctx, CPU, expected=M.param_spec(u)), u) and store.written_in_round(ctx) == 4
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
    spec = M.param_spec(_u(0))
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
    first = app(_train_message(1), ctx).content["metrics"]
    assert (first[C.MEMORY_ROUND], first[C.MEMORY_DIGEST]) == (-1, -1)
    path = tmp_path / "run-7" / "partition-0.pt"
    assert path.is_file() and len(ctx.state) == 0
    saved_round1 = file_digest(path)

    # A restarted SuperNode: a new node id and an empty context.state, same run and node config.
    restarted = _context(tmp_path, node_id=99)
    second = app(_train_message(2), restarted).content["metrics"]
    assert (second[C.MEMORY_ROUND], second[C.MEMORY_DIGEST]) == (1, saved_round1)
    assert file_digest(path) != saved_round1 and DiskMemory(tmp_path).written_in_round(restarted) == 2

    # A node that loses its memory instead starts over: the restart above really did read the file.
    path.unlink()
    fresh = app(_train_message(3), _context(tmp_path, node_id=5)).content["metrics"]
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
    reply = app(_train_message(2, memory_policy="reset"), _context(tmp_path)).content["metrics"]
    assert (reply[C.MEMORY_ROUND], reply[C.MEMORY_DIGEST]) == (-1, -1)
    assert not (tmp_path / "run-7" / "partition-0.pt").exists()


def test_simulation_default_stays_context_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = make_client_app(_model, lambda pid: _data(pid))
    ctx = _context()  # simulation: node config has only partition-id and num-partitions
    app(_train_message(1), ctx)
    assert ContextMemory().written_in_round(ctx) == 1 and list(tmp_path.iterdir()) == []
    u1 = ContextMemory().load(ctx, CPU)
    reply = app(_train_message(2), ctx).content["metrics"]
    assert (reply[C.MEMORY_ROUND], reply[C.MEMORY_DIGEST]) == (1, params_digest(u1))


def test_an_injected_store_wins_over_node_config(tmp_path):
    app = make_client_app(_model, lambda pid: _data(pid), memory=ContextMemory())
    ctx = _context(tmp_path)
    app(_train_message(1), ctx)
    assert ContextMemory().written_in_round(ctx) == 1 and list(tmp_path.iterdir()) == []
