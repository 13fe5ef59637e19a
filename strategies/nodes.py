"""Which node serves which client: partition-keyed node discovery (``query``), node replacement after a
SuperNode restart, and the messages to the nodes (one per node naming its clients on multi-client
nodes). :class:`PartitionNodes` is the collaborator a strategy holds as ``nodes``."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedmeta import config as C
from fedmeta.strategies.exchange import check_cancelled, exchange
from fedmeta.strategies.failures import parse_reason
from fedmeta.strategies.screening import reply_view

logger = logging.getLogger("fedmeta")


AUTO_NODES = -1
"""``num_nodes=-1``: the clients are shared among the federation's SuperNodes, as many as the first
node reports (its node config's ``num-partitions``: Flower's simulation sets it, and
``--node-config`` in a deployment); one node per client when it reports none or one per client."""

NO_QUERY_HANDLER = "No query function registered"
"""How Flower's ClientApp answers a message type it has no handler for (its error's text)."""


class _NoQueryHandlerRecords(logging.Filter):
    """Drops exactly the records of Flower's no-query-handler error: its message, a record carrying it, or a
    record logged while that error is being handled (the engine's generic "exception ... by RayBackend" line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        errors = (record.exc_info[1] if record.exc_info else None, sys.exc_info()[1])  # the logging thread's
        return NO_QUERY_HANDLER not in record.getMessage() and not any(e is not None and NO_QUERY_HANDLER in str(e) for e in errors)


@contextlib.contextmanager
def quiet_no_query_handler() -> Iterator[None]:
    """While fedmeta's partition query is out, Flower's logger (``flwr``) drops its records of the
    no-query-handler error: the simulation engine logs that error and its traceback once per node
    without a ``query`` handler, and :meth:`PartitionNodes.discover` says in one warning what it does
    instead. Every other record, Flower's other errors included, passes. (A deployed SuperNode logs
    in its own process: its console keeps its line.)"""
    flower, quiet = logging.getLogger("flwr"), _NoQueryHandlerRecords()
    flower.addFilter(quiet)
    try:
        yield
    finally:
        flower.removeFilter(quiet)


def federation_size(grid: Grid, node: int, num_clients: int, timeout: float) -> int | None:
    """How many SuperNodes share the clients, as ``node`` reports it in its ``query`` reply
    (``num-partitions``); 0 when its reply has none (a ClientApp without fedmeta's query handler),
    ``None`` when it did not reply within ``timeout`` s."""
    query = Message(RecordDict({"config": ConfigRecord({C.NUM_CLIENTS: num_clients})}), dst_node_id=node,
                    message_type=MessageType.QUERY)
    with quiet_no_query_handler():
        replies = exchange(grid, [query], timeout=timeout)
    if not replies or replies[0].has_error() and replies[0].error.code == ErrorCode.NODE_UNAVAILABLE:
        return None
    [reply] = replies
    if reply.has_error() or len(reply.content.metric_records) != 1:
        return 0
    return max(0, int(reply_view(reply.content).get(C.NUM_PARTITIONS, 0)))


def by_node(nodes: dict[int, int], clients: Iterable[int]) -> dict[int, tuple[int, ...]]:
    """``node id -> its clients among clients``, for the ``client id -> node id`` map ``nodes``."""
    out: dict[int, list[int]] = {}
    for c in clients:
        out.setdefault(nodes[c], []).append(c)
    return {node: tuple(ids) for node, ids in out.items()}


class PartitionNodes:
    """The ``client id -> node id`` map of ``num_clients`` clients on ``num_nodes`` nodes, and the messages
    to them. Interface: :meth:`discover` (the map, waiting for the nodes), :meth:`served` (a node's
    clients, for screening) and :meth:`messages` (a round's messages). Owns the node map and
    :attr:`by_order`; ``configrecord_key`` / ``arrayrecord_key`` name the records of its messages."""

    def __init__(self, *, num_clients: int, num_nodes: int, node_wait_timeout: float, configrecord_key: str = "config",
                 arrayrecord_key: str = "arrays", wait_log_every: float = 5.0) -> None:
        self.num_clients, self.num_nodes, self.node_wait_timeout = num_clients, num_nodes, node_wait_timeout
        self.auto = num_nodes == AUTO_NODES
        """Whether ``num_nodes`` was -1 (:data:`AUTO_NODES`; :meth:`discover` then sets ``num_nodes``)."""
        self.wait_log_every = wait_log_every
        """Seconds between the warnings :meth:`discover` logs while it waits for nodes."""
        self.configrecord_key, self.arrayrecord_key = configrecord_key, arrayrecord_key
        self.by_order = False
        """Whether the nodes have no ``query`` handler and client i is the i-th node by node id (see :meth:`discover`)."""
        self._node_to_partition: dict[int, int] = {}
        self._node_clients: dict[int, tuple[int, ...]] = {}

    @property
    def multi_client(self) -> bool:
        """Whether nodes host several clients (messages then carry ``client-ids``)."""
        return self.num_nodes < self.num_clients

    def served(self, node: int) -> tuple[int, ...]:
        """The clients ``node`` reported it serves (``()``: unknown)."""
        return self._node_clients.get(node, ())

    def discover(self, grid: Grid) -> dict[int, int]:
        """``client id -> node id`` for the connected nodes, asking new nodes with a ``query``.

        Flower's node ids are random per run, so the strategy samples clients and maps them to
        nodes. A node reports its ``partition-id`` and, when it hosts several clients, their
        ``client-ids`` (the query tells it ``num-clients``). Waits up to ``node_wait_timeout`` until
        every one of the n clients is served by a connected node.

        A SuperNode that restarts (deployment) registers under a new node id. Its partition then
        moves to the new node: a node that left ``grid.get_node_ids()`` is forgotten, and when a
        newly queried node reports a partition that an already known node serves, the newer node
        takes it over (the old one stops receiving messages; a warning is logged). Two *new* nodes
        reporting the same partition, or nodes reporting overlapping clients, are a
        misconfiguration and raise ``RuntimeError``, as does a ``query`` that the client answers
        with an error. A query that fails because the node disappeared (Flower's node-unavailable
        error) is retried on the next poll.

        Nodes without a ``query`` handler (an ordinary Flower ClientApp): when every node answers the
        query with Flower's no-handler error (or a reply without ``partition-id``) and each node serves
        one client (``num_nodes == num_clients``), client i is the i-th node in sorted node-id order,
        and one warning says that partition-keyed sampling is off (seeded sampling then picks nodes,
        not data partitions).

        ``num_nodes=-1``: the first connected node says how many SuperNodes share the clients
        (:func:`federation_size`); ``num_nodes`` is that many, or ``num_clients`` when it reports none
        or at least one per client. While it waits, a warning every ``wait_log_every`` s says how many
        nodes are connected and serve how many clients, what ``num_nodes`` asks for, and the fix.
        """
        started = time.monotonic()
        deadline, next_log = started + self.node_wait_timeout, started + self.wait_log_every
        while True:
            node_ids = set(grid.get_node_ids())
            if self.num_nodes == AUTO_NODES and node_ids:
                self._resolve_auto(grid, min(node_ids), max(1.0, deadline - time.monotonic()))
            for gone in set(self._node_to_partition) - node_ids:
                del self._node_to_partition[gone]
                self._node_clients.pop(gone, None)
            unknown = sorted(node_ids - set(self._node_to_partition))
            if unknown and len(node_ids) >= self.num_nodes:
                if not self.by_order:
                    self._query_partitions(grid, unknown, max(1.0, deadline - time.monotonic()))
                if self.by_order:  # the nodes have no query handler (this query or an earlier one said so)
                    self._order_nodes(sorted(node_ids)[: self.num_nodes])
            mapping = {c: node for node, ids in self._node_clients.items() if node in node_ids for c in ids}
            missing = sorted(set(range(self.num_clients)) - set(mapping))
            if not missing:
                return mapping
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"gave up waiting for nodes after node_wait_timeout={self.node_wait_timeout:g} s: "
                                   + self._waiting_for(len(node_ids), len(mapping), missing))
            if now >= next_log:
                logger.warning("waiting for nodes (%.0f s of node_wait_timeout=%g s): %s", now - started, self.node_wait_timeout,
                               self._waiting_for(len(node_ids), len(mapping), missing))
                next_log = now + self.wait_log_every
            check_cancelled()
            time.sleep(min(0.2, self.wait_log_every))

    def _waiting_for(self, connected: int, served: int, missing: list[int]) -> str:
        """What :meth:`discover` has, what it needs, which setting decides it, and the fix."""
        have = f"{connected} connected node{'s' * (connected != 1)} serve{'s' * (connected == 1)} {served} of num_clients={self.num_clients} clients"
        if self.num_nodes == AUTO_NODES:
            return f"{have}; num_nodes=-1 needs one node to report how many SuperNodes share the clients"
        if connected < self.num_nodes:
            why = " (None: one node per client)" if self.num_nodes == self.num_clients and not self.auto else ""
            return (f"{have}; num_nodes={self.num_nodes}{why} needs {self.num_nodes} nodes. Start "
                    f"{self.num_nodes - connected} more SuperNode{'s' * (self.num_nodes - connected != 1)}, or pass "
                    "num_nodes=-1 to the strategy to share the clients among the federation's SuperNodes (fedmeta's "
                    "ClientApp hosts several clients per node)")
        return (f"{have}; missing clients {missing[:20]}: check num-partitions on every node "
                f"(num_nodes={self.num_nodes}{' from num_nodes=-1' if self.auto else ''})")

    def _resolve_auto(self, grid: Grid, node: int, timeout: float) -> None:
        """``num_nodes`` for ``num_nodes=-1``: as many as ``node`` says share the clients (see :meth:`discover`);
        still -1 when it did not answer."""
        reported = federation_size(grid, node, self.num_clients, timeout)
        if reported is None:
            return
        self.num_nodes = reported if 0 < reported < self.num_clients else self.num_clients
        logger.info("num_nodes=-1: %d node%s for num_clients=%d (node %d reports %s)", self.num_nodes,
                    "s" * (self.num_nodes != 1), self.num_clients, node,
                    f"{C.NUM_PARTITIONS}={reported}" if reported else f"no {C.NUM_PARTITIONS}")

    def _order_nodes(self, nodes: list[int]) -> None:
        """Client i is ``nodes[i]`` (nodes without a ``query`` handler)."""
        self._node_to_partition = {node: i for i, node in enumerate(nodes)}
        self._node_clients = {node: (i,) for i, node in enumerate(nodes)}

    def _query_partitions(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        """Ask ``nodes`` for their ``partition-id`` (and clients); a reported partition moves to its newest node."""
        query = ConfigRecord({C.NUM_CLIENTS: self.num_clients})
        queries = [
            Message(RecordDict({self.configrecord_key: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        reported: dict[int, tuple[int, tuple[int, ...]]] = {}
        refused: dict[int, str] = {}
        with quiet_no_query_handler():
            replies = exchange(grid, queries, timeout=timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    # The node left between listing and query; the SuperLink answers for it.
                    logger.warning("a node left before reporting its %s; waiting for it to come back", C.PARTITION_ID)
                    continue
                if NO_QUERY_HANDLER not in (reply.error.reason or ""):
                    raise RuntimeError(f"node {node} did not report its {C.PARTITION_ID}: {reply.error.reason}")
                refused[node] = parse_reason(reply.error.reason)[0]
                continue
            rec = reply_view(reply.content) if len(reply.content.metric_records) == 1 else {}
            if C.PARTITION_ID not in rec:
                refused[node] = f"its query reply has no {C.PARTITION_ID}"
                continue
            pid = int(rec[C.PARTITION_ID])
            ids = tuple(int(i) for i in rec[C.CLIENT_IDS]) if C.CLIENT_IDS in rec else (pid,)
            if not 0 <= pid < self.num_nodes or pid in [p for p, _ in reported.values()]:
                raise RuntimeError(
                    f"node {node} reports {C.PARTITION_ID}={pid}: ids must be distinct in [0, {self.num_nodes - 1}] "
                    f"(num_nodes={self.num_nodes})"
                )
            if not ids or not all(0 <= c < self.num_clients for c in ids):
                raise RuntimeError(f"node {node} reports clients {list(ids)[:20]} outside [0, {self.num_clients - 1}]")
            reported[node] = (pid, ids)
        if refused:
            first = next(iter(refused.values()))
            by_order = not reported and not self._node_clients and self.num_nodes == self.num_clients
            if not by_order:
                raise RuntimeError(f"node {next(iter(refused))} did not report its {C.PARTITION_ID}: {first}")
            logger.warning("the nodes do not report a %s (%s): partition-keyed sampling is off; client i is the i-th "
                           "node in node-id order, so sampling picks nodes, not data partitions (a fedmeta ClientApp, or "
                           "a query handler replying {%r: ...}, turns it on)", C.PARTITION_ID, first, C.PARTITION_ID)
            self.by_order = True
            return
        for node, (pid, ids) in reported.items():
            for old in [n for n, p in self._node_to_partition.items() if p == pid]:
                logger.warning("node %d now serves %s=%d (was node %d: restarted or replaced)", node, C.PARTITION_ID, pid, old)
                del self._node_to_partition[old]
                self._node_clients.pop(old, None)
            overlap = {c for n, other in self._node_clients.items() for c in other} & set(ids)
            if overlap:
                raise RuntimeError(
                    f"node {node} ({C.PARTITION_ID}={pid}) reports clients {sorted(overlap)[:20]} that another node "
                    f"serves: check num-partitions on every node (num_nodes={self.num_nodes})"
                )
            self._node_to_partition[node] = pid
            self._node_clients[node] = ids

    def messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: dict[int, int], clients: list[int], message_type: str,
                 weighting: str) -> tuple[list[Message], dict[int, tuple[int, ...]]]:
        """The messages that run ``clients`` (``nodes``: :meth:`discover`'s map) and ``node id -> its clients``.
        One message per client on single-client nodes; on multi-client nodes one per node, naming its
        clients under ``client-ids`` (with ``num-clients`` and the server's ``weighting``)."""
        sent = by_node(nodes, clients)
        if not self.multi_client:
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            return [Message(content=record, message_type=message_type, dst_node_id=nodes[c]) for c in clients], sent
        messages = []
        for node, ids in sent.items():
            cfg = ConfigRecord({**dict(config), C.CLIENT_IDS: list(ids), C.NUM_CLIENTS: self.num_clients, C.WEIGHTING: weighting})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=record, message_type=message_type, dst_node_id=node))
        return messages, sent
