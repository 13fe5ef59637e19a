"""What the reproductions share: their run cache (a finished run is reused, so an interrupted command resumes), the
``Runs:`` provenance line of a summary, and writing a figure."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from fedmeta.provenance import RUNS_PREFIX, describe, provenance


def save_figure(fig: Any, path: Path) -> list[Path]:
    """Write a matplotlib figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def runs_line(block: dict[str, Any], count: int, reused: int) -> str:
    """``Runs: commit ... (clean tree), <date>; <versions>; ...`` for the invocation whose provenance is ``block``;
    runs reused from an earlier invocation are counted, since their code may be older."""
    line = RUNS_PREFIX + describe(block)
    if reused:
        line += f" ({reused} of {count} runs reused from an earlier invocation, whose results files record their own commit)"
    return line + "."


def config_key(cfg: Any) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


class CachedRuns:
    """The runs of one reproduction, each kept as JSON in ``runs_dir`` under its configuration: a run that
    finished before is reused (an interrupted command resumes), the others run in ``jobs`` processes with
    one thread each. Calling it with configurations returns their results, in order.

    ``run(cfg)``: a picklable function returning a result with ``config``, ``seconds`` and ``to_dict()``;
    ``load(dict)``: the result read back; ``describe(cfg, result)``: its progress line."""

    def __init__(self, runs_dir: Path, jobs: int, run: Callable[[Any], Any], load: Callable[[dict[str, Any]], Any],
                 describe: Callable[[Any, Any], str]) -> None:
        self.runs_dir, self.jobs, self.run, self.describe = runs_dir, jobs, run, describe
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.finished = {}
        for path in sorted(runs_dir.glob("*.json")):
            res = load(json.loads(path.read_text()))
            self.finished[config_key(res.config)] = res
        self.count = self.reused = 0

    def _report(self, cfg: Any, res: Any, how: str) -> None:
        self.count += 1
        print(f"[{self.count}] {self.describe(cfg, res)} ({how}, {res.seconds:.0f} s)", flush=True)

    def _keep(self, cfg: Any, res: Any) -> None:
        key = config_key(cfg)
        record = {**res.to_dict(), "provenance": provenance(cfg.to_dict(), started=time.time() - res.seconds)}
        (self.runs_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:12]}.json").write_text(json.dumps(record))
        self.finished[key] = res
        self._report(cfg, res, "ran")

    def __call__(self, cfgs: list[Any]) -> list[Any]:
        pending = list({config_key(c): c for c in cfgs if config_key(c) not in self.finished}.values())
        for c in cfgs:
            if config_key(c) in self.finished:
                self.reused += 1
                self._report(c, self.finished[config_key(c)], "reused")
        if self.jobs > 1 and len(pending) > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from multiprocessing import get_context

            with ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=one_thread) as pool:
                futures = {pool.submit(self.run, c): c for c in pending}
                for fut in as_completed(futures):
                    self._keep(futures[fut], fut.result())
        else:
            for c in pending:
                self._keep(c, self.run(c))
        return [self.finished[config_key(c)] for c in cfgs]


def one_thread() -> None:
    """Tiny models: one intra-op thread per process is fastest, and leaves the other core to the other job."""
    import torch

    torch.set_num_threads(1)
