"""The benchmarks' measuring kit: the memory and CPU of a process tree sampled from /proc, the machine's load
while a benchmark runs, a simulation run in a child process (``python bench/measure.py --child SPEC``), the
environment block of a report, and its output. ``bench_scale.py``, ``bench_peers.py`` and ``bench_local_round.py``
use it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import flwr
import ray
import torch

from fedmeta.simulations.config import ExperimentConfig
from fedmeta.simulations.processes import busy_cpu_seconds, process_table, stat_fields, stat_table, tree
from fedmeta.simulations.run import simulate

GIB = 1024**3


def describe(cfg: ExperimentConfig) -> str:
    """One line naming a workload: model, data, algorithm, estimator, H, K."""
    data = "sinewave" if cfg.dataset == "sinewave" else f"{cfg.dataset} {cfg.partition} {cfg.classes_per_client}-class"
    return (f"{cfg.model_name} on {data}, {cfg.algorithm} {cfg.meta_gradient}, N={cfg.inner_steps}, "
            f"H={cfg.local_steps}, K={cfg.batch_size}")


# --------------------------------------------------------------------------- /proc: memory and CPU


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:  # the process is gone, or the file is not readable
        return None


def _kib(text: str | None, key: str) -> int:
    """The ``key:  N kB`` line of a /proc status-like file, in KiB (0 if absent)."""
    for line in (text or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def busy_ticks() -> int:
    """CPU ticks the whole machine spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    return round(busy_cpu_seconds() * CLOCK_TICKS)


def own_ticks() -> int:
    """CPU ticks of this process (all threads), children not included."""
    fields = stat_fields(os.getpid()) or []
    return int(fields[11]) + int(fields[12])


