"""Sending a round's messages and collecting the replies, with a short poll.

Flower's ``Grid.send_and_receive`` pulls the replies, and between pulls its deployment grid
(``flwr/superlink/grid/http_grid.py``) sleeps 3 s: a deployed round that takes 1 s of client work
ends 3 s after it started at best, and up to 3 s after its last reply. :func:`exchange` does the same
with the public ``Grid.push_messages`` / ``Grid.pull_messages``, pulling at intervals of
``poll_fraction`` (5 %) of the time the round has taken so far, within ``[first_poll, max_poll]`` (10 to
250 ms), and never sooner than ``1 / poll_fraction`` times the last empty pull's own duration: a reply is
noticed within 5 % of the round's duration where a pull is cheap (the simulation's in-process grid),
while over a network (a deployment's SuperLink) the pulls themselves take
at most about 5 % of the wait. Used by every fedmeta strategy, in simulation and deployment.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

CANCELLED = threading.Event()
"""Set by :func:`cancel_exchanges` when this process stops its simulation (fedmeta-sim on Ctrl-C): every
:func:`exchange` then raises :class:`ExchangeCancelled` at its next poll. Flower runs the ServerApp in a thread
that is not a daemon, so a ServerApp still waiting for replies after the engine stopped would keep the process
alive for up to the round timeout; ``fedmeta.simulations.run.simulate`` clears it when a simulation starts."""


class ExchangeCancelled(RuntimeError):
    """The process is stopping its simulation: no reply will come (see :data:`CANCELLED`)."""


def cancel_exchanges() -> None:
    """Make every waiting and future :func:`exchange` of this process raise :class:`ExchangeCancelled`."""
    CANCELLED.set()


def check_cancelled() -> None:
    """Raise :class:`ExchangeCancelled` if :func:`cancel_exchanges` was called (for loops that wait without exchanging)."""
    if CANCELLED.is_set():
        raise ExchangeCancelled("the simulation was stopped (interrupted) while the server waited for its nodes")


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
    check_cancelled()
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    pull_s = 0.0
    while pending:
        check_cancelled()
        t_pull = time.monotonic()
        got = list(grid.pull_messages(pending))
        if not got:  # what polling costs: an empty pull (one that returns replies also moves them)
            pull_s = time.monotonic() - t_pull
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        poll = min(max_poll, max(first_poll, poll_fraction * (now - start), pull_s / poll_fraction))
        time.sleep(poll if deadline is None else min(poll, max(0.0, deadline - now)))
    return replies


__all__ = ["CANCELLED", "ExchangeCancelled", "cancel_exchanges", "check_cancelled", "exchange"]
