"""Run fedmeta experiments on Flower's simulation engine (Ray backend).

``python -m fedmeta.simulations.run`` (or ``fedmeta-sim``) runs the default experiment: LocalMOML
and Per-FedAvg on the Fallah split of Fashion-MNIST, 50 virtual clients, B = 10 per round, H = 4,
K = 5, exact Hessian, and prints a comparison table. Every field of
:class:`~fedmeta.simulations.config.ExperimentConfig` is a flag (``--num-rounds 100``);
``--algorithms per-fedavg`` runs one algorithm.

Each run writes a checkpoint after every round (``<results-dir>/checkpoints/<run>``, see
:mod:`fedmeta.strategies.checkpoint`); after a crash or kill, the same command with ``--resume``
continues from the last completed round and ends with the model an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

from pathlib import Path

from fedmeta import config as C
from fedmeta.provenance import provenance
from fedmeta.extras import MissingExtra
from fedmeta.tracking import Tracker, Trackers, require
from fedmeta.simulations.apps import build_client_app, build_server_app
from fedmeta.simulations.config import AUTO_NODES, ExperimentConfig, parse_cli
from fedmeta.simulations.engine import run_on_ray
from fedmeta.simulations import cluster
from fedmeta.simulations.preflight import InputError, check_inputs
from fedmeta.simulations.processes import busy_cpu_seconds
from fedmeta.simulations.progress import RoundProgress, console_through, run_log
from fedmeta.strategies.checkpoint import CheckpointDir, CheckpointError, check_can_start
from fedmeta.strategies.exchange import CANCELLED, cancel_exchanges

logger = logging.getLogger("fedmeta")
USAGE_PREFIX = "usage-"
"""``<results-dir>/usage-<first run>.json``: :func:`usage` of a fedmeta-sim invocation, with its provenance."""


def resolve_nodes(cfg: ExperimentConfig, nodes: list[dict[str, Any]] | None = None) -> ExperimentConfig:
    """``num-nodes = -1`` resolved as :func:`simulate` resolves it: one multi-client node per actor slot of the
    cluster's alive ``nodes`` (an empty list: this machine; ``None``: read them, attaching briefly to the cluster
    ``ray-address`` or ``RAY_ADDRESS`` names, if any). Any other value is returned unchanged, and so is the
    config when that cluster does not answer (:func:`simulate` then says so)."""
    if cfg.num_nodes != AUTO_NODES:
        return cfg
    if nodes is None:
        address = cluster.cluster_address(cfg.ray_address)
        nodes = []
        if address:
            try:
                nodes = cluster.connect(address)
            except cluster.ClusterUnreachable:
                return cfg
            finally:
                cluster.disconnect()
    return cfg.with_nodes_for(cluster.actor_slots(nodes or cluster.local_resources(), cfg.num_cpus, cfg.num_gpus))


def simulate(cfg: ExperimentConfig, *, verbose: bool = False, check: bool = True, progress: bool = True,
             trackers: Sequence[Tracker] = ()) -> dict[str, Any]:
    """Run one experiment on Flower's simulation engine (:func:`~fedmeta.simulations.engine.run_on_ray`)
    and return its results (also written to ``<results-dir>/<run>.json``).

    ``check``: first check the data and the model in this process (:func:`check_inputs`; raises
    :class:`InputError` before Ray starts). Flower's log and every client error in full go to
    ``results["log"]`` (``<results-dir>/logs/<run>.log``). ``progress``: a progress bar on a terminal,
    plain round lines otherwise. A run the strategy stopped because no client could train, or whose
    final evaluation never happened, returns with ``results["status"] == "failed"`` and the cause in
    ``results["failure"]``.

    ``trackers``: further :class:`fedmeta.tracking.Tracker` s of this process (a tuner's), beside the one
    ``cfg.track`` opens; after every round each receives ``log(round, values)`` with the values the results
    JSON holds for that round (:func:`fedmeta.tracking.round_values`), and all are closed when the run ends, however
    it ends. An exception a tracker's ``log`` raises (``optuna.TrialPruned``) stops the run after that round: the
    engine shuts down and the exception propagates from here, after the trackers are closed.
    """
    fanout = Trackers(trackers)
    try:
        return _simulate(cfg, verbose=verbose, check=check, progress=progress, trackers=fanout)
    finally:
        fanout.close()


def _simulate(cfg: ExperimentConfig, *, verbose: bool, check: bool, progress: bool, trackers: Trackers) -> dict[str, Any]:
    require(cfg.track)  # a missing optional package: one line, before any work
    if check:
        check_inputs(cfg)
    box: dict[str, Any] = {}
    log_path = Path(cfg.results_dir) / "logs" / f"{cfg.stem}.log"
    with contextlib.ExitStack() as stack:
        client_cfg = cfg
        ckpt = cfg.checkpoint_path
        if ckpt is not None:
            check_can_start(ckpt, cfg.resume)  # before any work: resume needs a checkpoint, a fresh run a free directory
            if not cfg.memory_dir:  # the clients' memories live beside the checkpoint, so a resumed run finds them
                if not cfg.resume:
                    shutil.rmtree(ckpt / "memory", ignore_errors=True)  # a finished earlier run's
                client_cfg = cfg.replace(memory_dir=str(ckpt / "memory"))
        address = cluster.cluster_address(cfg.ray_address)
        nodes = []
        if address:  # an existing cluster: attach before any temp dir is chosen, detach (not stop it) at the end
            stack.callback(cluster.disconnect)
            try:
                nodes = cluster.connect(address)
            except cluster.ClusterUnreachable as err:
                raise InputError(str(err)) from None
        if cfg.num_nodes == AUTO_NODES:
            cfg = resolve_nodes(cfg, nodes)
            client_cfg = client_cfg.replace(num_nodes=cfg.num_nodes)
        if ckpt is None and cfg.num_nodes and not cfg.memory_dir:  # multi-client nodes: memory banks for this run only
            refusal = cluster.temp_memory_refusal(len(nodes))
            if refusal:
                raise InputError(refusal)
            client_cfg = cfg.replace(memory_dir=stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmeta-memory-")))
        if client_cfg.memory_dir and len(nodes) > 1:  # every host must see the memories (and the checkpoint beside them)
            try:
                cluster.check_shared_storage({"memory-dir" if cfg.memory_dir else "checkpoint-dir": client_cfg.memory_dir}, nodes)
            except cluster.SharedStorageError as err:
                raise InputError(str(err)) from None
        stack.enter_context(run_log(log_path, verbose=verbose, append=cfg.resume))  # a resumed run continues its log
        stream = sys.stdout if progress else stack.enter_context(open(os.devnull, "w"))
        bar = stack.enter_context(RoundProgress(cfg.num_rounds, label=cfg.algorithm, stream=stream))
        stack.enter_context(console_through(bar))
        CANCELLED.clear()  # a stop of an earlier simulation in this process does not stop this one
        try:
            with stop_on_ctrl_c():
                run_on_ray(build_server_app(cfg, sink=box.update, on_round=bar, trackers=[trackers]), build_client_app(client_cfg),
                           num_supernodes=cfg.num_supernodes, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, verbose=verbose)
        except KeyboardInterrupt:
            # a second Ctrl-C (or one in a thread without the handler): the ServerApp runs in Flower's thread, which is
            # not a daemon and would wait for replies up to the round timeout: stop it at its next poll.
            cancel_exchanges()
            raise
        except Exception:
            logger.exception("the simulation failed")  # the traceback goes to the run log too
            raise
    if not box:
        raise RuntimeError(f"the simulation ended without results (see {log_path})")
    box["log"] = str(log_path)
    return box


STOPPING_NOTICE_S = 5.0
"""After a first Ctrl-C, how long the stop may take before fedmeta-sim says what it waits for."""


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Stop a simulation on Ctrl-C the way Flower's engine can stop cleanly, and raise ``KeyboardInterrupt`` after.

    A first SIGINT (in the main thread) calls :func:`cancel_exchanges`: the ServerApp ends at its next poll
    (``ExchangeCancelled``, which :func:`~fedmeta.simulations.apps.build_server_app`'s ends without results), and that
    stops Flower's engine; the engine lets the nodes' messages in flight end and
    shuts Ray down. A ``KeyboardInterrupt`` raised inside the engine instead shuts Ray down while the engine's
    threads still wait on it (``ray.get``): the process then hangs at exit or crashes, and the ServerApp thread
    may still be starting (logging, writing its first checkpoint) after the run was reported stopped. A second
    SIGINT raises ``KeyboardInterrupt`` at once. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    notice = threading.Timer(STOPPING_NOTICE_S, lambda: print(
        "fedmeta-sim: stopping: the nodes finish their current messages first (Ctrl-C again to stop at once)",
        file=sys.stderr, flush=True))
    notice.daemon = True

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cancel_exchanges()
        notice.start()

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        notice.cancel()
        signal.signal(signal.SIGINT, previous)
    if CANCELLED.is_set():  # the ServerApp ended without results (or finished before it noticed the stop)
        raise KeyboardInterrupt


def leave_if_engine_stuck(code: int) -> None:
    """End the process now (``os._exit``) if threads that are not daemons are still alive: after a second Ctrl-C,
    Flower's engine threads may wait forever on a Ray that was shut down under them, and Python's exit would wait
    for them (or crash). Everything fedmeta wrote is closed by then (results, checkpoints, logs)."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmeta-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--algorithms", default=f"{C.LOCAL_MOML},{C.PER_FEDAVG}", help="comma-separated algorithms to run")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    ExperimentConfig.add_arguments(p, skip=("algorithm",))
    return p


