"""Test doubles shared by the strategy tests (imported as ``from fakes import ...``)."""

from __future__ import annotations

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmeta import config as C


def set_task_identity() -> None:
    """Instruction messages need the process-global task identity outside a running app."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    """Duck-typed Grid: nodes with random-looking ids (``offset + step * partition``) that answer the partition query."""

    def __init__(self, num_nodes: int, offset: int = 7000, step: int = 13):
        self.node_to_pid = {offset + step * p: p for p in reversed(range(num_nodes))}
        self.pid_to_node = {p: n for n, p in self.node_to_pid.items()}
        self.sent: list[list[Message]] = []

    def get_node_ids(self):
        return set(self.node_to_pid)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            pid = self.node_to_pid[m.metadata.dst_node_id]
            out.append(Message(RecordDict({"metrics": MetricRecord({C.PARTITION_ID: pid})}), reply_to=m))
        return out
