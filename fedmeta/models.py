"""The papers' models and a small CNN, as plain ``nn.Module`` s (used through ``torch.func.functional_call``).

Image models take ``[N, C, H, W]`` inputs; the MLPs flatten them first. No model has buffers
(no BatchNorm running statistics), so a model is fully described by its parameter dict.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

ImageShape = tuple[int, ...]


def mlp(sizes: tuple[int, ...], activation: type[nn.Module] = nn.ReLU, *, bias: bool = True) -> nn.Sequential:
    """``Flatten`` then a fully connected network ``sizes[0] -> ... -> sizes[-1]``."""
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must hold at least two positive layer widths, got {sizes}")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out, bias=bias))
    return nn.Sequential(*layers)


def mlp_40_40(input_shape: ImageShape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """d-40-40-C ReLU MLP (784-40-40-10 on MNIST-like data), localmoml Section 6.2."""
    return mlp((math.prod(input_shape), 40, 40, num_classes), nn.ReLU)


def moml_mlp_40_40(input_shape: ImageShape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """d-40-40-C ELU MLP without biases, Xavier-normal weights: the localmoml authors' federated model
    (GitHub ``bokun-wang/moml``, ``federated/models.py``: ``NeuralNetwork(hidden_size=[40, 40])``, as
    ``federated/train.py`` builds it)."""
    net = mlp((math.prod(input_shape), 40, 40, num_classes), nn.ELU, bias=False)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_normal_(layer.weight)
    return net


def mlp_100(input_shape: ImageShape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """d-100-C ReLU MLP (784-100-10 on MNIST-like data), PFLlib's ``DNN(1*28*28, 100)``.

    The model of PFLlib's Per-FedAvg (``-algo PerAvg -m DNN``) MNIST-family examples
    (``system/flcore/trainmodel/models.py``: ``fc1`` d-100, ReLU, ``fc`` 100-C). PFLlib ends
    with ``log_softmax``; this model returns logits, which gives the same cross-entropy loss
    and predictions (``log_softmax`` of log-probabilities is the identity).
    """
    return mlp((math.prod(input_shape), 100, num_classes), nn.ReLU)


def mlp_80_60_elu(input_shape: ImageShape = (1, 28, 28), num_classes: int = 10) -> nn.Sequential:
    """d-80-60-C ELU MLP (784-80-60-10 on MNIST-like data), per-fedavg.txt Section 5."""
    return mlp((math.prod(input_shape), 80, 60, num_classes), nn.ELU)


def sine_mlp(input_shape: ImageShape = (1,), num_classes: int = 1) -> nn.Sequential:
    """1-40-40-1 ReLU MLP, localmoml Section 6.1 (sinewave regression, after Finn et al. 2017)."""
    return mlp((math.prod(input_shape), 40, 40, num_classes), nn.ReLU)


def cnn(input_shape: ImageShape = (3, 32, 32), num_classes: int = 10) -> nn.Sequential:
    """A small conv net for CIFAR: 2 x [conv 5x5, ReLU, max-pool 2] (32, 64 channels), FC 128, FC C.

    The papers use MLPs; this is the usual small CIFAR baseline (as in McMahan et al. 2017). It
    has no BatchNorm, so second-order meta-gradients need no running statistics.
    """
    c, h, w = input_shape
    flat = 64 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )  # fmt: skip


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp-40-40": mlp_40_40,
    "moml-mlp-40-40": moml_mlp_40_40,
    "mlp-100": mlp_100,
    "mlp-80-60-elu": mlp_80_60_elu,
    "sine-mlp": sine_mlp,
    "cnn": cnn,
}


def build_model(name: str, input_shape: ImageShape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Construct a model by name for inputs of ``input_shape`` and ``num_classes`` outputs."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None
    return factory(input_shape, num_classes)