def _table(rows: list[dict[str, Any]]) -> str:
    new = any(f"new-{C.ACC_AFTER}" in r["final"] for r in rows)
    head = f"{'algorithm':<12} {'rounds':>6} {'acc before':>11} {'acc after (mean +- std)':>24} {'p10':>7}"
    head += f" {'new: before':>11} {'new: after':>10}" * new + f" {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        f = r["final"]
        name = f"{r['config']['algorithm']:<12} {r['final_round'] or 0:>6}"
        if C.ACC_AFTER in f:
            line = f"{name} {f[C.ACC_BEFORE]:>11.4f} {f[C.ACC_AFTER]:>14.4f} +- {f[C.ACC_AFTER + '-std']:.4f} {f[C.ACC_AFTER + '-p10']:>7.4f}"
            if new:
                line += f" {f.get('new-' + C.ACC_BEFORE, float('nan')):>11.4f} {f.get('new-' + C.ACC_AFTER, float('nan')):>10.4f}"
            lines.append(f"{line} {r['seconds']:>8.1f}")
        elif f:
            lines.append(f"{name}  loss before {f[C.LOSS_BEFORE]:.4f} after {f[C.LOSS_AFTER]:.4f} {r['seconds']:>8.1f}")
        else:
            lines.append(f"{r['config']['algorithm']:<12} {r['config']['num-rounds']:>6}  (no evaluation) {r['seconds']:>8.1f}")
    if any(r["config"]["algorithm"] == C.FEDAVG for r in rows):
        lines.append("(fedavg: 'acc before' is FedAvg, 'acc after' is FedAvg + fine-tune)")
    return "\n".join(lines)