@dataclass
class TreeMemory:
    """Memory and CPU of a process tree, sampled from /proc while it runs."""

    peak_rss_bytes: int = 0
    """Peak over samples of the summed VmRSS of the tree (an upper bound: shared pages count per process)."""
    peak_pss_bytes: int | None = None
    """Peak over samples of the summed Pss (smaps_rollup): shared pages split between their users
    (``None`` if smaps_rollup is not readable)."""
    processes_at_peak: int = 0
    """Processes in the tree at the RSS peak."""
    max_processes: int = 0
    samples: int = 0
    cpu_ticks: int = 0
    """CPU ticks of every process seen in the tree (last value read per process)."""


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants every ``interval`` seconds.

    PSS costs ~10 ms per large process to read (``smaps_rollup`` walks the page tables), so it is
    read every ``pss_every``-th sample and at every new RSS peak, which keeps the sampler's own CPU
    use small on a 2-core machine.
    """

    def __init__(self, root: int, interval: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every = root, interval, pss_every
        self.result = TreeMemory()
        self._ticks: dict[tuple[int, str], int] = {}  # (pid, start time) -> utime + stime
        self._halt = threading.Event()

    def sample(self) -> None:
        """One sample of the tree (also called once more after the root exits: nothing left then)."""
        table = stat_table()
        pids = tree(self.root, table)
        rss = 0
        for pid in pids:
            rss += 1024 * _kib(_read(f"/proc/{pid}/status"), "VmRSS")
            fields = table[pid]
            self._ticks[(pid, fields[19])] = int(fields[11]) + int(fields[12])
        r = self.result
        peak = rss > r.peak_rss_bytes
        if peak:
            r.peak_rss_bytes, r.processes_at_peak = rss, len(pids)
        if self.pss_every and (peak or r.samples % self.pss_every == 0):
            rollups = [_read(f"/proc/{pid}/smaps_rollup") for pid in pids]
            if any(rollups):
                pss = sum(1024 * _kib(text, "Pss") for text in rollups)
                r.peak_pss_bytes = max(r.peak_pss_bytes or 0, pss)
        r.samples += 1
        r.max_processes = max(r.max_processes, len(pids))
        r.cpu_ticks = sum(self._ticks.values())

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> TreeMemory:
        self._halt.set()
        self.join()
        return self.result


@dataclass
class Load:
    """What else ran on the machine during a part of the benchmark (read from /proc/stat)."""

    wall_s: float
    machine_busy_cores: float
    """Average number of cores busy on the whole machine."""
    own_cores: float
    """Average cores used by this benchmark (this process and its children's trees)."""
    others_cores: float = field(init=False)
    """Average cores used by other processes: what disturbed the timings."""

    def __post_init__(self) -> None:
        self.others_cores = max(0.0, self.machine_busy_cores - self.own_cores)


class LoadMeter:
    """Measures :class:`Load` between ``__init__`` and :meth:`stop`."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_ticks(), own_ticks()

    def stop(self, child_ticks: int = 0) -> Load:
        wall = time.perf_counter() - self.t0
        busy = (busy_ticks() - self.busy0) / CLOCK_TICKS / wall
        own = (own_ticks() - self.own0 + child_ticks) / CLOCK_TICKS / wall
        return Load(wall_s=wall, machine_busy_cores=busy, own_cores=own)


class ChildCpu:
    """CPU ticks of every child process tree this script ran (sampled), for the machine-load summary."""

    ticks = 0


# --------------------------------------------------------------------------- simulations in a child


@dataclass
class SimRun:
    """One ``simulate(cfg)`` run in a child process."""

    label: str
    config: dict[str, Any]
    clients_per_round: int
    client_steps_per_round: int
    round_seconds: dict[int, float]
    steady_rounds: list[int]
    steady_median_s: float
    client_steps_per_s: float
    simulate_s: float
    """Wall time of ``simulate(cfg)`` in the child (Ray start-up included)."""
    child_s: float
    """Wall time of the child process (Python and torch imports included)."""
    memory: TreeMemory
    ray_leftovers: list[str]
    """Processes of the child's Ray still alive after it exited (ended by this script): should be empty."""
    load: Load
    steady_busy_cores: float | None = None
    """Busy cores of the child's process tree over rounds 2..R (:class:`RoundCpu`)."""
    handler_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Per round (str), each train reply's handler time (``client-timing``): the clients' math and the node's work."""


def steady(round_seconds: dict[int, float]) -> tuple[list[int], float]:
    """Rounds 2..R and the median of their seconds (round 1 pays Ray start-up and warm-up)."""
    rounds = sorted(r for r in round_seconds if r >= 2)
    if not rounds:
        raise ValueError("need at least two rounds to measure a steady round")
    return rounds, statistics.median(round_seconds[r] for r in rounds)


def _ray_processes(marker: str) -> dict[int, str]:
    """Live processes whose command line names ``marker`` (the child's Ray temporary directory)."""
    me = os.getpid()
    return {pid: " ".join(argv).strip()[:120] for pid, (_, state, argv, _) in process_table().items()
            if pid != me and state != "Z" and marker in " ".join(argv)}


def end_leftovers(marker: str, grace_s: float = 10.0) -> list[str]:
    """Wait up to ``grace_s`` for the child's Ray processes to exit; end (by pid) any still alive.

    Returns the command lines of the processes that had to be ended (empty when Ray shut down cleanly).
    """
    deadline = time.monotonic() + grace_s
    while (alive := _ray_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not (pids := _ray_processes(marker)):
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2.0)
    if still := _ray_processes(marker):
        raise RuntimeError(f"Ray processes of a benchmark child survive SIGKILL: {still}")
    return list(alive.values())


@dataclass
class Child:
    """A child process run by :func:`measured_child`: its exit, output, wall time, memory and CPU, and the machine's load."""

    returncode: int
    log: str
    wall_s: float
    memory: TreeMemory
    ray_leftovers: list[str]
    load: Load

    @property
    def busy_cores(self) -> float:
        """Average cores the child's process tree used over its wall time (start-up included)."""
        return self.memory.cpu_ticks / CLOCK_TICKS / self.wall_s


def measured_child(cmd: list[str], work: str, env: dict[str, str] | None = None, *, interval: float = 0.2,
                   pss_every: int = 5) -> Child:
    """Run ``cmd`` to its end while sampling its process tree's memory and CPU (:class:`TreeSampler`, every
    ``interval`` s; ``pss_every=0``: RSS only, the cheapest sampling).

    ``work`` is a temporary directory of the child's own: it becomes the child's ``RAY_TMPDIR``, so that
    any Ray process still naming it after the child exits is found and ended (:func:`end_leftovers`).
    """
    env = {**(os.environ if env is None else env), "RAY_TMPDIR": work}  # marks every Ray process of this child
    meter = LoadMeter()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(child.pid, interval, pss_every)
    sampler.start()
    log, _ = child.communicate()
    wall = time.perf_counter() - t0
    memory = sampler.stop()
    ChildCpu.ticks += memory.cpu_ticks
    leftovers = end_leftovers(work)
    return Child(child.returncode, log, wall, memory, leftovers, meter.stop(memory.cpu_ticks))


def run_child(label: str, cfg: ExperimentConfig, results_dir: str, **sampling: Any) -> SimRun:
    """Run ``simulate(cfg)`` in a child process, sampling the memory of its whole process tree.

    Raises
    ------
    RuntimeError
        If the child fails, or a round did not get a reply from every client it sampled, or any
        reply failed (a faster round would then be a wrong one).
    """
    with tempfile.TemporaryDirectory(prefix="fmb-") as work:
        spec, out = Path(work) / "spec.json", Path(work) / "out.json"
        cfg = cfg.replace(results_dir=results_dir)
        spec.write_text(json.dumps({"config": cfg.to_dict(), "out": str(out)}))
        child = measured_child([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)], work, **sampling)
        if child.returncode != 0 or not out.exists():
            raise RuntimeError(f"{label}: the simulation child failed (exit {child.returncode}):\n{child.log[-4000:]}")
        res = json.loads(out.read_text())
        memory, leftovers, load, child_s = child.memory, child.ray_leftovers, child.load, child.wall_s
    per_round = cfg.clients_per_round or cfg.num_clients
    round_seconds = {int(r): float(s) for r, s in res["round_seconds"].items()}
    for r, metrics in res["train"].items():
        if metrics["num-clients"] != per_round or metrics["num-failures"]:
            raise RuntimeError(f"{label}, round {r}: {metrics['num-clients']:.0f} of {per_round} clients replied, "
                               f"{metrics['num-failures']:.0f} failed")
    if sorted(round_seconds) != list(range(1, cfg.num_rounds + 1)) or len(res["train"]) != cfg.num_rounds:
        raise RuntimeError(f"{label}: expected {cfg.num_rounds} trained rounds, got {sorted(round_seconds)}")
    rounds, median = steady(round_seconds)
    steps = per_round * cfg.local_steps
    return SimRun(label=label, config={k: v for k, v in cfg.to_dict().items() if k != "results-dir"},
                  clients_per_round=per_round, client_steps_per_round=steps, round_seconds=round_seconds,
                  steady_rounds=rounds, steady_median_s=median, client_steps_per_s=steps / median,
                  simulate_s=res["simulate_s"], child_s=child_s, memory=memory, ray_leftovers=leftovers, load=load,
                  steady_busy_cores=res.get("steady_busy_cores"), handler_seconds=res.get("handler_seconds", {}))


