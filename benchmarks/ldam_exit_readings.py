"""Where HAR(LDAM) training examples would leave under each reading of the paper's "prediction confidence".

HAR sends a training example out at the first exit that classifies it correctly with confidence above t. For an
LDAM model the exits output cosines, and the paper does not say which softmax its confidence is:

- raw:    softmax of the cosines themselves (what `har.losses.har.HARLoss` uses; the paper's t in units of 1/C,
          2.0/C, fits a softmax this close to uniform: it can never exceed e / (e + (C - 1) / e));
- scaled: softmax of the x`ldam_scale` logits LDAM's cross entropy sees at test time;
- margin: the same with the true class's margin subtracted first, the softmax LDAM's loss trains on.

This reads a checkpoint of a HAR(LDAM) run (finished or not; it never writes to the run folder), runs its exits
over the run's long-tailed training images without augmentation, and prints, per reading and t, the share of
examples whose first qualifying exit is each exit. No training: a reading under which almost nobody leaves
before the last exit makes HAR plain deep supervision (docs/method.md, "Which confidence HAR(LDAM) reads").

    python benchmarks/ldam_exit_readings.py --root ../har-reference/code \
        --run ../har-reference/code/results/runs/cifar10-r100/har_ldam_drw/seed0
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from har.config import load_config
from har.data.batches import eval_batches
from har.data.build import build_data
from har.losses.exit_losses import LDAMLoss
from har.losses.har import first_exit
from har.run.assembly import build_model
from har.run.checkpoint import load_checkpoint
from har.run.folder import CONFIG


def readings(cosines: torch.Tensor, labels: torch.Tensor, ldam: LDAMLoss) -> dict[str, torch.Tensor]:
    """True-class confidence [exits, N] under each reading, from cosine logits [exits, N, C]."""
    rows = labels[None, :, None].expand(cosines.shape[0], -1, 1)
    shifted = cosines - torch.nn.functional.one_hot(labels, cosines.shape[-1]) * ldam.margins[labels][:, None]
    return {"raw": cosines.softmax(-1).gather(2, rows).squeeze(2),
            "scaled": (ldam.scale * cosines).softmax(-1).gather(2, rows).squeeze(2),
            "margin": (ldam.scale * shifted).softmax(-1).gather(2, rows).squeeze(2)}


def exit_shares(confidence: torch.Tensor, correct: torch.Tensor, t: float) -> list[float]:
    """Share of examples leaving at each exit: the first exit (but the last) correct with confidence > t."""
    index = first_exit((correct & (confidence > t))[:-1])
    return (torch.bincount(index, minlength=confidence.shape[0]).float() / index.numel()).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a HAR(LDAM) run folder (config.yaml, last.pt)")
    parser.add_argument("--checkpoint", default="last.pt", help="checkpoint file in the run folder")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="the project the run trained in: its config's relative paths (data.bundle) start there")
    parser.add_argument("--t", type=float, nargs="+", default=[1.7, 1.8, 1.9, 2.0],
                        help="thresholds in units of 1/C (the paper's Table I(b) grid)")
    args = parser.parse_args()
    args.run = args.run.resolve()
    os.chdir(args.root)
    cfg = load_config(args.run / CONFIG)
    if cfg.loss.name != "ldam":
        raise SystemExit(f"{args.run} trains {cfg.loss.name}, not LDAM: nothing to compare")
    data = build_data(cfg.data)
    model = build_model(cfg, data.num_classes)
    ckpt = load_checkpoint(args.run / args.checkpoint)
    model.load_state_dict(ckpt["model"])
    model.eval()
    with torch.no_grad():
        cosines = torch.cat([torch.stack(model(images)).float()
                             for images in eval_batches(data.train, cfg.data, 500, torch.device("cpu"))], dim=1)
    labels = torch.as_tensor(data.train.labels, dtype=torch.long)
    ldam = LDAMLoss(data.class_counts, cfg.loss.ldam_max_margin, cfg.loss.ldam_scale)
    correct = cosines.argmax(-1) == labels[None, :]
    classes = data.num_classes
    print(f"{args.run} {args.checkpoint}: epoch {ckpt['epoch'] + 1} of {cfg.train.epochs} trained; "
          f"{len(labels)} training images, no augmentation; accuracy per exit "
          f"{', '.join(f'{100 * c:.1f}%' for c in correct.float().mean(1).tolist())}")
    print("\n| reading | t | " + " | ".join(f"exit {k + 1}" for k in range(cosines.shape[0])) + " |")
    print("| --- | --- |" + " ---: |" * cosines.shape[0])
    for name, confidence in readings(cosines, labels, ldam).items():
        for units in args.t:
            shares = exit_shares(confidence, correct, units / classes)
            print(f"| {name} | {units:g}/C = {units / classes:.3g} | "
                  + " | ".join(f"{100 * s:.1f}%" for s in shares) + " |")


if __name__ == "__main__":
    main()
