"""Whether a finished plain run (CE+DRW, LDAM+DRW: no exits) computes what LDAM-DRW's own code computes: its trained
weights evaluated through LDAM-DRW's ResNet-32 and preprocessing, and one DRW training step's loss and gradients
through both codes from the same weights and batch.

The reference set's CE+DRW lands about 2 points under three independent runs of LDAM-DRW's protocol on the same
long-tailed draw (docs/method.md, "What the reference runs show so far"); this rules the model, the evaluation, the
class-balanced weights and the loss in or out, in seconds, before any long run. It imports `models/resnet_cifar.py`
and `losses.py` from a checkout of github.com/kaidic/LDAM-DRW that you give it (nothing of it is copied here), reads
the test images from the CIFAR-10 pickle files, and runs on the CPU in float32. It never writes.

    python benchmarks/upstream_check.py --ldam-drw ../LDAM-DRW --data ../shared/data \\
        results/reference/runs/cifar10-r100/ce_drw/seed0 results/reference/runs/cifar10-r100/ldam_drw/seed0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn as nn

from har.config import load_config
from har.facts import CIFAR_MEAN, CIFAR_STD
from har.models.exits import NormedLinear
from har.reporting.results import read_eval, read_outputs
from har.run.assembly import build_loss, build_model, build_reweight
from har.run.checkpoint import load_checkpoint
from har.run.folder import CHECKPOINT, CONFIG


def upstream(checkout: Path, name: str) -> ModuleType:
    """A module of the LDAM-DRW checkout, imported from its file (the checkout is not a package)."""
    path = checkout / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --ldam-drw must be a checkout of github.com/kaidic/LDAM-DRW")
    spec = importlib.util.spec_from_file_location(f"ldam_drw_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def cuda_tensor_types_on_cpu() -> Iterator[None]:
    """LDAM-DRW's LDAMLoss builds its tensors with `torch.cuda.FloatTensor` (a GPU-only constructor): while inside,
    that name makes CPU tensors, so the loss runs unchanged on the CPU. The deprecation warnings current torch gives
    its 2019 code (legacy constructors, a uint8 mask) are silenced here, not ours."""
    saved = torch.cuda.FloatTensor
    torch.cuda.FloatTensor = torch.FloatTensor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.cuda.FloatTensor = saved


def test_images(data_root: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The CIFAR-10 test set as LDAM-DRW feeds it: ToTensor (x / 255, C x H x W) then Normalize with its constants;
    and the labels, in the file's order."""
    path = data_root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (CIFAR_MEAN, CIFAR_STD))
    return (images - mean) / std, np.asarray(batch["labels"])


def twin(run: Path, checkout: Path) -> tuple[nn.Module, nn.Module, object]:
    """Our model with the run's trained weights, LDAM-DRW's ResNet-32 holding the same weights (matched in order;
    their shapes agree), and the run's config."""
    cfg = load_config(run / CONFIG)
    ours = build_model(cfg, 10)
    if ours.num_exits > 1:
        raise SystemExit(f"{run} is a multi-exit run: this check compares plain models (CE+DRW, LDAM+DRW)")
    ours.load_state_dict(load_checkpoint(run / CHECKPOINT)["model"])
    cosine = isinstance(ours.backbone.classifier, NormedLinear)  # the config's "auto": cosine for LDAM
    theirs = upstream(checkout, "models/resnet_cifar").resnet32(num_classes=10, use_norm=cosine)
    mine, other = ours.state_dict(), theirs.state_dict()
    if [v.shape for v in mine.values()] != [v.shape for v in other.values()]:
        raise SystemExit("the two ResNet-32s' parameters do not line up in order and shape")
    theirs.load_state_dict(dict(zip(other, mine.values())))
    return ours.float().eval(), theirs.float().eval(), cfg


