"""``ClientApp`` factory: thin Flower handlers around :class:`fedmeta.clients.client.MetaClient`.

Message contract (what a third-party client must honor is listed in the README):

* ``query`` -> reply ``MetricRecord({"partition-id": ...})`` so the strategy can sample by partition.
* ``train`` -> ``{"arrays": meta-model, "config": ConfigRecord}``; reply with the new local meta-model
  under ``"arrays"`` and a ``MetricRecord`` under ``"metrics"`` holding ``num-examples``,
  ``num-samples``, ``num-gradients``, ``num-hvps``, ``num-loss-evals``, ``train-loss``,
  ``partition-id``, ``memory-round`` and ``memory-digest``.
* ``evaluate`` -> personalized evaluation; reply ``MetricRecord`` under ``"metrics"``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from fedmeta import config as C
from fedmeta.clients.client import MetaClient, round_generator, select_device
from fedmeta.clients.memory import ContextMemory, DiskMemory, Memory, params_digest, partition_id
from fedmeta.config import EvalConfig
from fedmeta.data import ClientData, client_data

DataFn = Callable[[int], ClientData]
"""``data_fn(partition_id) -> ClientData``: one client's train/test data."""

DEVICE_NODE_CONFIG = "device"
"""Optional node-config key overriding the device (e.g. ``cpu`` or ``cuda:1``)."""


def node_memory(context: Context) -> Memory:
    """The node's default store of u: on disk under node-config ``memory-dir`` if set, else ``context.state``."""
    root = str(context.node_config.get(C.MEMORY_DIR, ""))
    return DiskMemory(Path(root)) if root else ContextMemory()


def make_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: DataFn,
    criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    *,
    device: str | None = None,
    memory: Memory | None = None,
) -> ClientApp:
    """Build the fedmeta ``ClientApp``.

    Parameters
    ----------
    model_fn
        Builds the model architecture (weights arrive from the server each round).
    data_fn
        ``partition_id -> ClientData``. Called once per message; cache inside it if loading is slow
        (the built-ins do).
    criterion
        Loss on a batch, ``criterion(outputs, targets)``.
    device
        Force a device; default: node-config ``device`` if set, else CUDA when available, else CPU.
    memory
        Store of the personalized model u. Default, chosen per message: :class:`DiskMemory` under the
        node-config directory ``memory-dir`` when the SuperNode sets one (u then survives a SuperNode
        restart; give an absolute path, a relative one resolves against the ClientApp process's working
        directory), else ``context.state`` (:class:`ContextMemory`, the simulation default).
    """
    app = ClientApp()

    def build(context: Context) -> tuple[MetaClient, int]:
        pid = partition_id(context)
        dev = select_device(device or str(context.node_config.get(DEVICE_NODE_CONFIG, "")) or None)
        return MetaClient(model_fn(), criterion, data_fn(pid), dev), pid

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({C.PARTITION_ID: partition_id(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        algorithm = cfg.get(C.ALGORITHM)
        if algorithm not in C.ALGORITHM_CONFIGS:
            raise ValueError(f"config {C.ALGORITHM!r} must be one of {sorted(C.ALGORITHM_CONFIGS)}, got {algorithm!r}")
        hp = C.ALGORITHM_CONFIGS[algorithm].from_wire(cfg)  # validates before any work
        server_round = int(cfg[C.SERVER_ROUND])
        client, pid = build(context)
        w = client.params_from(msg.content["arrays"].to_torch_state_dict())
        gen = round_generator(int(cfg.get(C.SEED, 0)), pid, server_round, 0)
        keep = getattr(hp, "memory_policy", None) == "keep"
        store = memory if memory is not None else node_memory(context)
        u = store.load(context, client.device, expected=client.param_spec) if keep else None
        memory_round = store.written_in_round(context) if u is not None else -1
        memory_digest = params_digest(u) if u is not None else -1  # before training can touch u
        if not keep:
            store.clear(context)
        result = client.train(w, hp, u, gen)
        if keep:
            store.save(context, result.personalized_model, server_round)
        s = result.stats
        metrics = MetricRecord(
            {
                C.NUM_EXAMPLES: client.data.num_train,
                C.NUM_SAMPLES: s.num_samples,
                C.NUM_GRADIENTS: s.num_gradients,
                C.NUM_HVPS: s.num_hvps,
                C.NUM_LOSS_EVALS: s.num_loss_evals,
                C.TRAIN_LOSS: s.last_loss,
                C.PARTITION_ID: pid,
                C.MEMORY_ROUND: memory_round,
                C.MEMORY_DIGEST: memory_digest,
            }
        )
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in result.meta_model.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        ev = EvalConfig.from_wire(cfg)
        client, pid = build(context)
        w = client.params_from(msg.content["arrays"].to_torch_state_dict())
        gen = round_generator(int(cfg.get(C.SEED, 0)), pid, int(cfg.get(C.SERVER_ROUND, 0)), 1)
        scores = client.evaluate(w, ev, gen)
        metrics = MetricRecord({C.NUM_EXAMPLES: int(client.data.y_test.shape[0]), C.PARTITION_ID: pid, **scores})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------
# Built-in tasks


def fashion_mnist_data(num_clients: int = 50, a_train: int = 68, a_test: int = 34, seed: int = 0) -> DataFn:
    """Fallah split of Fashion-MNIST (per-fedavg.txt Section 5); built once per process and cached."""
    return functools.partial(client_data, "fashion-mnist", num_clients=num_clients, seed=seed, a_train=a_train, a_test=a_test)


def sinewave_data(num_clients: int = 25, seed: int = 0) -> DataFn:
    """Sinewave regression tasks, one per client (localmoml Section 6.1)."""
    return functools.partial(client_data, "sinewave", num_clients=num_clients, seed=seed)
