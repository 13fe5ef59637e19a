"""Client errors, summarised: each distinct error once, with the clients and rounds that raised it.

A ClientApp that raises comes back to the strategy as an error reply whose ``reason`` is Flower's
text for the exception: ``<class 'T'>:<'message'>`` in a deployment; in a Ray simulation Ray's
remote traceback with Flower's ``ClientAppException`` wrapper chained after the original exception.
:func:`parse_reason` recovers the original exception line (``FileNotFoundError: fashion-mnist not
found ...``) as the error's key and a clean traceback; :class:`ClientFailures` counts every error
reply by what the error is (:func:`error_group`: the exception type, its message with numbers and id
lists masked, and the line that raised it), so a run of 1,000 rounds in which every client failed
says so in a few lines, however many client ids its messages name.

:class:`TrainingStopped` is what a strategy raises when ``max_failed_rounds`` consecutive rounds had
no valid train reply (see :meth:`fedmeta.strategies.base.MetaStrategy.start`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger("fedmeta")
error_log = logging.getLogger("fedmeta.errors")
"""Every error reply in full, at DEBUG. It does not propagate: only a handler attached to it (the
command line tools' run log, :func:`fedmeta.simulations.progress.run_log`) receives these lines."""
error_log.setLevel(logging.DEBUG)
error_log.propagate = False

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FLOWER_WRAPPED = re.compile(r"^<class '([^']*)'>:<'(.*)'>$", re.S)
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n"
_WRAPPER = "Exception ClientAppException occurred. Message: "
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:\([\w.]*\))?)(?::\s?(.*))?$")
_RAY_HEADER = re.compile(r"^ray::\S+ \(pid=.*\)$")


def _clean(text: str) -> str:
    return _ANSI.sub("", text).strip("\n")


def parse_reason(reason: str) -> tuple[str, str]:
    """``(key, text)`` of an error reply's reason.

    ``key`` is the original exception's last line (``Type: message``, module prefix dropped), the
    same for every client that raised the same error; ``text`` is the original exception's traceback
    without Ray's and Flower's wrapper frames, or the plain message when the reason carries no
    traceback (a deployment, or a third-party ClientApp).
    """
    text = _clean(reason or "")
    wrapped = _FLOWER_WRAPPED.match(text)
    if wrapped:
        exc_type, text = wrapped.group(1), _clean(wrapped.group(2))
        if "Traceback" not in text and _CAUSE not in text and "File \"" not in text:
            name = exc_type.rsplit(".", 1)[-1]
            message = text.split(_WRAPPER, 1)[-1].strip() if _WRAPPER in text else text.strip()
            if name == "ClientAppException" or name.startswith("RayTaskError"):
                return _key_from_message(message), message
            return f"{name}: {message}" if message else name, f"{name}: {message}"
    # A Ray traceback: the original exception is the first of the chained parts.
    first = re.split(f"{re.escape(_CAUSE)}|{re.escape(_CONTEXT)}", text)[0]
    lines = [ln for ln in first.splitlines() if not _RAY_HEADER.match(ln.strip()) and set(ln.strip()) != {"^"}]
    body = "\n".join(lines).strip("\n")
    for line in reversed(body.splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m and not line.startswith(" "):
            name = m.group(1).rsplit(".", 1)[-1]
            return (f"{name}: {m.group(2)}" if m.group(2) else name), (
                body if body.startswith("Traceback") else "Traceback (most recent call last):\n" + body)
    message = text.split(_WRAPPER, 1)[-1].strip()
    return _key_from_message(message), message


_NUMBER = r"[-+]?(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_NUMBERS = re.compile(rf"(?<![\w.]){_NUMBER}(?![\w])")
_NUMBER_LIST = re.compile(rf"[\[(]\s*(?:{_NUMBER}|\.\.\.)?(?:\s*,\s*(?:{_NUMBER}|\.\.\.))*\s*,?\s*[\])]")
_FRAME = re.compile(r'^\s*File "([^"]*)", line (\d+), in (\S+)', re.M)


def raised_at(text: str) -> str:
    """``path:line in function`` of the innermost frame of a traceback (``""``: ``text`` has none)."""
    frames = _FRAME.findall(text)
    return f"{frames[-1][0]}:{frames[-1][1]} in {frames[-1][2]}" if frames else ""


def error_group(key: str, text: str) -> str:
    """What an error is, for grouping: :func:`parse_reason`'s ``key`` with its lists of numbers
    (client ids) and its numbers masked, and where it was raised (:func:`raised_at` of ``text``).
    Two clients that raise the same exception at the same line with messages differing only in
    their ids or values are one error; another type, message or line is another."""
    masked = _NUMBERS.sub("#", _NUMBER_LIST.sub("[...]", key))
    where = raised_at(text)
    return f"{masked} @ {where}" if where else masked


def _key_from_message(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "(no message)"
    return first


@dataclass
class ClientError:
    """One distinct error (:func:`error_group`): its first occurrence (``key``: its exception line as
    raised, ``text``: its traceback), and every (round, client) that raised it."""

    key: str
    text: str
    first_round: int
    first_clients: tuple[int, ...]
    stages: set[str] = field(default_factory=set)
    rounds: set[int] = field(default_factory=set)
    clients: set[int] = field(default_factory=set)
    replies: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.key, "replies": self.replies, "clients": sorted(self.clients), "rounds": sorted(self.rounds),
                "stages": sorted(self.stages), "first_round": self.first_round, "first_clients": list(self.first_clients),
                "raised_at": raised_at(self.text), "traceback": self.text}


def _spans(values: Iterable[int]) -> str:
    """``1-3, 7`` for {1, 2, 3, 7}."""
    out: list[str] = []
    for v in sorted(values):
        if out and (prev := out[-1].split("-")[-1]) and int(prev) == v - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out[:8]) + (", ..." if len(out) > 8 else "")


