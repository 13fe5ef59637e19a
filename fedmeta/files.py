"""File-system helpers shared by the client memory stores and the server checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, which makes the renames and creations inside it durable (without it a
    power cut can bring back the file a rename replaced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
