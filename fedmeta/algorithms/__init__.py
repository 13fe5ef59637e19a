"""The algorithms, as units (:class:`~fedmeta.algorithms.base.Algorithm`), and the registry that maps
an algorithm's name to its unit.

Built in: ``fedavg`` (:mod:`~fedmeta.algorithms.fedavg`), ``per-fedavg``
(:mod:`~fedmeta.algorithms.per_fedavg`), ``local-moml`` (:mod:`~fedmeta.algorithms.local_moml`).
A user's own algorithm is one subclass of :class:`Algorithm` plus ``register(MyAlgorithm())``; the
clients then run it when a train config says ``algorithm = "<its name>"`` (docs/your-algorithm.md, "Add your own
algorithm"). Nothing else in fedmeta compares algorithm names.
"""

from __future__ import annotations

from fedmeta.algorithms.base import Algorithm, EstimatorConfig, MAMLAlgorithm, RoundCost
from fedmeta.algorithms.fedavg import FedAvg, FedAvgConfig
from fedmeta.algorithms.local_moml import LocalMOML, LocalMOMLConfig
from fedmeta.algorithms.per_fedavg import PerFedAvg, PerFedAvgConfig

REGISTRY: dict[str, Algorithm] = {}
"""Algorithm name -> its unit."""


def register(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Make ``algorithm`` runnable by name; returns it. Registering another unit under a taken name
    is an error unless ``replace``; registering the same unit again is a no-op."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register() takes an Algorithm instance, got {algorithm!r}")
    name = getattr(algorithm, "name", None)
    config = getattr(algorithm, "config", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(algorithm).__name__}.name must be a non-empty string, got {name!r}")
    if getattr(config, "algorithm", None) != name or not hasattr(config, "from_wire"):
        raise ValueError(f"{type(algorithm).__name__}.config must be a WireConfig whose `algorithm` is {name!r}, got {config!r}")
    old = REGISTRY.get(name)
    if old is not None and type(old) is not type(algorithm) and not replace:
        raise ValueError(f"algorithm {name!r} is already registered ({old!r}); pass replace=True to replace it")
    REGISTRY[name] = algorithm
    return algorithm


def unregister(name: str) -> Algorithm:
    """Remove the algorithm registered as ``name`` (e.g. a test's) and return it."""
    try:
        return REGISTRY.pop(name)
    except KeyError:
        raise ValueError(f"algorithm {name!r} is not registered (registered: {sorted(REGISTRY)})") from None


def get(name: str | Algorithm) -> Algorithm:
    """The unit registered as ``name`` (a unit is returned as is); a clear error for an unknown name."""
    if isinstance(name, Algorithm):
        return name
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"algorithm must be one of {sorted(REGISTRY)}, got {name!r}") from None


def for_config(hp: object) -> Algorithm:
    """The unit whose config ``hp`` is (by its ``algorithm`` name)."""
    return get(getattr(type(hp), "algorithm", None))


for _unit in (FedAvg(), PerFedAvg(), LocalMOML()):
    register(_unit)

__all__ = ["Algorithm", "EstimatorConfig", "FedAvg", "FedAvgConfig", "LocalMOML", "LocalMOMLConfig", "MAMLAlgorithm", "PerFedAvg",
           "PerFedAvgConfig", "REGISTRY", "RoundCost", "for_config", "get", "register", "unregister"]