def data_key(cfg: ExperimentConfig) -> tuple:
    return cfg.dataset, cfg.model_name, tuple(sorted(cfg.data_kwargs().items()))


def check_all(configs: Sequence[ExperimentConfig], prog: str) -> bool:
    """:func:`check_inputs` once per distinct data set and model, before the first run; one line on
    stderr per problem. Returns whether every check passed."""
    seen = set()
    for cfg in configs:
        if data_key(cfg) in seen:
            continue
        seen.add(data_key(cfg))
        try:
            print(f"inputs checked: {check_inputs(cfg)}", flush=True)
        except InputError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return False
    return True


def report_failure(res: dict[str, Any], prog: str) -> None:
    """A failed run, once: the distinct client errors (first traceback in full), then the cause in one line."""
    if res.get("client_errors_report"):
        print(res["client_errors_report"], file=sys.stderr)
    print(f"{prog}: error: {res['config']['algorithm']}: {res['failure']}. Results: {res['path']} (status failed); "
          f"full log: {res['log']}", file=sys.stderr, flush=True)


def client_steps(res: dict[str, Any]) -> int:
    """Client meta-steps a run trained: clients that replied in each round times their local steps (H / tau)."""
    return sum(int(m.get("num-clients", 0)) for m in res["train"].values()) * int(res["config"]["local-steps"])


def usage(rows: list[dict[str, Any]], wall: float, busy0: float | None) -> dict[str, Any]:
    """What the runs cost: wall time (Ray start-ups and evaluations included), client meta-steps and their rate
    over it, and the cores the machine had busy meanwhile (``/proc/stat``, every process on the machine; None
    where unreadable)."""
    steps = sum(client_steps(r) for r in rows)
    busy1, cores = busy_cpu_seconds(), os.cpu_count() or 1
    used = (busy1 - busy0) / wall if busy0 is not None and busy1 is not None and wall > 0 else None
    return {"runs": [Path(r["path"]).name for r in rows if r.get("path")], "wall_s": wall, "client_steps": steps,
            "client_steps_per_s": steps / wall if wall > 0 else 0.0, "busy_cores": used, "cores": cores}


def usage_line(u: dict[str, Any]) -> str:
    """:func:`usage` as fedmeta-sim's last line."""
    n = len(u["runs"])
    line = (f"{n} run{'s' * (n != 1)} in {u['wall_s']:.1f} s of wall time; {u['client_steps']:,} client meta-steps, "
            f"{u['client_steps_per_s']:,.1f} client-steps/s")
    if u["busy_cores"] is not None:
        line += (f"; CPU: {u['busy_cores']:.2f} of {u['cores']} cores busy on average ({100 * u['busy_cores'] / u['cores']:.0f} %, "
                 "the whole machine)")
    return line


