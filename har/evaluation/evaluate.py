"""Evaluate a trained run: one forward pass per split, then static and dynamic metrics from the cache.

Writes `eval/<split>.npz` (every exit's logits and the labels) and `eval/<split>.json` (static metrics,
every exit on its own, the dynamic sweep over s, the dynamic results at the chosen s, confidence histograms,
MACs table). How s, and tau-norm's tau, are chosen without choosing on the reported images:
`har.evaluation.selection`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from har.atomic import atomic_write, atomic_write_json
from har.config import RunConfig, config_hash, from_dict, stored_config_hash
from har.data.batches import eval_batches
from har.data.build import ListSplit, RunData, Split, build_data
from har.engine.assembly import CHECKPOINT, PREVIOUS, build_model, resolve_device
from har.engine.checkpoint import RunError, resume_checkpoint
from har.engine.hardware import read_machines
from har.engine.lock import folder_lock, refuse_if_held
from har.evaluation import selection
from har.evaluation.dynamic import default_exit_thresholds, exit_outcomes, softmax, sweep_results
from har.evaluation.flops import flops_table
from har.evaluation.metrics import classification_summary, confusion_matrix
from har.methods import decoupled
from har.models import MultiExitNet

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


def input_size(cfg: RunConfig) -> tuple[int, int, int]:
    """The C x H x W of the images the model sees (32 x 32 for CIFAR, the crop size for image lists)."""
    side = cfg.data.image_size if cfg.data.is_list_dataset else 32
    return (3, side, side)


def load_run(run_dir: Path, device: torch.device) -> tuple[RunConfig, dict]:
    """The config and the final checkpoint of a completed run; refuses unfinished or mismatched runs.

    A folder whose `last.pt` is missing or unreadable but whose `prev.pt` holds the checkpoint (a job killed
    during its final save) gets `prev.pt` back as `last.pt`, as `har train` does.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunError(f"{run_dir} is not a run folder (no config.yaml); train it first with har train")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
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
    if not (run_dir / "config.yaml").exists():
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