class ClientFailures:
    """Every error reply of a run, grouped by :func:`error_group` (insertion order = first seen)."""

    def __init__(self) -> None:
        self.errors: dict[str, ClientError] = {}
        """:func:`error_group` -> the error."""

    def record_replies(self, server_round: int, stage: str, replies: Iterable[Any],
                       clients_of: Callable[[int], Sequence[int]] | None = None) -> None:
        """Count a round's error replies (non-error replies are skipped): a new error is logged once
        (logger ``fedmeta``, INFO, its key and who raised it: ``clients_of(node)`` when the caller knows
        the clients it sent each node, else the node), every error reply in full to ``fedmeta.errors``
        (the command line tools' run log)."""
        for m in replies:
            if not m.has_error():
                continue
            node = m.metadata.src_node_id
            clients = tuple(clients_of(node)) if clients_of is not None else ()
            known = len(self.errors)
            err = self.record(server_round, stage, clients, m.error.reason)
            if len(self.errors) > known:
                who = f"clients {list(clients)[:8]}" if clients_of is not None else f"node {node}"
                logger.info("round %d: new client error (%s, %s): %s", server_round, stage, who, err.key)
            error_log.debug("round %d: %s error reply of node %d (clients %s), code %s:\n%s", server_round, stage, node,
                            list(clients), m.error.code, m.error.reason)

    def record(self, server_round: int, stage: str, clients: Iterable[int], reason: str) -> ClientError:
        """Count one error reply of ``stage`` (``train`` / ``evaluate``) from a node that ran ``clients``."""
        key, text = parse_reason(reason)
        ids = tuple(sorted(int(c) for c in clients))
        group = error_group(key, text)
        err = self.errors.get(group)
        if err is None:
            err = self.errors[group] = ClientError(key, text, server_round, ids)
        err.stages.add(stage)
        err.rounds.add(server_round)
        err.clients.update(ids)
        err.replies += 1
        return err

    def __bool__(self) -> bool:
        return bool(self.errors)

    @property
    def total(self) -> int:
        return sum(e.replies for e in self.errors.values())

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.errors.values()]

    def report(self) -> str:
        """Each distinct error once: who raised it (every client listed once), when, and its first traceback in full."""
        if not self.errors:
            return "no client errors"
        parts = [f"{len(self.errors)} distinct client error{'s' * (len(self.errors) > 1)} ({self.total} error replies):"]
        for i, e in enumerate(self.errors.values(), 1):
            who = f"{len(e.clients)} client{'s' * (len(e.clients) != 1)}" + (f" ({_spans(e.clients)})" if e.clients else "")
            first = f" by client{'s' * (len(e.first_clients) > 1)} {_spans(e.first_clients)}" if e.first_clients else ""
            parts.append(f"[{i}] raised {e.replies} time{'s' * (e.replies != 1)} by {who} in {'/'.join(sorted(e.stages))} of rounds "
                         f"{_spans(e.rounds)}; as first raised (round {e.first_round}{first}):")
            parts.append("\n".join("    " + ln for ln in e.text.splitlines()))
        return "\n".join(parts)


class TrainingStopped(RuntimeError):
    """The strategy stopped the run: ``max_failed_rounds`` consecutive rounds had no valid train reply.

    ``str()`` is one line (the cause); :attr:`failures` holds the distinct client errors and
    :attr:`last_round` the round after which the run stopped.
    """

    def __init__(self, message: str, *, last_round: int, failures: ClientFailures) -> None:
        super().__init__(message)
        self.last_round = last_round
        self.failures = failures


__all__ = ["ClientError", "ClientFailures", "TrainingStopped", "error_group", "parse_reason", "raised_at"]
