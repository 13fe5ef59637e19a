"""fedmeta: federated meta-learning (Per-FedAvg, LocalMOML) on Flower.

Subpackages: ``fedmeta.algorithms`` (each algorithm as one unit, the registry and the executor of
local rounds), ``fedmeta.strategies`` (server side), ``fedmeta.clients`` (ClientApps),
``fedmeta.simulations`` (runnable experiments). ``fedmeta.algorithms`` and the modules directly in
``fedmeta`` hold the math, data and models and never import Flower.
"""

__version__ = "0.1.0"
