"""Client side of fedmeta: a stateful meta-learning client, its memory stores and its Flower ``ClientApp`` factory."""

from fedmeta.clients.app import fashion_mnist_data, flwr_datasets_data, make_client_app, sinewave_data
from fedmeta.clients.dif_maml import make_dif_maml_client_app
from fedmeta.clients.client import MetaClient, select_device
from fedmeta.clients.records import CLIENT_INFO, evaluate_config, train_config
from fedmeta.clients.memory import ContextMemory, DiskMemory, MemoryFileError, file_digest, params_digest

__all__ = [
    "CLIENT_INFO",
    "ContextMemory",
    "DiskMemory",
    "evaluate_config",
    "MemoryFileError",
    "MetaClient",
    "fashion_mnist_data",
    "file_digest",
    "flwr_datasets_data",
    "make_client_app",
    "make_dif_maml_client_app",
    "params_digest",
    "select_device",
    "sinewave_data",
    "train_config",
]
