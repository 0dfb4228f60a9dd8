"""Preparing a run folder for training: its resolved config and hash written (or checked against the folder's),
the temporaries of a killed job removed, and the folder owned by one process (its lock) for the whole run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml

from har.atomic import atomic_write_text
from har.config import RunConfig, config_diff, config_hash, dump_config, stored_config_hash, to_dict
from har.errors import ConfigError, DataError, RunError
from har.run.checkpoint import resume_checkpoint
from har.run.folder import CHECKPOINT, CONFIG, CONFIG_HASH, MACHINE, METRICS, PREVIOUS, SNAPSHOT_DIR
from har.run.lock import folder_lock

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: RunConfig, out: Path) -> bool:
    """Write the resolved config and its hash, or check they match the folder's; remove the temporaries of a
    job killed while writing (the caller holds the folder's lock). True when this call wrote a new config.yaml.

    Files already holding what would be written are left untouched, so a finished run in a read-only folder
    can be asked again (and a folder's files keep their dates).
    """
    out.mkdir(parents=True, exist_ok=True)
    names = (CONFIG, CONFIG_HASH, METRICS, CHECKPOINT, PREVIOUS, MACHINE)
    stale_files = [*(stale for name in names for stale in out.glob(f".{name}.*.tmp")),  # atomic_write's temporaries
                   *(out / SNAPSHOT_DIR).glob(".*.tmp")]
    for stale in stale_files:
        log.info("removing %s, left by a job killed while writing it", stale)
        try:
            stale.unlink(missing_ok=True)
        except OSError as exc:  # a read-only folder: harmless, nothing reads temporaries
            log.warning("could not remove %s (%s)", stale, exc.strerror)
    digest = config_hash(cfg)
    cfg_path = out / CONFIG
    try:
        old_text = cfg_path.read_text() if cfg_path.exists() else None
        old = None if old_text is None else yaml.safe_load(old_text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"{cfg_path} is unreadable ({exc}); delete {out} or choose another --out") from exc
    if old is not None and stored_config_hash(old) != digest:
        diff = "\n  ".join(config_diff(old, to_dict(cfg))) if isinstance(old, dict) else ""
        diff = diff or "(none in the values: the folder's config.yaml is not a valid config for this version)"
        raise RunError(f"{out} holds a run of another config; choose another --out or delete the folder. "
                       f"Differences (folder -> asked):\n  {diff}")
    _write_if_changed(cfg_path, dump_config(cfg), old_text)
    _write_if_changed(out / CONFIG_HASH, digest + "\n")
    return old_text is None


def _write_if_changed(path: Path, text: str, current: str | None = None) -> None:
    """Replace `path` with `text` unless it holds it already (`current`: its text, when already read)."""
    if current is None and path.exists():
        try:
            current = path.read_text()
        except (OSError, UnicodeDecodeError):
            current = None  # rewritten below
    if current != text:
        atomic_write_text(path, text)


@contextmanager
def owned_run_dir(cfg: RunConfig, out: Path, is_main: bool = True) -> Iterator[None]:
    """The main process (`is_main`: rank 0 of a distributed run) locks the run folder for the whole run and
    prepares it; a refused input (a named error before the first checkpoint) leaves no folder or config.yaml behind
    that this call created, so the corrected command then runs on the same --out.

    A folder this process may not write (no lock file could be created) is used unlocked when its run is
    finished (nothing is written); otherwise it is refused before any training.
    """
    if not is_main:
        yield
        return
    existed, undone = out.exists(), False
    try:
        with folder_lock(out, "train", "run folder (--out)", read_only_ok=True) as lock:
            if not lock.held:
                _refuse_unfinished_read_only(cfg, out, lock.read_only)
            created = prepare_run_dir(cfg, out)
            try:
                yield
            except (ConfigError, DataError, RunError):
                undone = created and not (out / CHECKPOINT).exists() and not (out / PREVIOUS).exists()
                if undone:
                    for name in (CONFIG, CONFIG_HASH, METRICS):
                        (out / name).unlink(missing_ok=True)
                    log.info("removed the config this run wrote in %s: it stopped before its first checkpoint", out)
                raise
    finally:
        if undone and not existed:
            with suppress(OSError):  # only when empty: a file someone else put there stays
                out.rmdir()


def _refuse_unfinished_read_only(cfg: RunConfig, out: Path, why: str) -> None:
    """A folder that cannot be written can only be read: a finished run passes, anything else is refused."""
    ckpt = resume_checkpoint(out / CHECKPOINT, out / PREVIOUS)
    done = 0 if ckpt is None else ckpt["epoch"] + 1
    if ckpt is None or ckpt.get("partial") is not None or done < cfg.train.epochs:
        raise RunError(f"{out} cannot be written ({why}) and its run is not finished ({done} of {cfg.train.epochs} "
                       f"epochs): make the folder writable, or choose another --out")
