"""``ClientApp`` factory: thin Flower handlers around :class:`fedmeta.clients.client.MetaClient`.

Message contract (what a third-party client must honor is listed in docs/flower.md, "The message contract"):

* ``query`` -> reply ``MetricRecord({"partition-id": ...})`` so the strategy can sample by partition.
* ``train`` -> ``{"arrays": meta-model, "config": ConfigRecord}`` (settings: the message's, else the run
  config's, :func:`fedmeta.clients.records.resolve_train`); reply with the new local meta-model under
  ``"arrays"``, a ``MetricRecord`` under ``"metrics"`` holding ``num-examples``, ``num-samples``,
  ``num-gradients``, ``num-hvps``, ``num-loss-evals``, ``train-loss`` (quantities: any strategy may
  average them) and a ``ConfigRecord`` under ``"client-info"`` holding ``partition-id``,
  ``memory-round`` and ``memory-digest`` (identifiers: never averaged).
* ``evaluate`` -> personalized evaluation; reply ``MetricRecord`` under ``"metrics"`` (``num-examples``
  and the scores) and the ``"client-info"`` ``ConfigRecord`` (``partition-id``).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
import torch
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from torch import Tensor, nn

from fedmeta import algorithms
from fedmeta import config as C
from fedmeta.batched import DEFAULT_CHUNK_SIZE, weighted_mean
from fedmeta.clients.client import ClientGroup, MetaClient, hosted_clients, round_generator, select_device
from fedmeta.clients.records import resolve_evaluate, resolve_train
from fedmeta.clients.memory import ContextMemory, DiskMemory, Memory, experiment_key, partition_id
from fedmeta.memory_bank import MemoryBank, bank_path
from fedmeta.stored_params import params_digest
from fedmeta.config import EvalConfig
from fedmeta.data import ClientData, client_data
from fedmeta.flwr_partitions import flwr_datasets_data  # noqa: F401  (re-exported: a built-in task like the two below)

logger = logging.getLogger("fedmeta")

DataFn = Callable[[int], ClientData]
"""``data_fn(partition_id) -> ClientData``: one client's train/test data."""

DEVICE_NODE_CONFIG = "device"
MEMORY_DIR_ENV = "FEDMETA_MEMORY_DIR"
"""Environment variable: where multi-client nodes keep their memory banks when no ``memory-dir`` is set."""
"""Optional node-config key overriding the device (e.g. ``cpu`` or ``cuda:1``)."""


def _message_config(msg: Message) -> ConfigRecord:
    """The message's one ConfigRecord (Flower's strategies send it under ``config``; a DP wrapper
    adds its keys to it), or an empty one."""
    records = msg.content.config_records
    if "config" in records:
        return records["config"]
    return next(iter(records.values())) if len(records) == 1 else ConfigRecord()


