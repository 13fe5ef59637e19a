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
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from typing import Any, Sequence

from fedmeta import config as C
from fedmeta.simulations.config import ExperimentConfig, parse_cli
from fedmeta.strategies.checkpoint import CheckpointError, check_can_start

logger = logging.getLogger("fedmeta")


def simulate(cfg: ExperimentConfig, *, verbose: bool = False) -> dict[str, Any]:
    """Run one experiment with ``flwr.simulation.run_simulation`` and return its results."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    box: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        client_cfg = cfg
        ckpt = cfg.checkpoint_path
        if ckpt is not None:
            check_can_start(ckpt, cfg.resume)  # before any work: resume needs a checkpoint, a fresh run a free directory
            if not cfg.memory_dir:  # the clients' memories live beside the checkpoint, so a resumed run finds them
                if not cfg.resume:
                    shutil.rmtree(ckpt / "memory", ignore_errors=True)  # a finished earlier run's
                client_cfg = cfg.replace(memory_dir=str(ckpt / "memory"))
        elif cfg.num_nodes and not cfg.memory_dir:  # multi-client nodes: memory banks for this run only
            client_cfg = cfg.replace(memory_dir=stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmeta-memory-")))
        _run(cfg, client_cfg, box, verbose)
    if not box:
        raise RuntimeError("the simulation ended without results (see the log above)")
    return box


def _run(cfg: ExperimentConfig, client_cfg: ExperimentConfig, box: dict[str, Any], verbose: bool) -> None:
    import warnings

    from flwr.simulation import run_simulation

    from fedmeta.simulations.apps import build_client_app, build_server_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=build_server_app(cfg, sink=box.update),
            client_app=build_client_app(client_cfg),
            num_supernodes=cfg.num_supernodes,
            backend_name="ray",
            backend_config={
                "client_resources": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
                "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False},
            },
            verbose_logging=verbose,
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmeta-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--algorithms", default=f"{C.LOCAL_MOML},{C.PER_FEDAVG}", help="comma-separated algorithms to run")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    defaults = ExperimentConfig()
    for f in fields(ExperimentConfig):
        if f.name == "algorithm":
            continue
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        if isinstance(default, bool):  # --resume alone means --resume true
            p.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", metavar="BOOL", help=f"(default: {str(default).lower()})")
        else:
            p.add_argument(flag, dest=f.name, default=None, metavar=type(default).__name__.upper(), help=f"(default: {default!r})")
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
    for cfg in configs:  # every run's checkpoint, before the first run starts
        try:
            if cfg.checkpoint_path is not None:
                check_can_start(cfg.checkpoint_path, cfg.resume)
        except CheckpointError as err:
            print(f"fedmeta-sim: error: {err}", file=sys.stderr)
            return 2
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING, stream=sys.stdout)
    logger.setLevel(logging.INFO)
    rows = []
    for cfg in configs:
        mode = f"B={cfg.clients_per_round} of n={cfg.num_clients}" if cfg.clients_per_round else f"all n={cfg.num_clients}"
        print(f"== {cfg.algorithm} on {cfg.dataset} ({mode}, {cfg.num_rounds} rounds, H/tau={cfg.local_steps}, "
              f"K={cfg.batch_size}, meta-gradient={cfg.meta_gradient}, seed={cfg.seed})", flush=True)
        t0 = time.perf_counter()
        res = simulate(cfg, verbose=args.verbose)
        print(f"   done in {time.perf_counter() - t0:.1f} s (incl. Ray start-up), results: {res['path']}", flush=True)
        rows.append(res)
    print()
    print("Personalized accuracy (after fine-tuning on each client's train split, scored on its test split)")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
