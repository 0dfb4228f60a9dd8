"""A run folder: the names of its files (the one place that spells them) and its metrics history.

Folders written by earlier versions are read with the same names, so none of these may change.
"""

from __future__ import annotations

import json
from pathlib import Path

from har.atomic import atomic_write_text

CONFIG = "config.yaml"  # the resolved config, every field spelled out
CONFIG_HASH = "config.sha256"  # its hash (`har.config.config_hash`), for a glance; comparisons re-hash CONFIG
METRICS = "metrics.jsonl"  # one row per finished epoch
CHECKPOINT = "last.pt"  # the newest checkpoint
PREVIOUS = "prev.pt"  # the one before, kept while the newest is written
MACHINE = "machine.jsonl"  # one record per start of training: the machine and what the config resolved to
LOCK = ".har.lock"  # held by the process that writes the folder (`har.run.lock`)
STAGE_ONE_RECORD = "stage_one.json"  # a decoupled stage two: which stage one it started from
TRAIN_RECORD = "train.json"  # the pipeline's marker of a finished training
TRAIN_ERROR = "train.error"  # a member stopped inside a pack: its error, for whoever reads the folder
SNAPSHOT_DIR = "snapshots"  # epoch<N>.pt: the checkpoint after epoch N, for each N in train.keep_epochs
EVAL_DIR = "eval"  # evaluation: <split>.json reports and <split>.npz confidences


def snapshot_path(out: Path, epochs_done: int) -> Path:
    """Where the checkpoint after `epochs_done` epochs (counted from 1) is kept, when `train.keep_epochs` asks."""
    return out / SNAPSHOT_DIR / f"epoch{epochs_done}.pt"


def read_history(out: Path, before_epoch: int | None = None) -> list[dict]:
    """The metrics rows of a run folder (those before `before_epoch` when given; none when there is no file)."""
    path = out / METRICS
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if before_epoch is None or r["epoch"] < before_epoch]


def write_history(out: Path, history: list[dict]) -> None:
    """Rewrite the folder's metrics rows (before the epoch's checkpoint: rows past it are dropped on resume)."""
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))
