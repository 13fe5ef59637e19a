"""The papers' models, as plain ``nn.Module`` s (used through ``torch.func.functional_call``)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def mlp(sizes: tuple[int, ...], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers."""
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must hold at least two positive layer widths, got {sizes}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def mlp_40_40() -> nn.Sequential:
    """784-40-40-10 ReLU MLP, localmoml Section 6.2 (image classification)."""
    return mlp((784, 40, 40, 10), nn.ReLU)


def mlp_80_60_elu() -> nn.Sequential:
    """784-80-60-10 ELU MLP, per-fedavg.txt Section 5."""
    return mlp((784, 80, 60, 10), nn.ELU)


def sine_mlp() -> nn.Sequential:
    """1-40-40-1 ReLU MLP, localmoml Section 6.1 (sinewave regression, after Finn et al. 2017)."""
    return mlp((1, 40, 40, 1), nn.ReLU)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp-40-40": mlp_40_40,
    "mlp-80-60-elu": mlp_80_60_elu,
    "sine-mlp": sine_mlp,
}


def build_model(name: str) -> nn.Module:
    """Construct a model by name; ``ValueError`` lists the allowed names."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None
