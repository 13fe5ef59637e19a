"""The one place fedmeta starts Flower's simulation engine inside the calling process.

``flwr.simulation.run_simulation`` is deprecated in flwr 1.42 ("will be removed in a future
version"); Flower's supported path is ``flwr run`` against a local simulation SuperLink, which runs
the same ServerApp and ClientApp (``[tool.flwr.app]`` in pyproject.toml). Every in-process
simulation of fedmeta (``fedmeta-sim``, ``fedmeta-reproduce``, the tests, the benchmarks) goes
through :func:`run_on_ray`, and ``tests/test_flwr_run.py`` checks that ``flwr run .`` on a local
simulation SuperLink gives the same results as this function for the same experiment. When Flower
removes ``run_simulation``, this function is the only code to replace.

The engine hands a round's messages to its Ray workers from a loop that sleeps 100 ms between passes
(flwr 1.42, ``add_messages_to_queue`` in ``flwr/server/superlink/fleet/vce/vce_api.py``, not configurable), so a
round lasts at least until the next tick: rounds whose math takes under ~80 ms lock onto a 100 ms period, the
floor of ``make run``'s 1,000 rounds (bench/README.md, the default experiment). Fewer messages per round (the
default multi-client nodes) keep rounds within one tick.

Flower reports the deprecation through its logger (not Python's ``warnings``); fedmeta's command
line tools send Flower's log to the run's log file (``<results-dir>/logs/``), where it stays.
"""

from __future__ import annotations

import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def run_on_ray(server_app: ServerApp, client_app: ClientApp, *, num_supernodes: int, num_cpus: float = 1.0,
               num_gpus: float = 0.0, verbose: bool = False) -> None:
    """Run ``server_app`` (in a thread of this process) against ``num_supernodes`` virtual SuperNodes
    running ``client_app`` in Ray actors (``num_cpus`` / ``num_gpus`` each); an exception of the
    ServerApp is re-raised here."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
            "init_args": {"logging_level": "ERROR", "log_to_driver": verbose, "include_dashboard": False},
        },
        verbose_logging=verbose,
    )


__all__ = ["run_on_ray"]
