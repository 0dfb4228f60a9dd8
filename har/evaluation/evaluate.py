"""Evaluate a trained run: one forward pass per split, then static and dynamic metrics from the cache.

Writes `eval/<split>.npz` (every exit's logits and the labels) and `eval/<split>.json` (static metrics,
every exit on its own, the dynamic sweep over s, the dynamic results at the chosen s, confidence histograms,
MACs table), the latter computed from the former alone (`har.evaluation.reports`), so `evaluate_from_cache`
rewrites the reports of a run under the current rules without its data or weights. How s, and tau-norm's tau, are
chosen without choosing on the reported images: `har.evaluation.selection`.
"""

from __future__ import annotations

import json
import logging
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from har.atomic import atomic_write, atomic_write_json
from har.config import RunConfig, config_hash, load_config, stored_config_hash
from har.data.batches import eval_batches
from har.data.build import ListSplit, RunData, Split, build_data
from har.errors import RunError
from har.evaluation import selection
from har.evaluation.flops import flops_table
from har.evaluation.reports import SPLITS, SplitOutputs, split_reports
from har.methods import decoupled
from har.models import MultiExitNet
from har.run import stage_one
from har.run.assembly import build_model, resolve_device
from har.run.checkpoint import resume_checkpoint
from har.run.folder import CHECKPOINT, CONFIG, EVAL_DIR, PREVIOUS
from har.run.lock import folder_lock, refuse_if_held
from har.run.machine import read_machines

log = logging.getLogger(__name__)



def input_size(cfg: RunConfig) -> tuple[int, int, int]:
    """The C x H x W of the images the model sees (32 x 32 for CIFAR, the crop size for image lists)."""
    side = cfg.data.image_size if cfg.data.is_list_dataset else 32
    return (3, side, side)


def load_run(run_dir: Path, device: torch.device) -> tuple[RunConfig, dict]:
    """The config and the final checkpoint of a completed run; refuses unfinished or mismatched runs.

    A folder whose `last.pt` is missing or unreadable but whose `prev.pt` holds the checkpoint (a job killed
    during its final save) gets `prev.pt` back as `last.pt`, as `har train` does.
    """
    cfg_path = run_dir / CONFIG
    if not cfg_path.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); train it first with har train")
    cfg = load_config(cfg_path)
    ckpt_path = run_dir / CHECKPOINT
    ckpt = resume_checkpoint(ckpt_path, run_dir / PREVIOUS, map_location=device)
    if ckpt is None:
        raise RunError(f"{run_dir} has no {CHECKPOINT}: training has not finished an epoch; run har train")
    if stored_config_hash(ckpt.get("config")) != config_hash(cfg):
        raise RunError(f"{ckpt_path} does not belong to {cfg_path} (config hash differs); train the run again")
    if ckpt["epoch"] + 1 != cfg.train.epochs:
        raise RunError(f"{run_dir} is incomplete: {ckpt['epoch'] + 1} of {cfg.train.epochs} epochs trained; "
                       f"run har train with the same --out to resume")
    return cfg, ckpt


@contextmanager
def _evaluation_folder(run_dir: Path) -> Iterator[Path]:
    """Lock `eval/` so that two evaluations of a run do not interleave, after checking that no trainer holds
    the run folder; remove the temporaries of an evaluation killed while writing."""
    if not (run_dir / CONFIG).exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); train it first with har train")
    refuse_if_held(run_dir, "har evaluate")
    with folder_lock(run_dir / EVAL_DIR, "evaluate", "evaluation folder") as lock:
        for stale in lock.folder.glob(".*.tmp"):  # har.atomic.atomic_write's temporary names
            log.info("removing %s, left by an evaluation killed while writing", stale)
            stale.unlink(missing_ok=True)
        yield lock.folder


@torch.no_grad()
def collect_logits(model: MultiExitNet, split: Split | ListSplit, cfg: RunConfig, device: torch.device) -> np.ndarray:
    """Every exit's logits for a split: float32 [exits, examples, classes]."""
    model.eval()
    chunks = [torch.stack(model(images)).float().cpu()
              for images in eval_batches(split, cfg.data, cfg.eval.batch_size, device)]
    return torch.cat(chunks, dim=1).numpy()


