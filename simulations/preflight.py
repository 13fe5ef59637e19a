"""Check an experiment's inputs in the driver process, before Ray starts or a message is sent.

Every entry point (``fedmeta-sim``, ``fedmeta-reproduce``, the ``flwr run .`` ServerApp,
:class:`~fedmeta.simulations.deploy.LocalDeployment`) calls :func:`check_inputs` first. It resolves
the data set, builds client 0's data exactly as a ClientApp would, and runs the model on one batch
of it, so a missing or corrupt data set, an unreadable data directory or a model that does not fit
the data's shape is one line naming the setting and the fix, within seconds, instead of an error in
every client of every round.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import torch

from fedmeta import data as D
from fedmeta.simulations.config import ExperimentConfig


class InputError(ValueError):
    """An experiment input that cannot work; the message is one line: the setting, the cause, the fix."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _data_dir(cfg: ExperimentConfig) -> str:
    return cfg.data_dir or os.environ.get("FEDMETA_DATA") or os.environ.get("FEDMETA_CACHE") or str(Path.home() / ".cache" / "fedmeta")


def _check_data_dir(cfg: ExperimentConfig) -> None:
    """The directory the data is read from (or unpacked into) must be a readable directory, if it exists."""
    where = cfg.data_dir or os.environ.get("FEDMETA_DATA")
    if not where:
        return
    key = "data-dir" if cfg.data_dir else "FEDMETA_DATA"
    path = Path(where).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{key}: {path} is not a directory; point {key} at the directory that holds the data set")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise InputError(f"{key}: {path} is not readable by this user; fix its permissions (chmod) or choose another directory")


def check_inputs(cfg: ExperimentConfig) -> str:
    """Raise :class:`InputError` (one line) unless ``cfg``'s data and model can run; return a short
    description of what was checked (e.g. ``fashion-mnist in /root/.cache/fedmeta: client 0 has
    340 train / 170 test samples; mlp-40-40 fits``).

    Checks, in order: the data directory; the data set's files (found, unpacked from the system
    package's ``.gz`` files, or downloaded when ``download`` is set); client 0's data as the clients
    build it (which reads every file and checks the partition fits the data); one forward pass and
    loss of the model on two of client 0's training samples.
    """
    _check_data_dir(cfg)
    where = ""
    if cfg.dataset != "sinewave":
        try:
            root = D.locate_dataset(cfg.dataset, cfg.data_dir or None, cfg.download)
        except FileNotFoundError as err:
            raise InputError(f"dataset: {_one_line(err)}") from None
        except PermissionError as err:
            raise InputError(f"data-dir: cannot read or unpack the {cfg.dataset} files ({_one_line(err)}); fix the "
                             f"permissions or set data-dir / FEDMETA_DATA to a writable directory") from None
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile, RuntimeError) as err:
            raise InputError(f"dataset: the {cfg.dataset} files found for {_data_dir(cfg)} are corrupt or incomplete "
                             f"({_one_line(err)}); delete them and provide them again (see docs/getting-started.md, Data)") from None
        where = f" in {root}"
    try:
        client = D.client_data(cfg.dataset, 0, **cfg.data_kwargs())
    except (FileNotFoundError, PermissionError) as err:
        raise InputError(f"dataset: {_one_line(err)}") from None
    except ValueError as err:  # the partition does not fit the data (names the parameter), or bad files
        raise InputError(f"dataset: {cfg.dataset}{where}: {_one_line(err)}") from None
    except (OSError, EOFError, RuntimeError, zlib.error) as err:
        raise InputError(f"dataset: the {cfg.dataset} files{where} are corrupt or incomplete ({_one_line(err)}); "
                         f"delete them and provide them again (see docs/getting-started.md, Data)") from None
    x, y = client.x_train[:2], client.y_train[:2]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model = cfg.build_model()
            loss = cfg.criterion(model(x), y)
        if loss.dim() != 0:
            raise ValueError(f"the loss is not a scalar (shape {tuple(loss.shape)})")
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise InputError(f"model: {cfg.model_name!r} does not fit dataset {cfg.dataset!r} (inputs {tuple(x.shape[1:])}, "
                         f"{cfg.num_classes} outputs): {_one_line(err)}; choose another model (--model)") from None
    return (f"{cfg.dataset}{where}: client 0 has {client.num_train} train / {len(client.y_test)} test samples; "
            f"{cfg.model_name} fits")


__all__ = ["InputError", "check_inputs"]
