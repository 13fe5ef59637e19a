"""What a run shows while it runs, and where the rest goes.

:class:`RoundProgress` is the per-round display: a ``rich`` progress bar on a terminal (round,
elapsed, ETA, last personalized accuracy, client failures), plain lines when the output is a pipe or
a file. :func:`run_log` sends everything Flower and fedmeta log during a run (every client error in
full) to a log file under the results directory, and keeps Flower's console output (one traceback
per failed client per round) off the terminal unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

from flwr.serverapp.strategy import Result

from fedmeta import config as C


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def _failures(result: Result) -> int:
    """Client error replies so far (train and evaluate)."""
    records = [*result.train_metrics_clientapp.values(), *result.evaluate_metrics_clientapp.values()]
    return int(sum(int(m.get("num-failures", 0)) for m in records))


def _score(result: Result) -> str:
    """The last personalized-evaluation score: accuracy after adaptation, or the loss for regression."""
    if not result.evaluate_metrics_clientapp:
        return "acc -"
    last = result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)]
    if C.ACC_AFTER in last:
        return f"acc {float(last[C.ACC_AFTER]):.4f}"
    if C.LOSS_AFTER in last:
        return f"loss {float(last[C.LOSS_AFTER]):.4f}"
    return "acc -"


class RoundProgress:
    """Call it with ``(server_round, result)`` after every round (``MetaStrategy.start(on_round=...)``).

    Parameters
    ----------
    num_rounds
        The run's last round.
    label
        Shown in front of the bar / each line (e.g. the algorithm).
    stream
        Where to write (default ``sys.stdout``).
    tty
        Bar (``True``) or plain lines (``False``); default: whether ``stream`` is a terminal.
    every
        Plain lines: print every this many rounds (default: about 20 lines a run), plus the first and
        last round, rounds with an evaluation and rounds with new client failures.
    """

    def __init__(self, num_rounds: int, *, label: str = "", stream: IO[str] | None = None, tty: bool | None = None,
                 every: int | None = None) -> None:
        self.num_rounds = num_rounds
        self.label = label
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.every = every or max(1, num_rounds // 20)
        self._bar: Any = None
        self._task: Any = None
        self._started = 0.0
        self._first: int | None = None
        self._first_done = 0.0
        self._failures = 0
        self._evaluated = 0

    def __enter__(self) -> RoundProgress:
        self._started = time.monotonic()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"), TextColumn("round"), MofNCompleteColumn(), BarColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[score]}"),
                TextColumn("failures {task.fields[failures]}"),
                console=Console(file=self.stream), redirect_stdout=True, redirect_stderr=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.num_rounds, score="acc -", failures=0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, server_round: int, result: Result) -> None:
        if self._first is None:
            self._first, self._first_done = server_round, time.monotonic()
        failures, score = _failures(result), _score(result)
        evaluated = len(result.evaluate_metrics_clientapp)
        if self._bar is not None:
            self._bar.update(self._task, completed=server_round, score=score, failures=failures)
        else:
            due = (server_round in (self._first, self.num_rounds) or server_round % self.every == 0
                   or failures > self._failures or evaluated > self._evaluated)
            if due:
                now = time.monotonic()
                elapsed = now - self._started
                # rounds after the first (which includes the engine's start-up) set the pace
                done = server_round - self._first
                per_round = (now - self._first_done) / done if done else self._first_done - self._started
                eta = per_round * (self.num_rounds - server_round)
                prefix = f"{self.label} " if self.label else ""
                print(f"{prefix}round {server_round}/{self.num_rounds} | elapsed {_clock(elapsed)} | eta {_clock(eta)} | "
                      f"{score} | failures {failures}", file=self.stream, flush=True)
        self._failures, self._evaluated = failures, evaluated


class _NotToConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _to_file(record: logging.LogRecord) -> bool:
    # fedmeta.errors' DEBUG lines hold every client error in full; Flower's DEBUG lines are per message.
    return record.levelno >= logging.INFO or record.name.startswith("fedmeta")


@contextlib.contextmanager
def run_log(path: str | Path, *, verbose: bool = False, append: bool = False) -> Iterator[Path]:
    """While the block runs, write (``append``: append) Flower's records (INFO and up: its per-client tracebacks, its
    notices such as ``run_simulation``'s deprecation), fedmeta's (at the ``fedmeta`` logger's level)
    and every client error reply in full (``fedmeta.errors``) to ``path``; unless ``verbose``, Flower's
    records reach no console. Logger levels are left as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.addFilter(_to_file)
    loggers = [logging.getLogger(name) for name in ("flwr", "fedmeta", "fedmeta.errors")]
    quiet = _NotToConsole()
    consoles = [h for h in loggers[0].handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    propagate = loggers[0].propagate
    for lg in loggers:
        lg.addHandler(handler)
    if not verbose:
        loggers[0].propagate = False  # nor through the root logger's console handlers
        for h in consoles:
            h.addFilter(quiet)
    try:
        yield path
    finally:
        loggers[0].propagate = propagate
        for h in consoles:
            h.removeFilter(quiet)
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def console_through(progress: RoundProgress) -> Iterator[None]:
    """While a progress bar is live, let the root logger's console handlers write through it (above the
    bar) instead of over it."""
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and getattr(h, "stream", None) in (sys.__stdout__, sys.__stderr__, progress.stream)]
    if not progress.tty:
        yield
        return
    old = [h.setStream(sys.stdout) for h in handlers]  # rich's redirected stdout while the bar is live
    try:
        yield
    finally:
        for h, stream in zip(handlers, old):
            if stream is not None:
                h.setStream(stream)


__all__ = ["RoundProgress", "console_through", "run_log"]
