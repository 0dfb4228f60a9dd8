"""The stage one of a decoupled stage two (`har.methods.decoupled`), as run folders hold it: its record
(`stage_one.json` in the stage-two folder: which training of which stage-one folder it started from, by config hash
and final checkpoint's sha256, so that a stage one trained again since is noticed before the stage two resumes or is
evaluated), and the loading of its weights, refused when its model or training data differ from the stage two's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from har.atomic import atomic_write_json
from har.config import RunConfig, load_config, stored_config_hash
from har.digest import file_hexdigest
from har.errors import RunError
from har.methods.decoupled import LearnedScales
from har.models import MultiExitNet
from har.run.checkpoint import load_checkpoint
from har.run.folder import CHECKPOINT, CONFIG, PREVIOUS, STAGE_ONE_RECORD

log = logging.getLogger(__name__)

# Stage-one fields that must match the stage-two config: same model, same training data.
MATCHING = {"model": ("name", "layout", "exit_channels", "exit_stride"),
            "data": ("dataset", "ratio", "seed", "val_per_class", "train_fraction")}


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


def load_stage_one(cfg: RunConfig, model: MultiExitNet, device: torch.device, out: Path | None = None) -> None:
    """Load the stage-one weights of ``cfg.decouple.stage_one`` into ``model``; with ``out`` (the stage-two folder),
    tie it to this stage one first (`tie_stage_one`).

    Raises:
        RunError: the folder is not a finished run, its model or training data differ from this config's, or it
            is not the stage one that the stage two in ``out`` started from.
    """
    folder = Path(cfg.decouple.stage_one)
    require_trained(folder)
    cfg_path, ckpt_path = folder / CONFIG, folder / CHECKPOINT
    first = load_config(cfg_path)
    if first.decouple.method != "none":
        raise RunError(f"decouple.stage_one {folder} is itself a stage-two run; point it at a plain run")
    wrong = [f"{section}.{key}: stage one {getattr(getattr(first, section), key)!r}, here "
             f"{getattr(getattr(cfg, section), key)!r}"
             for section, keys in MATCHING.items() for key in keys
             if getattr(getattr(first, section), key) != getattr(getattr(cfg, section), key)]
    if first.classifier != cfg.classifier:
        wrong.append(f"classifier: stage one {first.classifier!r}, here {cfg.classifier!r}")
    if wrong:
        raise RunError(f"decouple.stage_one {folder} was trained on another model or data: {'; '.join(wrong)}")
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    if ckpt["epoch"] + 1 != first.train.epochs or ckpt.get("partial"):
        raise RunError(f"decouple.stage_one {folder} is unfinished ({ckpt['epoch'] + 1} of {first.train.epochs} "
                       f"epochs); finish it with har train first")
    if out is not None:
        tie_stage_one(cfg, Path(out))
    wrapper = model.backbone.classifier if isinstance(model.backbone.classifier, LearnedScales) else None
    if wrapper is not None:  # stage one's weights belong to the wrapped classifier
        model.backbone.classifier = wrapper.classifier
    model.load_state_dict(ckpt["model"])
    if wrapper is not None:
        model.backbone.classifier = wrapper
