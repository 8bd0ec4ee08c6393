"""Checkpoints: plain dicts of tensors and numbers, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "FORMAT", "load_checkpoint", "save_checkpoint"]

FORMAT = "deepres-checkpoint-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepres checkpoint (format {FORMAT})")
    return state
