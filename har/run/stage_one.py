"""The stage-one record of a decoupled stage two (`stage_one.json` in its folder): which training of which
stage-one folder it started from (config hash and final checkpoint's sha256), so that a stage one trained again
since is noticed before the stage two resumes or is evaluated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml

from har.atomic import atomic_write_json
from har.config import RunConfig, stored_config_hash
from har.digest import file_hexdigest
from har.errors import RunError
from har.run.folder import CHECKPOINT, CONFIG, PREVIOUS, STAGE_ONE_RECORD

log = logging.getLogger(__name__)


def require_trained(folder: Path) -> None:
    """Refuse a stage-one folder without its config and final checkpoint."""
    if not (folder / CONFIG).is_file() or not (folder / CHECKPOINT).is_file():
        raise RunError(f"decouple.stage_one {folder} is not a trained run folder (config.yaml and last.pt needed); "
                       f"train stage one there first")


def stage_one_identity(folder: str | Path) -> dict[str, str | None]:
    """What tells one training of a stage-one folder from another: its config hash and its final checkpoint's
    sha256 (the same config trained again on another device or version gives other weights)."""
    folder = Path(folder)
    require_trained(folder)
    stored = yaml.safe_load((folder / CONFIG).read_text())
    return {"folder": str(folder), "config_sha256": stored_config_hash(stored),
            "checkpoint_sha256": file_hexdigest(folder / CHECKPOINT, "sha256")}


def recorded_stage_one(out: str | Path) -> dict | None:
    """The stage one the stage-two folder ``out`` recorded when it started (None: nothing recorded)."""
    path = Path(out) / STAGE_ONE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def has_started(out: str | Path) -> bool:
    """Whether the stage-two folder ``out`` holds a checkpoint, i.e. has trained on some stage one."""
    return any((Path(out) / name).exists() for name in (CHECKPOINT, PREVIOUS))


def stage_one_change(cfg: RunConfig, out: str | Path) -> str | None:
    """How ``cfg``'s stage one now differs from the one the stage two in ``out`` recorded; None when it is the same
    or nothing was recorded."""
    recorded = recorded_stage_one(out)
    if recorded is None:
        return None
    now = stage_one_identity(cfg.decouple.stage_one)
    changed = [f"{key} {str(recorded.get(key))[:12]} -> {str(now[key])[:12]}"
               for key in ("config_sha256", "checkpoint_sha256") if recorded.get(key) != now[key]]
    return "; ".join(changed) or None


def tie_stage_one(cfg: RunConfig, out: Path) -> None:
    """Record the stage one of a fresh stage-two folder; refuse a started one whose stage one has changed since.

    A started folder without a record (written by an older har) cannot be checked: it is warned about and its
    current stage one recorded.
    """
    if not has_started(out):
        atomic_write_json(out / STAGE_ONE_RECORD, stage_one_identity(cfg.decouple.stage_one))
        return
    check_stage_one(cfg, out)
    if recorded_stage_one(out) is None:
        log.warning("%s records no stage one (an older har): cannot check that %s is the stage one it trained on; "
                    "recording it now", out, cfg.decouple.stage_one)
        atomic_write_json(out / STAGE_ONE_RECORD, stage_one_identity(cfg.decouple.stage_one))


def check_stage_one(cfg: RunConfig, out: str | Path) -> None:
    """Refuse to resume or evaluate the stage two in ``out`` when its stage one is not the one it started from.

    Raises:
        RunError: the stage one was trained again (or edited) since; names both folders and the fix.
    """
    change = stage_one_change(cfg, out)
    if change:
        raise RunError(f"{out} is a stage two of an earlier training of its stage one {cfg.decouple.stage_one} "
                       f"(changed since: {change}); delete {out} to train stage two on the current stage one, "
                       f"or restore the stage one it started from")