def _message_arrays(msg: Message) -> ArrayRecord:
    """The message's model: its ArrayRecord under ``arrays`` (Flower's default key), else its only one."""
    records = msg.content.array_records
    if "arrays" in records or len(records) != 1:
        return records["arrays"]
    return next(iter(records.values()))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def timed(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """``handler`` whose reply also carries its wall time (``client-timing`` ConfigRecord, ``handler-seconds``),
    which the strategy records for the run's time split (clients' math versus the framework's per-round cost)."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        reply = handler(msg, context)
        if not reply.has_error():
            reply.content[C.CLIENT_TIMING] = ConfigRecord({C.HANDLER_SECONDS: time.perf_counter() - started})
        return reply

    return run


def node_memory(context: Context, memory_dir: str | None = None) -> Memory:
    """The node's default store of u: on disk under node-config ``memory-dir`` if set (each save
    flushed to disk), else under ``memory_dir`` (saves left to the page cache), else ``context.state``."""
    root = str(context.node_config.get(C.MEMORY_DIR, ""))
    if root:
        return DiskMemory(Path(root))
    return DiskMemory(Path(memory_dir), sync=False) if memory_dir else ContextMemory()


def timeline(cfg, server_round: int) -> tuple[dict, dict]:
    """Keyword arguments for a store's load / save when the server checkpoints (the message carries
    ``memory-key``): key the memory by that name and load the newest version written before this
    round, so that a round re-run after a resume starts from the memory it started from the first
    time. Empty otherwise (custom stores need not know the keywords)."""
    key = str(cfg.get(C.MEMORY_KEY, "") or "")
    if not key:
        return {}, {}
    return {"before_round": server_round, "memory_key": key}, {"memory_key": key}


def node_clients(context: Context, num_clients: int) -> list[int]:
    """The clients this node hosts: block ``partition-id`` of ``num-partitions`` (:func:`hosted_clients`);
    a node without ``num-partitions`` in its node config hosts the one client ``partition-id``."""
    pid = partition_id(context)
    if C.NUM_PARTITIONS not in context.node_config:
        return [pid]
    return hosted_clients(pid, int(context.node_config[C.NUM_PARTITIONS]), num_clients)


def default_memory_root() -> Path:
    """``$FEDMETA_MEMORY_DIR``, else ``<tmp>/fedmeta-memory-<uid>`` (simulations set a temporary one)."""
    env = os.environ.get(MEMORY_DIR_ENV, "")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"fedmeta-memory-{os.getuid()}"


def ray_cluster_size() -> int:
    """Alive nodes of the Ray cluster this process runs in (a Ray actor of a simulation), 0 outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return 0
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def host_local_refusal(cluster_nodes: int, root: Path) -> str | None:
    """Why a multi-client node must not keep its memories under the host-local default ``root`` on a Ray
    cluster of ``cluster_nodes`` nodes (Flower serves a node from actors on any host), or None."""
    if cluster_nodes > 1:
        return (f"memory-dir is not set and this {cluster_nodes}-node Ray cluster would keep client memories in {root}, a "
                f"directory of each host: set run-config memory-dir (or {MEMORY_DIR_ENV}) to a directory every host mounts "
                "(docs/cluster.md)")
    return None


def _requested_clients(cfg, context: Context) -> tuple[list[int], list[int]]:
    """The clients a multi-client message asks for, checked against those the node hosts."""
    num_clients = int(cfg[C.NUM_CLIENTS])
    hosted = node_clients(context, num_clients)
    ids = [int(i) for i in cfg[C.CLIENT_IDS]]
    foreign = sorted(set(ids) - set(hosted))
    if foreign or len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"{C.CLIENT_IDS} must be distinct clients of this node ({hosted[0]}..{hosted[-1]}), got {ids}")
    return ids, hosted