def crossfit_tau_norm(features: torch.Tensor, weight: torch.Tensor, labels: np.ndarray,
                      halves: tuple[np.ndarray, np.ndarray], taus: Sequence[float]) -> tuple[np.ndarray, dict]:
    """tau-norm's final-exit logits [examples, classes] with tau cross-fitted on `halves`, and `tau_selection`.

    The checkpoint's tau was chosen on val, which lacks CIFAR-LT's head class; here every candidate tau's
    bias-free logits come from stage one's classifier `weight` on the split's pooled `features`, tau is chosen on
    each half by top-1 (`selection.crossfit_tau`), and each half is scored with the tau chosen on the other.
    """
    weight = weight.to(features.device, torch.float32)
    predictions = decoupled.tau_predictions(features, weight, taus).cpu().numpy()
    record = selection.crossfit_tau(predictions, labels, taus, halves)
    final = np.empty((len(labels), weight.shape[0]), dtype=np.float32)
    for reported, tau in ((halves[1], record["taus"][0]), (halves[0], record["taus"][1])):
        rows = torch.from_numpy(reported).to(features.device)
        final[reported] = decoupled.tau_logits(features[rows], weight, tau).cpu().numpy()
    return final, record


def evaluate_run(run_dir: str | Path, device: str = "auto", data: RunData | None = None,
                 target_savings: Sequence[float] | None = None) -> dict[str, dict]:
    """Evaluate a completed run on its validation and test splits; return the two reports.

    `target_savings` (None: `eval.target_savings`) are the MACs savings at which s is chosen, each reported under
    both readings as `dynamic_selected["saving>=X"]` (heads counted) and `["saving_trunk>=X"]` (heads not counted)
    beside `"best"`; `har.evaluation.selection` says on which images.
    """
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    with _evaluation_folder(run_dir):
        return _evaluate_locked(run_dir, dev, data, target_savings)


def _evaluate_locked(run_dir: Path, dev: torch.device, data: RunData | None,
                     target_savings: Sequence[float] | None) -> dict[str, dict]:
    cfg, ckpt = load_run(run_dir, dev)
    if cfg.decouple.method != "none":  # a stage two of an earlier training of its stage one is refused
        stage_one.check_stage_one(cfg, run_dir)
    data = data or build_data(cfg.data)
    model = build_model(cfg, data.num_classes).to(dev)
    model.load_state_dict(ckpt["model"])
    # tau-norm's tau is cross-fitted on the test halves too; refused before anything is written if it cannot be
    tau_weight = (decoupled.stage_one_weight(ckpt, run_dir / CHECKPOINT)
                  if cfg.decouple.method == "tau_norm" and selection.protocol(cfg.data.dataset) == selection.CROSSFIT
                  else None)
    outputs = {}
    for split in SPLITS:
        part = data.split(split)
        logits = collect_logits(model, part, cfg, dev)
        tau_selection = None
        if split == "test" and tau_weight is not None:
            halves = selection.stratified_halves(part.labels, cfg.data.seed)
            features = decoupled.pooled_features(model, eval_batches(part, cfg.data, cfg.eval.batch_size, dev))
            logits[-1], tau_selection = crossfit_tau_norm(features, tau_weight, part.labels, halves,
                                                          cfg.decouple.taus)
        cached = outputs[split] = SplitOutputs(logits, part.labels, tau_selection)
        atomic_write(run_dir / EVAL_DIR / f"{split}.npz", lambda f, c=cached: np.savez_compressed(f, **c.arrays()))
    table = flops_table(model, image_size=input_size(cfg))
    targets = cfg.eval.target_savings if target_savings is None else tuple(target_savings)
    provenance = {split: data.provenance for split in SPLITS}
    return _write_reports(run_dir, cfg, outputs, table, data.class_counts, data.groups, targets, provenance)


