"""Sending a round's messages and collecting the replies, with a short poll.

Flower's ``Grid.send_and_receive`` pulls the replies, and between pulls its deployment grid
(``flwr/superlink/grid/http_grid.py``) sleeps 3 s: a deployed round that takes 1 s of client work
ends 3 s after it started at best, and up to 3 s after its last reply. :func:`exchange` does the same
with the public ``Grid.push_messages`` / ``Grid.pull_messages``, pulling at intervals of
``poll_fraction`` of the time the round has taken so far, at least ``first_poll`` and at most
``max_poll`` s: a reply is noticed within 5 % of the round's duration (10 ms at the start of a round,
250 ms at most), so the wait adds a bounded share to a round of any length, at about 20 pulls per round
(a few per second for long rounds). Used by every fedmeta strategy, in simulation and deployment.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.01
MAX_POLL = 0.25
POLL_FRACTION = 0.05


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None = None, first_poll: float = FIRST_POLL,
             max_poll: float = MAX_POLL, poll_fraction: float = POLL_FRACTION) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` s (None: wait for all), as
    ``Grid.send_and_receive`` does. An object that is not a Flower ``Grid`` (a duck-typed stand-in offering
    only ``send_and_receive``) is asked through ``send_and_receive``."""
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        poll = min(max_poll, max(first_poll, poll_fraction * (now - start)))
        time.sleep(poll if deadline is None else min(poll, max(0.0, deadline - now)))
    return replies


__all__ = ["exchange"]
