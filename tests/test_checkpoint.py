"""Server checkpoints and resume, in one process: the real strategies and the real ClientApp behind
a loopback grid, a run killed in the middle of a round (after its clients saved their memories) and
resumed by a new strategy and new nodes (fresh ``context.state``, as after a process kill) ends with
the uninterrupted run's model, bit for bit. The kill-and-resume of a real simulation process is in
tests/test_robustness.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import config as C
from fedmeta.clients import make_client_app
from fedmeta.data import ClientData
from fedmeta.models import mlp
from fedmeta.strategies import LocalMOML, PerFedAvg
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError, check_can_start

N_CLIENTS = 6


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Killed(Exception):
    """The server process dying at a chosen point (the in-process stand-in for SIGKILL)."""


def _data(pid: int) -> ClientData:
    g = torch.Generator().manual_seed(500 + pid)
    return ClientData(torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g),
                      torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))


def _model():
    return mlp((4, 8, 3), torch.nn.Tanh)


def _initial() -> ArrayRecord:
    torch.manual_seed(11)
    return ArrayRecord(_model().state_dict())


class LoopbackGrid:
    """Duck-typed Grid that runs the real ClientApp in this process, one Context per node. A new grid
    is a restarted federation: every node's ``context.state`` starts empty.

    ``kill=(round, stage)`` raises :class:`Killed` once the nodes have answered the ``stage``
    (``"train"`` / ``"evaluate"``) messages of that round, i.e. after they saved their memories and
    before the server aggregates. ``drop`` names client ids whose node never replies (a timeout)."""

    def __init__(self, app, num_nodes: int, run_id: int, kill: tuple[int, str] | None = None, drop: tuple[int, ...] = ()):
        self.app, self.kill, self.drop = app, kill, set(drop)
        self.contexts = {
            9001 + 17 * i: Context(run_id=run_id, node_id=9001 + 17 * i, state=RecordDict(), run_config={},
                                   node_config={C.PARTITION_ID: i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }

    def get_node_ids(self):
        return set(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            pid = self.contexts[m.metadata.dst_node_id].node_config[C.PARTITION_ID]
            if m.metadata.message_type != MessageType.QUERY and pid in self.drop:
                continue
            replies.append(reply)
        stage = {MessageType.TRAIN: "train", MessageType.EVALUATE: "evaluate"}.get(messages[0].metadata.message_type) if messages else None
        if stage and self.kill and (int(messages[0].content["config"][C.SERVER_ROUND]), stage) == self.kill:
            raise Killed(f"killed in round {self.kill[0]} after the {stage} replies")
        return replies


def _strategy(cls=LocalMOML, num_nodes=None, **overrides):
    kwargs = dict(num_clients=N_CLIENTS, num_nodes=num_nodes, clients_per_round=3, seed=7, evaluate_every=2, inner_lr=0.05,
                  local_steps=2, batch_size=5, meta_gradient="exact")
    if cls is LocalMOML:
        kwargs.update(lr=0.1, momentum=0.5, init_batch_size=4, memory_policy="keep")
    else:
        kwargs.update(meta_lr=0.1)
    kwargs.update(overrides)
    return cls(**kwargs)


def _run(strategy, grid, num_rounds, **kwargs):
    return strategy.start(grid, _initial(), num_rounds=num_rounds, train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}), **kwargs)


def _arrays(result) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in result.arrays.items()}


def _assert_same_run(a, sa, b, sb):
    """Same final model bit for bit, same per-client train and evaluation records (memory rounds and
    digests included) and the same aggregated metrics, round by round."""
    for k, v in _arrays(a).items():
        np.testing.assert_array_equal(_arrays(b)[k], v, err_msg=k)
    assert sb.client_train == sa.client_train
    assert sb.client_eval == sa.client_eval
    assert {r: dict(m) for r, m in b.train_metrics_clientapp.items()} == {r: dict(m) for r, m in a.train_metrics_clientapp.items()}
    assert {r: dict(m) for r, m in b.evaluate_metrics_clientapp.items()} == {r: dict(m) for r, m in a.evaluate_metrics_clientapp.items()}


@pytest.mark.parametrize("num_nodes", [None, 2], ids=["one-client-per-node", "multi-client-nodes"])
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_model(tmp_path, num_nodes, stage):
    nodes = num_nodes or N_CLIENTS
    # Uninterrupted, without checkpoints: memories in context.state (single-client) or a bank.
    ref_app = make_client_app(_model, _data, memory_dir=str(tmp_path / "ref-memory"))
    ref_strategy = _strategy(num_nodes=num_nodes)
    ref = _run(ref_strategy, LoopbackGrid(make_client_app(_model, _data) if num_nodes is None else ref_app, nodes, run_id=1), 5)

    memory = str(tmp_path / "memory")
    app = make_client_app(_model, _data, memory_dir=memory)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _run(_strategy(num_nodes=num_nodes), LoopbackGrid(app, nodes, run_id=2, kill=(4, stage)), 5, checkpoint_dir=ckpt)
    assert CheckpointDir(ckpt).load().round == 3
    # The killed round's clients saved memories for round 4: the resumed round 4 must not start from them.
    resumed_strategy = _strategy(num_nodes=num_nodes)
    resumed = _run(resumed_strategy, LoopbackGrid(make_client_app(_model, _data, memory_dir=memory), nodes, run_id=3), 5,
                   checkpoint_dir=ckpt, resume=True)
    assert resumed_strategy.resumed_from == 3
    _assert_same_run(ref, ref_strategy, resumed, resumed_strategy)
    assert any(m[C.MEMORY_ROUND] >= 1 for m in resumed_strategy.client_train[4].values())  # memories were in play
    state = CheckpointDir(ckpt).load()
    assert state.round == 5 and state.finished
    for k, v in _arrays(ref).items():
        np.testing.assert_array_equal(state.arrays[k].numpy(), v)


def test_resume_can_extend_the_number_of_rounds(tmp_path):
    memory = str(tmp_path / "memory")
    ref = _run(_strategy(PerFedAvg), LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=1), 5)
    _run(_strategy(PerFedAvg), LoopbackGrid(make_client_app(_model, _data, memory_dir=memory), N_CLIENTS, run_id=2), 3,
         checkpoint_dir=tmp_path / "ckpt")
    resumed = _run(_strategy(PerFedAvg), LoopbackGrid(make_client_app(_model, _data, memory_dir=memory), N_CLIENTS, run_id=3), 5,
                   checkpoint_dir=tmp_path / "ckpt", resume=True)
    for k, v in _arrays(ref).items():
        np.testing.assert_array_equal(_arrays(resumed)[k], v)
    assert sorted(resumed.train_metrics_clientapp) == [1, 2, 3, 4, 5]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    grid = LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=1, kill=(2, "train"))
    with pytest.raises(Killed):
        _run(_strategy(), grid, 4, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 7, now 8"):
        _run(_strategy(seed=8), LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=2), 4, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"hparams"):
        _run(_strategy(lr=0.2), LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=2), 4, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match=r"run: checkpoint \(unset\), now \{'dataset': 'x'\}"):
        _run(_strategy(), LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=2), 4, checkpoint_dir=tmp_path, resume=True,
             run_info={"dataset": "x"})


def test_a_fresh_run_refuses_an_unfinished_checkpoint_and_replaces_a_finished_one(tmp_path):
    app = make_client_app(_model, _data)
    with pytest.raises(Killed):
        _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=1, kill=(2, "train")), 3, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"unfinished run \(round 1 of 3\): resume it"):
        _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=2), 3, checkpoint_dir=tmp_path)
    _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=3), 3, checkpoint_dir=tmp_path, resume=True)
    first_key = CheckpointDir(tmp_path).load().memory_key
    _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=4), 2, checkpoint_dir=tmp_path)  # finished: replaced
    state = CheckpointDir(tmp_path).load()
    assert (state.round, state.num_rounds) == (2, 2) and state.memory_key != first_key
    with pytest.raises(CheckpointError, match="nothing to resume"):
        check_can_start(tmp_path / "absent", resume=True)
    with pytest.raises(ValueError, match="resume must be False without a checkpoint_dir"):
        _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=5), 2, resume=True)


def test_num_rounds_below_the_checkpoint_is_refused(tmp_path):
    app = make_client_app(_model, _data)
    _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=1), 3, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"num_rounds must be >= the checkpoint's completed rounds \(3\)"):
        _run(_strategy(PerFedAvg), LoopbackGrid(app, N_CLIENTS, run_id=2), 2, checkpoint_dir=tmp_path, resume=True)


def test_train_messages_carry_the_memory_key_only_when_checkpointing(tmp_path):
    sent = []

    class Recording(LoopbackGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            sent.extend(m for m in messages if m.metadata.message_type == MessageType.TRAIN)
            return super().send_and_receive(messages, timeout)

    _run(_strategy(PerFedAvg), Recording(make_client_app(_model, _data), N_CLIENTS, run_id=1), 1)
    assert sent and all(C.MEMORY_KEY not in m.content["config"] for m in sent)
    sent.clear()
    _run(_strategy(PerFedAvg), Recording(make_client_app(_model, _data), N_CLIENTS, run_id=1), 2, checkpoint_dir=tmp_path)
    keys = {m.content["config"][C.MEMORY_KEY] for m in sent}
    assert keys == {CheckpointDir(tmp_path).load().memory_key} and next(iter(keys)).startswith("resume-")


def test_a_node_that_does_not_reply_before_the_timeout_is_counted_as_missing():
    strategy = _strategy(PerFedAvg, clients_per_round=None)
    result = _run(strategy, LoopbackGrid(make_client_app(_model, _data), N_CLIENTS, run_id=1, drop=(2,)), 2)
    train = result.train_metrics_clientapp[1]
    assert (train["num-missing"], train["num-clients"], train["num-failures"]) == (1, 5, 0)
    assert result.evaluate_metrics_clientapp[2]["num-missing"] == 1


# --- the checkpoint files --------------------------------------------------------------------------


def _arrays_of(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((3,), value), "b": torch.tensor([value, -value], dtype=torch.float64)})


def _written(tmp_path, rounds: int) -> CheckpointDir:
    ckpt = CheckpointDir(tmp_path)
    ckpt.begin(_arrays_of(0.0), num_rounds=5, memory_key="resume-abc", fingerprint={"seed": 1, "groups": (1, 2)})
    for r in range(1, rounds + 1):
        ckpt.commit(r, _arrays_of(r + 0.1), {"train": {"loss": r / 3, "n": r, "nan": float("nan")}, "client_train": {3: {"x": r}}})
    return ckpt


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = _written(tmp_path, 3).load()
    assert (state.round, state.num_rounds, state.memory_key, state.finished) == (3, 5, "resume-abc", False)
    assert state.fingerprint == {"seed": 1, "groups": [1, 2]}
    assert torch.equal(torch.from_numpy(state.arrays["w"].numpy()), torch.full((3,), 3.1))
    assert state.arrays["b"].numpy().dtype == np.float64
    assert [e["round"] for e in state.history] == [1, 2, 3]
    assert state.history[2]["train"]["loss"] == 1.0 and state.history[1]["train"]["loss"] == 2 / 3
    assert isinstance(state.history[2]["train"]["n"], int) and np.isnan(state.history[0]["train"]["nan"])


def test_history_lines_past_the_model_and_a_torn_last_line_are_ignored(tmp_path):
    ckpt = _written(tmp_path, 2)
    with ckpt.history_file.open("a") as fh:  # killed after writing round 3's line, before its model
        fh.write(json.dumps({"round": 3, "train": {}}) + "\n" + '{"round": 4, "tra')
    state = ckpt.load()
    assert state.round == 2 and [e["round"] for e in state.history] == [1, 2]


def test_a_corrupt_checkpoint_is_refused_with_its_path(tmp_path):
    ckpt = _written(tmp_path, 2)
    lines = ckpt.history_file.read_text().splitlines()
    ckpt.history_file.write_text(lines[0][:-3] + "\n" + lines[1] + "\n")
    with pytest.raises(CheckpointError, match=r"rounds.jsonl: line 1 is not JSON"):
        ckpt.load()
    ckpt.history_file.write_text(lines[1] + "\n")
    with pytest.raises(CheckpointError, match=r"holds rounds \[2\], expected 1..2"):
        ckpt.load()
    ckpt.model_file.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: not readable"):
        ckpt.load()
    torch.save({"format": "something else"}, ckpt.model_file)
    with pytest.raises(CheckpointError, match="not a fedmeta server checkpoint"):
        ckpt.load()


def test_a_kill_while_writing_the_model_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = _written(tmp_path, 2)

    def dies(*args, **kwargs):
        raise Killed("killed inside torch.save")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(Killed):
        ckpt.commit(3, _arrays_of(9.0), {})
    monkeypatch.undo()
    state = ckpt.load()
    assert state.round == 2 and torch.equal(torch.from_numpy(state.arrays["w"].numpy()), torch.full((3,), 2.1))
    assert not list(tmp_path.glob(".checkpoint.pt.*"))  # the temporary file is removed


# --- the command line --------------------------------------------------------------------------------


def test_cli_resume_needs_a_checkpoint_and_a_fresh_run_refuses_an_unfinished_one(tmp_path, capsys):
    from fedmeta.simulations import run as sim_run
    from fedmeta.simulations.config import ExperimentConfig

    args = ["--algorithms", C.PER_FEDAVG, "--dataset", "sinewave", "--num-clients", "4", "--clients-per-round", "2",
            "--results-dir", str(tmp_path)]
    assert sim_run._parser().parse_args(["--resume"]).resume == "true"  # a bare --resume means true
    assert sim_run.main([*args, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    cfg = ExperimentConfig.from_mapping({"algorithm": C.PER_FEDAVG, "dataset": "sinewave", "num-clients": 4, "clients-per-round": 2,
                                         "results-dir": str(tmp_path)})
    assert cfg.checkpoint_path == tmp_path / "checkpoints" / f"{C.PER_FEDAVG}-sinewave-n4-seed0"
    ckpt = CheckpointDir(cfg.checkpoint_path)
    ckpt.begin(_initial(), num_rounds=5, memory_key="resume-x", fingerprint={})  # a run killed in round 1
    assert sim_run.main(args) == 2
    assert "holds an unfinished run (round 0 of 5): resume it (--resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="resume must be false when checkpoint is false"):
        ExperimentConfig(checkpoint=False, resume=True)
    assert ExperimentConfig(checkpoint=False).checkpoint_path is None
    # what a resumed run must share: not where files go, nor the number of rounds
    assert cfg.fingerprint() == cfg.replace(num_rounds=9, results_dir="x", round_timeout=5.0, resume=True).fingerprint()
    assert cfg.fingerprint() != cfg.replace(local_steps=7).fingerprint()