def confidence_histograms(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[list[list[int]]]:
    """Per exit, per class: histogram of the true-class probability over [0, 1] (the paper's Fig. 3)."""
    num_exits, _, num_classes = probs.shape
    true_prob = probs[:, np.arange(len(labels)), labels]
    edges = np.linspace(0.0, 1.0, bins + 1)
    return [[np.histogram(true_prob[k, labels == c], bins=edges)[0].tolist() for c in range(num_classes)]
            for k in range(num_exits)]


def split_report(probs: np.ndarray, labels: np.ndarray, data: RunData, table: dict,
                 exit_thresholds: Sequence[float], bins: int) -> dict:
    """Static, per-exit and dynamic-sweep metrics of one split from its softmax probabilities."""
    exit_macs = [e["cumulative_macs"] for e in table["exits"]]
    num_classes = data.num_classes
    static_pred = probs[-1].argmax(1)
    static = classification_summary(labels, static_pred, num_classes, data.groups)
    static.update(macs=table["backbone_macs"], confusion=confusion_matrix(labels, static_pred, num_classes).tolist())
    exits = [dict(classification_summary(labels, probs[k].argmax(1), num_classes, data.groups),
                  macs_to_here=exit_macs[k]) for k in range(len(exit_macs))]
    confidence, predictions = exit_outcomes(probs)
    sweep = sweep_results(confidence, predictions, labels, num_classes, exit_thresholds, exit_macs,
                          table["backbone_macs"], data.groups)
    return {"num_examples": int(len(labels)), "static": static, "exits": exits, "dynamic_sweep": sweep,
            "confidence_histograms": confidence_histograms(probs, labels, bins), "histogram_bins": bins}


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

    `target_savings` (None: `eval.target_savings`) are the MACs savings at which s is chosen, each reported as
    `dynamic_selected["saving>=X"]` beside `"best"`; `har.evaluation.selection` says on which images.
    """
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    with _evaluation_folder(run_dir):
        return _evaluate_locked(run_dir, dev, data, target_savings)


def _evaluate_locked(run_dir: Path, dev: torch.device, data: RunData | None,
                     target_savings: Sequence[float] | None) -> dict[str, dict]:
    cfg, ckpt = load_run(run_dir, dev)
    if cfg.decouple.method != "none":  # a stage two of an earlier training of its stage one is refused
        decoupled.check_stage_one(cfg, run_dir)
    data = data or build_data(cfg.data)
    model = build_model(cfg, data.num_classes).to(dev)
    model.load_state_dict(ckpt["model"])
    table = flops_table(model, image_size=input_size(cfg))
    exit_macs = [e["cumulative_macs"] for e in table["exits"]]
    thresholds = cfg.eval.exit_thresholds or default_exit_thresholds(data.num_classes, cfg.classifier)
    targets = cfg.eval.target_savings if target_savings is None else tuple(target_savings)
    test_protocol = selection.protocol(cfg.data.dataset)
    # tau-norm's tau is cross-fitted on the test halves too; refused before anything is written if it cannot be
    tau_weight = (decoupled.stage_one_weight(ckpt, run_dir / CHECKPOINT)
                  if cfg.decouple.method == "tau_norm" and test_protocol == selection.CROSSFIT else None)
    reports: dict[str, dict] = {}
    chosen_on_val: dict[str, float] = {}
    for split in ("val", "test"):  # val first: under the val protocol it chooses s for the test split
        part = data.split(split)
        logits = collect_logits(model, part, cfg, dev)
        halves = selection.stratified_halves(part.labels, cfg.data.seed)
        tau_selection = None
        if split == "test" and tau_weight is not None:
            features = decoupled.pooled_features(model, eval_batches(part, cfg.data, cfg.eval.batch_size, dev))
            logits[-1], tau_selection = crossfit_tau_norm(features, tau_weight, part.labels, halves,
                                                          cfg.decouple.taus)
        atomic_write(run_dir / "eval" / f"{split}.npz",
                     lambda f: np.savez_compressed(f, logits=logits, labels=part.labels))
        probs = softmax(logits)
        report = split_report(probs, part.labels, data, table, thresholds, cfg.eval.histogram_bins)
        if tau_selection is not None:
            report["tau_selection"] = tau_selection
        if split == "val":
            chosen_on_val = selection.choose_all(report["dynamic_sweep"], targets)
        if split == "test" and test_protocol == selection.VAL:
            selected = selection.chosen_elsewhere_selected(probs, part.labels, chosen_on_val, exit_macs,
                                                           table["backbone_macs"], data.groups)
        else:  # the validation report is cross-fitted on its own halves, for comparison
            name = selection.CROSSFIT if split == "test" else f"crossfit-{split}-halves"
            selected = selection.crossfit_selected(probs, part.labels, halves, thresholds, targets, exit_macs,
                                                   table["backbone_macs"], data.groups, name)
        static_pred = probs[-1].argmax(1)
        report["dynamic_selected"] = selected
        report.update(split=split, run=str(run_dir), config_sha256=config_hash(cfg),
                      selection_protocol=next(iter(selected.values()))["protocol"],
                      exit_thresholds_chosen={name: r["exit_thresholds"] for name, r in selected.items()},
                      halves={"seed": cfg.data.seed, "sizes": [len(h) for h in halves],
                              "static_top1": [float((static_pred[h] == part.labels[h]).mean()) for h in halves]},
                      flops=table, class_counts=data.class_counts, groups=data.groups)
        report["data_provenance"] = data.provenance  # which files the run read: official or a copy, their hashes
        report["trained_on"] = read_machines(run_dir)  # each start's device, CPU flags and precision
        atomic_write_json(run_dir / "eval" / f"{split}.json", report)
        reports[split] = report
    return reports