def make_client_app(
    model_fn: Callable[[], nn.Module],
    data_fn: DataFn,
    criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    *,
    device: str | None = None,
    memory: Memory | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vectorize: str = "auto",
    memory_dir: str | None = None,
    register: Sequence[algorithms.Algorithm] = (),
    mods: Sequence[Mod] = (),
    train_mods: Sequence[Mod] = (),
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
        directory), else under ``memory_dir`` if given, else ``context.state`` (:class:`ContextMemory`).
        For nodes hosting one client.
    chunk_size, vectorize
        Multi-client nodes: clients per vectorized call and ``auto`` / ``vmap`` / ``compile`` / ``loop``
        (:mod:`fedmeta.batched`).
    memory_dir
        Where memories go when the node config sets no ``memory-dir``: one :class:`DiskMemory` file per
        client for single-client nodes, a :class:`MemoryBank` for multi-client nodes (saves left to the
        page cache: they survive a killed process, not a power cut). Multi-client nodes without either
        use :func:`default_memory_root`. Simulations that checkpoint set it, so that a resumed run
        finds its clients' memories (``context.state`` dies with the simulation process).

    register
        Algorithm units (:class:`fedmeta.algorithms.Algorithm`) to register in every process that runs
        this app, before a train message is handled: a user's own algorithm reaches Ray workers (which
        receive the app pickled, without running the module that defines the algorithm) and ClientApp
        processes this way.
    mods, train_mods
        Flower client mods (``flwr.clientapp.mod``) around every handler (``ClientApp(mods=...)``) and
        around the train handler only (``@app.train(mods=...)``). Mods that act on train messages, such
        as ``fixedclipping_mod`` for ``DifferentialPrivacyClientSideFixedClipping``, go in
        ``train_mods``: they refuse the query and evaluate messages, which carry no model update.

    Notes
    -----
    When the train config carries ``memory-key`` (the server checkpoints), memories are keyed by it
    and a client loads the newest version of its u written before the current round: a round
    re-run after a resume starts from the same u as the first time (:mod:`fedmeta.clients.memory`).

    A node hosts several clients when its node config's ``num-partitions`` is smaller than the
    number of clients the strategy announces (``num_nodes`` of the strategy): messages then carry
    ``client-ids``, the node trains them together and replies with their average (see the message
    contract in docs/flower.md).
    """
    app = ClientApp(mods=list(mods))

    def build(context: Context) -> tuple[MetaClient, int]:
        pid = partition_id(context)
        dev = select_device(device or str(context.node_config.get(DEVICE_NODE_CONFIG, "")) or None)
        return MetaClient(model_fn(), criterion, data_fn(pid), dev), pid

    def build_group(context: Context) -> ClientGroup:
        dev = select_device(device or str(context.node_config.get(DEVICE_NODE_CONFIG, "")) or None)
        return ClientGroup(model_fn(), criterion, data_fn, dev, chunk_size=chunk_size, vectorize=vectorize)

    def bank_for(context: Context, group: ClientGroup, hosted: list[int], memory_key: str | None) -> MemoryBank:
        node_dir = str(context.node_config.get(C.MEMORY_DIR, ""))
        if not (node_dir or memory_dir or os.environ.get(MEMORY_DIR_ENV)):  # never a host-local default on a multi-host cluster
            refusal = host_local_refusal(ray_cluster_size(), default_memory_root())
            if refusal:
                raise RuntimeError(refusal)
        root = node_dir or memory_dir or str(default_memory_root())
        nodes = int(context.node_config.get(C.NUM_PARTITIONS, 1))
        path = bank_path(Path(root), experiment_key(context, memory_key), partition_id(context), nodes)
        # A SuperNode's memory-dir is meant to survive power loss: flush each save to disk. A
        # simulation's bank only has to survive its processes (the page cache does that).
        return MemoryBank(path, hosted, group.param_spec, sync=bool(node_dir))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        metrics: dict = {C.PARTITION_ID: partition_id(context)}
        if C.NUM_PARTITIONS in context.node_config:  # how many SuperNodes share the clients (num-nodes = -1 under flwr run)
            metrics[C.NUM_PARTITIONS] = int(context.node_config[C.NUM_PARTITIONS])
        cfg = msg.content.config_records.get("config")
        if cfg is not None and C.NUM_CLIENTS in cfg:
            metrics[C.CLIENT_IDS] = node_clients(context, int(cfg[C.NUM_CLIENTS]))
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def train_group(msg: Message, context: Context, cfg, hp) -> Message:
        ids, hosted = _requested_clients(cfg, context)
        group = build_group(context)
        w = group.params_from(_message_arrays(msg).to_torch_state_dict())
        keep = algorithms.for_config(hp).keeps_state(hp)
        u, rounds = None, [-1] * len(ids)
        server_round = int(cfg[C.SERVER_ROUND])
        load_kw, _ = timeline(cfg, server_round)
        if keep:
            bank = bank_for(context, group, hosted, load_kw.get("memory_key"))
            u, rounds = bank.load(ids, group.device, before_round=load_kw.get("before_round"))
        result = group.train(w, hp, ids, int(cfg.get(C.SEED, 0)), server_round, u, [r >= 0 for r in rounds])
        # Diverged clients are left out: no poisoned model in the average, their memory stays at
        # its last finite value (divergence guard); the server sees them in num-diverged.
        ok = [i for i in range(len(ids)) if i not in set(result.diverged)]
        if result.diverged:
            logger.warning("clients %s diverged (non-finite values) and are left out of the reply", [ids[i] for i in result.diverged])
        rows = torch.tensor(ok, dtype=torch.long)
        if keep:
            kept = {k: v.index_select(0, rows.to(v.device)) for k, v in result.personalized_models.items()}
            bank.save([ids[i] for i in ok], kept, server_round)
            bank.close()
        examples = [result.num_examples[i] for i in ok]
        weights = examples if str(cfg.get(C.WEIGHTING, "uniform")) == "examples" else [1.0] * len(ok)
        stats = [result.stats[i] for i in ok]
        per_client = {
            C.NUM_EXAMPLES: examples,
            C.NUM_SAMPLES: [s.num_samples for s in stats],
            C.NUM_GRADIENTS: [s.num_gradients for s in stats],
            C.NUM_HVPS: [s.num_hvps for s in stats],
            C.NUM_LOSS_EVALS: [s.num_loss_evals for s in stats],
            C.TRAIN_LOSS: [float(s.last_loss) for s in stats],
            C.MEMORY_ROUND: [int(rounds[i]) for i in ok],
        }
        # Quantities (the node's total examples, its clients' mean costs and loss) in the MetricRecord,
        # which any strategy may average; identifiers and per-client lists in client-info, which none does.
        metrics = MetricRecord({
            C.NUM_EXAMPLES: sum(examples),
            C.NUM_DIVERGED: len(result.diverged),
            **{k: _mean(per_client[k]) for k in (C.NUM_SAMPLES, C.NUM_GRADIENTS, C.NUM_HVPS, C.NUM_LOSS_EVALS, C.TRAIN_LOSS)},
        })
        info = ConfigRecord({
            C.PARTITION_ID: partition_id(context),
            C.CLIENT_IDS: [ids[i] for i in ok],
            **{C.PER_CLIENT + k: v for k, v in per_client.items()},
        })
        meta_models = {k: v.index_select(0, rows.to(v.device)) for k, v in result.meta_models.items()}
        mean = weighted_mean(meta_models, weights)
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in mean.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, C.CLIENT_INFO: info}), reply_to=msg)

    @app.train(mods=list(train_mods))
    @timed
    def train(msg: Message, context: Context) -> Message:
        for unit in register:  # idempotent; the units travel with the app (see `register`)
            algorithms.register(unit, replace=True)
        # The message's settings, else the run config's; neither: one line saying what to send.
        algo, cfg = resolve_train(_message_config(msg), context.run_config)
        if C.SERVER_ROUND not in cfg:
            raise ValueError(f"the train config has no {C.SERVER_ROUND!r} (Flower's strategies send it; a custom one must too)")
        hp = algo.config.from_wire(cfg)  # validates before any work
        if C.CLIENT_IDS in cfg:
            return train_group(msg, context, cfg, hp)
        server_round = int(cfg[C.SERVER_ROUND])
        client, pid = build(context)
        w = client.params_from(_message_arrays(msg).to_torch_state_dict())
        gen = round_generator(int(cfg.get(C.SEED, 0)), pid, server_round, 0)
        keep = algo.keeps_state(hp)
        store = memory if memory is not None else node_memory(context, memory_dir)
        load_kw, save_kw = timeline(cfg, server_round)
        u = store.load(context, client.device, expected=client.param_spec, **load_kw) if keep else None
        memory_round = store.written_in_round(context, **load_kw) if u is not None else -1
        memory_digest = params_digest(u) if u is not None else -1  # before training can touch u
        if not keep:
            store.clear(context, **save_kw)
        result = client.train(w, hp, u, gen)
        if keep:
            store.save(context, result.personalized_model, server_round, **save_kw)
        s = result.stats
        metrics = MetricRecord(
            {
                C.NUM_EXAMPLES: client.data.num_train,
                C.NUM_SAMPLES: s.num_samples,
                C.NUM_GRADIENTS: s.num_gradients,
                C.NUM_HVPS: s.num_hvps,
                C.NUM_LOSS_EVALS: s.num_loss_evals,
                C.TRAIN_LOSS: s.last_loss,
            }
        )
        info = ConfigRecord({C.PARTITION_ID: pid, C.MEMORY_ROUND: memory_round, C.MEMORY_DIGEST: memory_digest})
        arrays = ArrayRecord({k: v.detach().cpu() for k, v in result.meta_model.items()})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, C.CLIENT_INFO: info}), reply_to=msg)

    @app.evaluate()
    @timed
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = resolve_evaluate(_message_config(msg), context.run_config)
        ev = EvalConfig.from_wire(cfg)
        if C.CLIENT_IDS in cfg:
            return evaluate_group(msg, context, cfg, ev)
        client, pid = build(context)
        w = client.params_from(_message_arrays(msg).to_torch_state_dict())
        gen = round_generator(int(cfg.get(C.SEED, 0)), pid, int(cfg.get(C.SERVER_ROUND, 0)), 1)
        scores = client.evaluate(w, ev, gen)
        metrics = MetricRecord({C.NUM_EXAMPLES: int(client.data.y_test.shape[0]), **scores})
        info = ConfigRecord({C.PARTITION_ID: pid})
        return Message(RecordDict({"metrics": metrics, C.CLIENT_INFO: info}), reply_to=msg)

    def evaluate_group(msg: Message, context: Context, cfg, ev: EvalConfig) -> Message:
        ids, _ = _requested_clients(cfg, context)
        group = build_group(context)
        w = group.params_from(_message_arrays(msg).to_torch_state_dict())
        # Every client fine-tuned and scored as on its own node, vmapped over clients (ClientGroup.evaluate).
        rows = group.evaluate(w, ev, ids, int(cfg.get(C.SEED, 0)), int(cfg.get(C.SERVER_ROUND, 0)))
        sizes = [int(group.data_fn(c).y_test.shape[0]) for c in ids]
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        total = sum(sizes)
        # The node's scores averaged over its test examples, so that a strategy weighting the
        # nodes by num-examples gets the average over all clients' test examples.
        metrics = MetricRecord({
            C.NUM_EXAMPLES: total,
            **{k: sum(float(r[k]) * n for r, n in zip(rows, sizes)) / max(total, 1) for k in keys},
        })
        info = ConfigRecord({
            C.PARTITION_ID: partition_id(context),
            C.CLIENT_IDS: ids,
            C.PER_CLIENT + C.NUM_EXAMPLES: sizes,
            **{C.PER_CLIENT + k: [float(r[k]) for r in rows] for k in keys},
        })
        return Message(RecordDict({"metrics": metrics, C.CLIENT_INFO: info}), reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------
# Built-in tasks


def fashion_mnist_data(num_clients: int = 50, a_train: int = 68, a_test: int = 34, seed: int = 0) -> DataFn:
    """Fallah split of Fashion-MNIST (per-fedavg.txt Section 5); built once per process and cached."""
    return functools.partial(client_data, "fashion-mnist", num_clients=num_clients, seed=seed, a_train=a_train, a_test=a_test)


def sinewave_data(num_clients: int = 25, seed: int = 0) -> DataFn:
    """Sinewave regression tasks, one per client (localmoml Section 6.1)."""
    return functools.partial(client_data, "sinewave", num_clients=num_clients, seed=seed)