def interrupted(cfg: ExperimentConfig, not_started: Sequence[str]) -> str:
    """The one line fedmeta-sim prints when Ctrl-C stops the run of ``cfg``: how to continue it."""
    if cfg.checkpoint_path is not None and CheckpointDir(cfg.checkpoint_path).exists():
        line = (f"interrupted during {cfg.algorithm}; continue it with the same flags and --algorithms {cfg.algorithm} --resume "
                f"(checkpoint {cfg.checkpoint_path})")
    else:
        line = (f"interrupted during {cfg.algorithm}; run it again with the same flags and --algorithms {cfg.algorithm} "
                "(no round of it was checkpointed)")
    if not_started:
        line += f"; not started: {','.join(not_started)}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_cli(_parser(), argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("algorithms", "verbose")}
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    try:
        configs = [ExperimentConfig.from_mapping({**overrides, "algorithm": a}) for a in algorithms]
    except ValueError as err:  # bad input: one clear line, before any work starts
        print(f"fedmeta-sim: error: {err}", file=sys.stderr)
        return 2
    if not configs:
        print("fedmeta-sim: error: --algorithms is empty", file=sys.stderr)
        return 2
    try:
        require(configs[0].track)  # a missing optional package: one line, before any work
    except MissingExtra as err:
        print(f"fedmeta-sim: error: {err}", file=sys.stderr)
        return 2
    for cfg in configs:  # every run's checkpoint, before the first run starts
        try:
            if cfg.checkpoint_path is not None:
                check_can_start(cfg.checkpoint_path, cfg.resume)
        except CheckpointError as err:
            print(f"fedmeta-sim: error: {err}", file=sys.stderr)
            return 2
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.WARNING)  # fedmeta's INFO lines go to each run's log file
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logging.getLogger().addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        if not check_all(configs, "fedmeta-sim"):  # data and model, in this process, before Ray starts
            return 2
        rows, started, busy0, started_at = [], time.perf_counter(), busy_cpu_seconds(), time.time()
        for cfg in configs:
            mode = f"B={cfg.clients_per_round} of n={cfg.num_clients}" if cfg.clients_per_round else f"all n={cfg.num_clients}"
            t0 = time.perf_counter()
            try:  # the header too: a Ctrl-C while it prints is the same interruption
                print(f"== {cfg.algorithm} on {cfg.dataset} ({mode}, {cfg.num_rounds} rounds, H/tau={cfg.local_steps}, "
                      f"K={cfg.batch_size}, meta-gradient={cfg.meta_gradient}, seed={cfg.seed})", flush=True)
                res = simulate(cfg, verbose=args.verbose, check=False)
            except KeyboardInterrupt:
                print(f"\nfedmeta-sim: {interrupted(cfg, [c.algorithm for c in configs[len(rows) + 1:]])}", file=sys.stderr, flush=True)
                leave_if_engine_stuck(130)
                return 130
            except InputError as err:  # the cluster or its shared storage: one line, before round 1
                print(f"fedmeta-sim: error: {err}", file=sys.stderr)
                return 2
            except Exception as err:  # the ServerApp or the engine crashed: one line, the traceback is in the log
                log = Path(cfg.results_dir) / "logs" / f"{cfg.stem}.log"
                print(f"fedmeta-sim: error: {cfg.algorithm}: the simulation failed: {type(err).__name__}: "
                      f"{' '.join(str(err).split())} (full log: {log})", file=sys.stderr)
                return 1
            if res["status"] != "ok":
                report_failure(res, "fedmeta-sim")
                return 1
            errors = f", {len(res['client_errors'])} distinct client errors (below)" if res["client_errors"] else ""
            print(f"   done in {time.perf_counter() - t0:.1f} s (incl. Ray start-up){errors}; results: {res['path']}; "
                  f"log: {res['log']}", flush=True)
            rows.append(res)
        print()
        print("Personalized accuracy (after fine-tuning on each client's train split, scored on its test split)")
        print(_table(rows))
        print()
        figures = usage(rows, time.perf_counter() - started, busy0)
        print(usage_line(figures))
        # beside the results: what this invocation cost (scripts/docs_results.py ingest-default-run reads it)
        usage_path = Path(configs[0].results_dir) / f"{USAGE_PREFIX}{configs[0].stem}.json"
        block = provenance({"algorithms": algorithms, **overrides}, started=started_at, argv=argv)
        usage_path.write_text(json.dumps({**figures, "provenance": block}, indent=1, default=str) + "\n")
        for res in rows:
            if res["client_errors"]:
                print(f"\n{res['config']['algorithm']}: the run went on without the failed replies; "
                      f"{res['client_errors_report']}\nfull log: {res['log']}")
        return 0
    finally:
        logging.getLogger().removeHandler(console)


if __name__ == "__main__":
    sys.exit(main())
