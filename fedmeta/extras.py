"""fedmeta's optional packages: which extra installs each, and the one error when one is missing.

The base install needs none of them. Code that uses one imports it through :func:`need`, which returns the module or
raises :class:`MissingExtra` with one line naming what needs it and the extra to install: without Optuna,
``need("tune", "fedmeta-tune")`` raises ``fedmeta-tune needs Optuna: pip install 'fedmeta[tune]'``. The command
lines call it (or a function that does) before any work and print that line with exit status 2. :data:`EXTRAS` is
the one table of the extras; pyproject's ``[project.optional-dependencies]`` declares the same names. No Flower
import here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "TensorBoard"),
    "wandb": ("wandb", "Weights & Biases"),
    "tune": ("optuna", "Optuna"),
    "flwr-datasets": ("flwr_datasets", "Flower Datasets"),
}
"""Extra (``pip install 'fedmeta[<extra>]'``) -> (the module it makes importable, the package's name for people)."""


class MissingExtra(ImportError):
    """An optional package is not installed; the message is one line naming the extra to install."""


def need(extra: str, what: str, module: str | None = None) -> ModuleType:
    """Import ``module`` (default: the import name of ``extra`` in :data:`EXTRAS`, e.g. a submodule
    ``flwr_datasets.partitioner`` otherwise), or raise :class:`MissingExtra`:
    ``<what> needs <package>: pip install 'fedmeta[<extra>]'``."""
    default, name = EXTRAS[extra]
    try:
        return importlib.import_module(module or default)
    except ImportError:
        raise MissingExtra(f"{what} needs {name}: pip install 'fedmeta[{extra}]'") from None


__all__ = ["EXTRAS", "MissingExtra", "need"]
