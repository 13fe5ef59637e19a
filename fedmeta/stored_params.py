"""What every memory store checks a stored personalized model u against: its spec (names, shapes, dtypes) and
digest, and the error for a stored u that cannot be used (:mod:`fedmeta.clients.memory`, :mod:`fedmeta.memory_bank`)."""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import Tensor

ParamSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
"""Parameter name -> (shape, dtype): what a stored u must look like to fit the model."""


class MemoryFileError(ValueError):
    """A memory file that cannot be used: unreadable, foreign, or not matching the model."""


def params_digest(params: Mapping[str, Tensor]) -> int:
    """A digest of a parameter dict that fits in an int64 MetricRecord value (60 bits of SHA-256).

    It covers every tensor's name, dtype, shape and bytes, in sorted name order, so equal digests
    mean bit-identical parameters whatever device they sit on.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int(h.hexdigest()[:15], 16)


def param_spec(params: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in params.items()}


def spec_mismatch(params: Mapping[str, Tensor], expected: ParamSpec) -> str | None:
    """Why ``params`` does not fit ``expected`` (names, then shapes and dtypes), or ``None`` if it does."""
    if set(params) != set(expected):
        return f"parameters {sorted(params)} do not match the model's {sorted(expected)}"
    for k, (shape, dtype) in expected.items():
        got = (tuple(params[k].shape), params[k].dtype)
        if got != (tuple(shape), dtype):
            return f"parameter {k!r} has shape {got[0]} and dtype {got[1]}, the model expects {tuple(shape)} and {dtype}"
    return None


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``float32``), or a ``ValueError``."""
    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype
