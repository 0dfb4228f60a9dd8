"""Atomic writes and checkpoints, so that a killed job never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class RunError(RuntimeError):
    """A run folder cannot be used as asked (another config, incomplete training, unreadable checkpoint)."""


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write through `write(file)` to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as indented JSON in one step."""
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


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