@torch.no_grad()
def compare_evaluation(run: Path, ours: nn.Module, theirs: nn.Module, images: torch.Tensor,
                       labels: np.ndarray) -> list[str]:
    """Test top-1 and logits: LDAM-DRW's model and preprocessing on our weights, against the logits our evaluation
    recorded (eval/test.npz) and against our model recomputed here in float32."""
    theirs_logits = torch.cat([theirs(images[i:i + 500]) for i in range(0, len(images), 500)])
    ours_logits = torch.cat([ours(images[i:i + 500])[-1] for i in range(0, len(images), 500)])
    recorded, recorded_labels = read_outputs(run, "test")
    if not np.array_equal(recorded_labels, labels):
        raise SystemExit(f"{run}: eval/test.npz holds the test labels in another order than the pickle files")
    theirs_pred = theirs_logits.argmax(1).numpy()
    report = read_eval(run, "test")["static"]["top1"]
    return [
        f"  test top-1: LDAM-DRW's model and preprocessing {100 * np.mean(theirs_pred == labels):.2f}, "
        f"our evaluation (eval/test.json) {100 * report:.2f}",
        f"  same prediction as our recorded logits on {np.mean(theirs_pred == recorded[-1].argmax(1)):.2%} of images, "
        f"largest logit difference {np.abs(theirs_logits.numpy() - recorded[-1]).max():.2e}",
        f"  against our model here in float32: largest logit difference "
        f"{(theirs_logits - ours_logits).abs().max().item():.2e}",
    ]


def compare_step(cfg, counts: list[int], ours: nn.Module, theirs: nn.Module, checkout: Path,
                 images: torch.Tensor, labels: np.ndarray) -> list[str]:
    """One batch of 128 (test images: the data do not matter here) in training mode at the first DRW epoch: the
    class-balanced weights, the loss and every parameter's gradient, ours against LDAM-DRW's."""
    epoch = cfg.loss.drw_epoch
    ours_weights = build_reweight(cfg, counts).weights(epoch)
    beta = cfg.loss.cb_beta  # LDAM-DRW's cifar_train.py, train_rule DRW, from epoch 160: betas[1] = 0.9999
    effective = 1.0 - np.power(beta, counts)
    theirs_weights = (1.0 - beta) / effective
    theirs_weights = torch.FloatTensor(theirs_weights / theirs_weights.sum() * len(counts))
    har_loss = build_loss(cfg, counts)
    har_loss.exit_loss.set_weight(ours_weights)
    x, y = images[:128], torch.from_numpy(labels[:128])
    ours.train(), theirs.train()
    ours.zero_grad(), theirs.zero_grad()
    mine = har_loss(ours(x), y)
    with cuda_tensor_types_on_cpu():
        if cfg.loss.name == "ldam":
            criterion = upstream(checkout, "losses").LDAMLoss(cls_num_list=counts, max_m=cfg.loss.ldam_max_margin,
                                                               s=cfg.loss.ldam_scale, weight=theirs_weights)
        elif cfg.loss.name == "ce":
            criterion = nn.CrossEntropyLoss(weight=theirs_weights)
        else:
            raise SystemExit(f"loss {cfg.loss.name!r}: this check compares CE and LDAM runs")
        other = criterion(theirs(x), y)
    mine.backward(), other.backward()
    grads = [(a.grad - b.grad).abs().max().item() / max(b.grad.abs().max().item(), 1e-30)
             for a, b in zip(ours.parameters(), theirs.parameters())]
    return [
        f"  class weights at epoch {epoch} (0-based): largest difference "
        f"{(ours_weights - theirs_weights).abs().max().item():.2e}",
        f"  loss of one batch: ours {mine.item():.6f}, LDAM-DRW's {other.item():.6f}",
        f"  gradients: largest difference relative to the parameter's largest gradient {max(grads):.2e} "
        f"(over {len(grads)} parameters)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished plain run folders (config.yaml, last.pt, eval/)")
    parser.add_argument("--ldam-drw", required=True, type=Path, help="a checkout of github.com/kaidic/LDAM-DRW")
    parser.add_argument("--data", required=True, type=Path, help="the folder holding cifar-10-batches-py/")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    images, labels = test_images(args.data)
    for run in args.runs:
        ours, theirs, cfg = twin(run, args.ldam_drw)
        counts = read_eval(run, "test")["class_counts"]
        print(f"{run} ({cfg.loss.name} loss, {type(ours.backbone.classifier).__name__} classifier):")
        print("\n".join(compare_evaluation(run, ours, theirs, images, labels)))
        print("\n".join(compare_step(cfg, counts, ours, theirs, args.ldam_drw, images, labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