class RoundCpu:
    """A :class:`fedmeta.tracking.Tracker` that marks, at the end of every round, the time and the CPU ticks of this
    process's whole tree (the simulation's Ray processes included): the busy cores of the steady rounds."""

    def __init__(self) -> None:
        self.marks: dict[int, tuple[float, int]] = {}
        self._sampler = TreeSampler(os.getpid(), pss_every=0)

    def log(self, step: int, values: Any) -> None:
        self._sampler.sample()
        self.marks[int(step)] = (time.perf_counter(), self._sampler.result.cpu_ticks)

    def close(self) -> None:
        pass


def steady_busy_cores(marks: dict[int, tuple[float, int]]) -> float | None:
    """Busy cores of the process tree from the end of round 1 to the end of the last round (``None``: too few rounds)."""
    rounds = sorted(marks)
    if len(rounds) < 2 or rounds[0] != 1:
        return None
    (t1, c1), (t2, c2) = marks[1], marks[rounds[-1]]
    return (c2 - c1) / CLOCK_TICKS / (t2 - t1)


def child_main(spec_path: str) -> int:
    """``--child``: run one simulation and write what the parent needs (rounds, replies, seconds, steady CPU)."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = ExperimentConfig.from_mapping(spec["config"])
    cpu = RoundCpu()
    t0 = time.perf_counter()
    res = simulate(cfg, check=False, progress=False, trackers=[cpu])  # as before the input check and progress display existed
    seconds = time.perf_counter() - t0
    train = {r: {k: m[k] for k in ("num-clients", "num-failures")} for r, m in res["train"].items()}
    Path(spec["out"]).write_text(json.dumps({"round_seconds": res["round_seconds"], "train": train, "simulate_s": seconds,
                                             "steady_busy_cores": steady_busy_cores(cpu.marks),
                                             "handler_seconds": res["handler_seconds"]["train"]}))
    return 0


def environment() -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "mem_total_gib": _kib(_read("/proc/meminfo"), "MemTotal") / 1024**2,
        "loadavg_at_start": (_read("/proc/loadavg") or "").split()[:3],
    }


class Progress:
    """``progress(msg)``: one line on stderr with the seconds since this object was made."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"  {self.seconds():6.0f} s  {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", metavar="SPEC", required=True, help="run one simulation (what run_child starts)")
    return child_main(parser.parse_args(argv).child)


if __name__ == "__main__":
    raise SystemExit(main())
