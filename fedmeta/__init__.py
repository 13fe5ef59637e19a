"""fedmeta: federated meta-learning (Per-FedAvg, LocalMOML) on Flower.

Subpackages: ``fedmeta.strategies`` (server side), ``fedmeta.clients`` (ClientApps),
``fedmeta.simulations`` (runnable experiments). The modules directly in ``fedmeta`` hold the
math, data and models and never import Flower.
"""

__version__ = "0.1.0"
