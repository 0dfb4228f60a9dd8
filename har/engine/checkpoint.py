"""Checkpoints written in one step and read back with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from har.atomic import atomic_write


class RunError(RuntimeError):
    """A run folder cannot be used as asked (another config, incomplete training, unreadable checkpoint)."""


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` in one step."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save`, with a clear error if it is unreadable."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise RunError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}: {exc}); "
                       f"delete it to train from scratch") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise RunError(f"checkpoint {path} is not a har checkpoint (no model / epoch); delete it or choose "
                       f"another run folder")
    return ckpt
