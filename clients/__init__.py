"""Client side of fedmeta: a stateful meta-learning client and its Flower ``ClientApp`` factory."""

from fedmeta.clients.app import fashion_mnist_data, make_client_app, sinewave_data
from fedmeta.clients.client import ContextMemory, MetaClient, select_device

__all__ = ["ContextMemory", "MetaClient", "fashion_mnist_data", "make_client_app", "select_device", "sinewave_data"]
