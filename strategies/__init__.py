"""Server side of fedmeta: Flower Message-API strategies (subclasses of ``flwr.serverapp.strategy.FedAvg``)."""

from fedmeta.strategies.base import MetaStrategy
from fedmeta.strategies.dif_maml import DifMAML
from fedmeta.strategies.fedavg import FedAvg
from fedmeta.strategies.local_moml import LocalMOML
from fedmeta.strategies.per_fedavg import PerFedAvg
from fedmeta.strategies.failures import TrainingStopped
from fedmeta.strategies.rounds import start

__all__ = ["DifMAML", "FedAvg", "LocalMOML", "MetaStrategy", "PerFedAvg", "TrainingStopped", "start"]