def _write_reports(run_dir: Path, cfg: RunConfig, outputs: dict[str, SplitOutputs], table: dict,
                   class_counts: Sequence[int], groups: dict, targets: Sequence[float],
                   provenance: dict[str, object]) -> dict[str, dict]:
    """`eval/<split>.json` of each split from its cached outputs, with where the run's data and training came from."""
    reports = split_reports(cfg, outputs, table, class_counts, groups, targets)
    for split, report in reports.items():
        report["run"] = str(run_dir)
        if split in provenance:  # which files the run read: official or a copy, their hashes
            report["data_provenance"] = provenance[split]
        report["trained_on"] = read_machines(run_dir)  # each start's device, CPU flags and precision
        atomic_write_json(run_dir / EVAL_DIR / f"{split}.json", report)
    return reports


def evaluate_from_cache(run_dir: str | Path, target_savings: Sequence[float] | None = None) -> dict[str, dict]:
    """Rewrite a run's `eval/<split>.json` from its `eval/<split>.npz` under the current rules: no data, no weights.

    The MACs table comes from a model built from the run's config; class counts, shot groups and the data's
    provenance from the run's existing reports, which must have been computed for its config. `target_savings`
    (None: `eval.target_savings` and every target the existing test report chose s at).
    """
    run_dir = Path(run_dir)
    with _evaluation_folder(run_dir):
        cfg = load_config(run_dir / CONFIG)
        old = {split: _previous_report(run_dir, split, config_hash(cfg)) for split in SPLITS}
        outputs = {split: _cached_outputs(run_dir, split, old[split]) for split in SPLITS}
        num_classes = outputs["test"].logits.shape[2]
        table = flops_table(build_model(cfg, num_classes), image_size=input_size(cfg))
        for split, cached in outputs.items():
            if cached.logits.shape[0] != len(table["exits"]):
                raise RunError(f"{run_dir / EVAL_DIR / split}.npz holds {cached.logits.shape[0]} exits, the config's "
                               f"model {len(table['exits'])}; evaluate {run_dir} again with har evaluate --run")
        if target_savings is None:
            recorded = [key[1] for name in old["test"]["dynamic_selected"]
                        if (key := selection.parse_selection_key(name)) is not None]
            target_savings = list(dict.fromkeys([*cfg.eval.target_savings, *recorded]))
        provenance = {split: old[split]["data_provenance"] for split in SPLITS if "data_provenance" in old[split]}
        return _write_reports(run_dir, cfg, outputs, table, old["test"]["class_counts"], old["test"]["groups"],
                              target_savings, provenance)


def _previous_report(run_dir: Path, split: str, expected_hash: str) -> dict:
    """The run's existing `eval/<split>.json`, for what the cache does not hold (class counts, shot groups,
    provenance, the tau-norm record of older caches); refused unless it belongs to the run's config."""
    path = run_dir / EVAL_DIR / f"{split}.json"
    fix = f"evaluate {run_dir} with har evaluate --run (it needs the run's weights and data)"
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is missing or unreadable ({exc}): re-evaluating from the cache takes the class "
                       f"counts and shot groups from it; {fix}") from exc
    if not isinstance(report, dict) or any(k not in report for k in ("class_counts", "groups", "dynamic_selected")):
        raise RunError(f"{path} is not a complete evaluation report; {fix}")
    if report.get("config_sha256") != expected_hash:
        raise RunError(f"{path} was computed for another config than {run_dir / 'config.yaml'}, so its cache may be "
                       f"too; {fix}")
    return report


def _cached_outputs(run_dir: Path, split: str, previous: dict) -> SplitOutputs:
    """`eval/<split>.npz`, refused with the fix when missing or damaged."""
    path = run_dir / EVAL_DIR / f"{split}.npz"
    try:
        with np.load(path) as archive:
            logits, labels = archive["logits"], archive["labels"]
            tau = json.loads(str(archive["tau_selection"])) if "tau_selection" in archive.files else None
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise RunError(f"{path} is missing, truncated or corrupt ({type(exc).__name__}: {exc}); evaluate {run_dir} "
                       f"with har evaluate --run (it needs the run's weights and data)") from exc
    if logits.ndim != 3 or labels.shape != (logits.shape[1],):
        raise RunError(f"{path} holds logits of shape {logits.shape} and labels of shape {labels.shape}, not "
                       f"[exits, examples, classes] and [examples]; evaluate {run_dir} with har evaluate --run")
    return SplitOutputs(logits, labels, tau if tau is not None else previous.get("tau_selection"))
