"""Checkpoints written in one step, the one before kept, and read back with clear errors.

`atomic_save(..., keep_previous=prev)` moves the checkpoint it replaces to `prev` before writing the new one,
so a run folder holds two: `resume_checkpoint` falls back to the older when the newer cannot be read (a disk
or file-system fault after the write) or is missing (the job was killed between the move and the write).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from har.atomic import atomic_write, write_failure
from har.config import RunConfig, config_hash, stored_config_hash, to_dict
from har.errors import RunError
from har.run.folder import CHECKPOINT, PREVIOUS

log = logging.getLogger(__name__)



def atomic_save(obj: Any, path: Path, keep_previous: Path | None = None) -> None:
    """`torch.save` in one step; with `keep_previous`, the checkpoint at `path` is first moved there."""
    path = Path(path)
    if keep_previous is not None and path.exists():
        _move(path, keep_previous)
    atomic_write(path, lambda f: torch.save(obj, f))


def _move(source: Path, target: Path) -> None:
    """Rename a checkpoint, with a one-line RunError when the folder refuses (read-only, failing disk)."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise write_failure(target, exc, f"move {source.name} to") from exc


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


def _try_load(path: Path, map_location: str | torch.device) -> tuple[dict[str, Any] | None, str]:
    """The checkpoint at `path`, or None and why not."""
    if not path.exists():
        return None, f"{path} is missing"
    try:
        return load_checkpoint(path, map_location), ""
    except RunError as exc:
        return None, str(exc).rsplit("; ", 1)[0]  # without the advice, which differs with two files


def resume_checkpoint(path: Path, previous: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest readable of `path` and `previous` (None when neither exists: a fresh run).

    When `previous` is used, it is moved back to `path` (over an unreadable one), so that the folder looks as
    if the failed save had never started: the next save keeps it as `previous` again, and a run that was
    complete has its final `path` for evaluation.
    """
    path, previous = Path(path), Path(previous)
    if not path.exists() and not previous.exists():
        return None
    ckpt, newest = _try_load(path, map_location)
    if ckpt is not None:
        return ckpt
    ckpt, older = _try_load(previous, map_location)
    if ckpt is None:
        raise RunError(f"no usable checkpoint: {newest}, and {older}. Delete {path.name} and {previous.name} "
                       f"(in {path.parent}) to train this run from scratch, or choose another --out")
    _move(previous, path)
    log.warning("%s; resuming from %s (moved to %s)", newest, previous, path.name)
    return ckpt


def checkpoint_state(cfg: RunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epoch_done: int, progress: dict | None,
                     rng: dict[str, Any]) -> dict[str, Any]:
    """What `last.pt` holds: model, optimiser, schedule, the last finished epoch, a mid-epoch progress (or None),
    the RNG states and the config with its hash."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch_done, "partial": progress, "rng": rng, "config_sha256": config_hash(cfg),
            "config": to_dict(cfg)}


def restore(cfg: RunConfig, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler,
            device: torch.device) -> tuple[int, dict | None, dict[str, Any] | None]:
    """Load the folder's newest readable checkpoint into the run's modules: (the next epoch, the mid-epoch progress,
    the saved RNG states), or (0, None, None) for a fresh run. A checkpoint of another config is refused."""
    ckpt = resume_checkpoint(out / CHECKPOINT, out / PREVIOUS, map_location=device)
    if ckpt is None:
        return 0, None, None
    if stored_config_hash(ckpt.get("config")) != config_hash(cfg):
        raise RunError(f"{out / CHECKPOINT} was written by another config; delete it or choose another --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    start, partial = ckpt["epoch"] + 1, ckpt.get("partial")
    where = f"at step {partial['step']} of" if partial else "before"
    log.info("resuming %s %s epoch %d (0-based) of %d", out, where, start, cfg.train.epochs)
    return start, partial, ckpt["rng"]
