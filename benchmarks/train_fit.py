"""How far a checkpoint fits its own long-tailed training images, class by class, beside its test top-1.

DRW reweights the loss of the examples a model still gets wrong. A schedule that has fitted the rare classes' few
training images by the time DRW starts leaves the reweighting little to act on (docs/method.md, "What the reference
runs show so far"). This reads checkpoints (a run's `last.pt`, or a `snapshots/epoch<N>.pt` that `train.keep_epochs`
kept), runs the final exit (a plain model's only classifier) over the run's training images without augmentation and
over its test split, and prints per class: training top-1, the mean training cross entropy of the true class, and
test top-1. It never writes to the run folders.

    python benchmarks/train_fit.py ../split-probe/runs/dseed0/seed*/snapshots/epoch40.pt \\
        --root . --set data.root=../shared/data
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from har.config import config_hash, load_config, stored_config_hash
from har.data.build import build_data
from har.evaluation.evaluate import collect_logits
from har.run.assembly import build_model
from har.run.checkpoint import load_checkpoint
from har.run.folder import CONFIG


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: the nearest folder above it holding a config.yaml."""
    for folder in checkpoint.parents:
        if (folder / CONFIG).exists():
            return folder
    raise SystemExit(f"{checkpoint} lies in no run folder (no {CONFIG} above it); give a checkpoint inside one")


def per_class(checkpoint: Path, overrides: list[str]) -> tuple[str, pd.DataFrame]:
    """A label (run folder and epochs trained) and a frame with one row per class: training images, training top-1
    and mean cross entropy, test top-1 (top-1 in %)."""
    folder = run_folder(checkpoint)
    cfg = load_config(folder / CONFIG, overrides)
    ckpt = load_checkpoint(checkpoint)
    if stored_config_hash(ckpt.get("config")) != config_hash(cfg):
        raise SystemExit(f"{checkpoint} was trained with another config than {folder / CONFIG}")
    if ckpt.get("partial") is not None:
        raise SystemExit(f"{checkpoint} was saved part way through an epoch; give one saved at an epoch's end")
    data = build_data(cfg.data)
    model = build_model(cfg, data.num_classes)
    model.load_state_dict(ckpt["model"])
    columns: dict[str, pd.Series] = {"images": pd.Series(data.class_counts)}
    for split, name in ((data.train, "train"), (data.test, "test")):
        logits = torch.from_numpy(collect_logits(model, split, cfg, torch.device("cpu"))[-1])
        labels = torch.as_tensor(split.labels, dtype=torch.long)
        frame = pd.DataFrame({"label": labels.numpy(), "correct": (logits.argmax(1) == labels).numpy(),
                              "loss": F.cross_entropy(logits, labels, reduction="none").numpy()})
        by_class = frame.groupby("label")
        columns[f"{name} top-1"] = 100 * by_class["correct"].mean()
        if name == "train":
            columns["train loss"] = by_class["loss"].mean()
    return f"{folder} after {ckpt['epoch'] + 1} epochs", pd.DataFrame(columns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+",
                        help="checkpoint files inside run folders (last.pt, snapshots/epoch<N>.pt)")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the project the runs trained in: their configs' relative paths (data.bundle) start there")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a field that says where the data are (data.root, data.bundle)")
    args = parser.parse_args()
    checkpoints = [c.resolve() for c in args.checkpoints]
    os.chdir(args.root)
    for checkpoint in checkpoints:
        label, table = per_class(checkpoint, args.overrides)
        print(f"\n{label}: final exit, training images without augmentation\n")
        print("| measure | " + " | ".join(f"class {c} ({n})" for c, n in table["images"].items()) + " |")
        print("| --- |" + " ---: |" * len(table))
        for measure in ("train top-1", "train loss", "test top-1"):
            digits = 3 if measure == "train loss" else 1
            print(f"| {measure} | " + " | ".join(f"{v:.{digits}f}" for v in table[measure]) + " |")


if __name__ == "__main__":
    main()
