"""What every trainer shares within an epoch: the per-epoch class weights, random streams and running sums that make
a resumed run continue exactly, a step's bookkeeping and the epoch's metrics row.

The run folder itself (config, metrics history, checkpoint contents, lock) is `har.run`'s, which the single-run
trainer and the pack trainer both write through, so a pack member's folder is a single run's (../shared/DESIGN.md:
"many runs, one assembly").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from har.config import RunConfig
from har.data.batches import eval_batches
from har.data.build import RunData
from har.engine.distributed import Distributed
from har.engine.step import StepLoss, StepOutput
from har.errors import RunError
from har.losses import HARLoss, ReweightSchedule
from har.methods.mixup import draw_mixing
from har.models import MultiExitNet
from har.run.folder import CHECKPOINT

log = logging.getLogger(__name__)
PER_CLASS = ("class_seen", "class_correct")  # the epoch's per-class sums, where it records them


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Data order and augmentation of an epoch depend only on (seed, epoch), so a resumed run sees the same."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """RNG states must be CPU tensors; a checkpoint loaded with map_location=cuda holds them on the GPU."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def set_class_weights(har_loss: HARLoss, reweight: ReweightSchedule, epoch: int, cfg: RunConfig,
                      num_classes: int) -> Tensor | None:
    """Give the exit loss the class weights of `epoch` and return them (None: unweighted). A compiled step trains
    with unit weights before DRW instead: the same values, and DRW then needs no recompile."""
    weights = reweight.weights(epoch)
    unit = weights is None and cfg.train.compile != "off"
    har_loss.exit_loss.set_weight(torch.ones(num_classes) if unit else weights)
    return weights


@dataclass
class EpochProgress:
    """How far an epoch got: its data order, the steps done and the running sums (device tensors).

    A mid-epoch checkpoint holds it with the epoch generator's state, so that the rest of the epoch draws,
    trains and sums exactly as an uninterrupted run would. `sums["first_bad_step"]` is the first step with a
    non-finite loss (-1: none), recorded on the device so that no step waits for a read-back.
    """

    order: Tensor
    sums: dict[str, Tensor]
    step: int = 0  # steps done
    seen: int = 0  # examples trained on
    seconds: float = 0.0  # time spent on the epoch by earlier attempts

    @classmethod
    def begin(cls, order: Tensor, num_exits: int, device: torch.device | None = None,
              per_class: int = 0) -> EpochProgress:
        """A new epoch's progress; `per_class` > 0 also sums each of that many classes' examples and right answers."""
        dev = order.device if device is None else device
        sums = {"loss": torch.zeros((), device=dev), "normaliser": torch.zeros((), device=dev),
                "correct": torch.zeros((), device=dev, dtype=torch.long),
                "exit_counts": torch.zeros(num_exits, device=dev),
                "exit_loss": torch.zeros(num_exits, device=dev),
                "first_bad_step": torch.full((), -1, device=dev, dtype=torch.long)}
        if per_class:
            sums |= {key: torch.zeros(per_class, device=dev, dtype=torch.long) for key in PER_CLASS}
        return cls(order, sums)

    def add(self, out: StepOutput, loss: Tensor, step: int, examples: int) -> None:
        """Add one step's statistics (`loss`: the step's normalised loss, checked for being finite)."""
        sums = self.sums
        with torch.no_grad():
            sums["loss"] += out.loss_sum.detach()
            sums["normaliser"] += out.normaliser
            sums["correct"] += out.correct
            sums["exit_counts"] += out.exit_counts
            sums["exit_loss"] += out.exit_loss
            if PER_CLASS[0] in sums:  # absent when not recorded, or in an epoch resumed from an older checkpoint
                sums["class_seen"] += out.class_seen
                sums["class_correct"] += out.class_correct
            sums["first_bad_step"].masked_fill_((sums["first_bad_step"] < 0) & ~loss.isfinite(), step)
        self.step, self.seen = step + 1, self.seen + examples

    def state_dict(self, generator: torch.Generator) -> dict[str, Any]:
        return {"order": self.order, "sums": self.sums, "step": self.step, "seen": self.seen,
                "seconds": self.seconds, "generator": generator.get_state()}

    @classmethod
    def resume(cls, state: dict[str, Any], generator: torch.Generator) -> EpochProgress:
        """Continue from `state_dict`; sets `generator` to its state after the last step done."""
        generator.set_state(state["generator"].cpu())
        return cls(state["order"], state["sums"], state["step"], state["seen"], state["seconds"])




def records_test(cfg: RunConfig, epoch: int) -> bool:
    """Whether this epoch's metrics row records test top-1 (`eval.record_test_from`; None: from the first lr
    milestone on CIFAR, never on the list datasets, whose 50,000-image test pass per epoch would cost GPU time
    for a protocol (LDAM-DRW's best epoch) that only the CIFAR rows follow)."""
    start = cfg.eval.record_test_from
    if start is None:
        start = None if cfg.data.is_list_dataset else min(cfg.train.lr_milestones, default=None)
    return start is not None and start >= 0 and epoch >= start


def take_step(step_loss: StepLoss, optimizer: torch.optim.Optimizer, progress: EpochProgress, cfg: RunConfig,
              images: Tensor, labels: Tensor, epoch: int, step: int, ctx: Distributed | None = None) -> Tensor:
    """One training step of a run (its Mixup draw, forward and loss, backward, SGD step, the epoch's sums); the
    loss, on the device. The single run and the pack's serial executor both take it, so a serial member steps
    exactly as its single run. Each process's loss is its examples' share of the global batch's loss (the
    normaliser summed over all processes), so DistributedDataParallel's gradient average is the one-process one."""
    ctx = ctx or Distributed()
    t = cfg.train
    mixing = None if t.mixup == "off" else draw_mixing(t.mixup_alpha, t.seed, epoch, step, len(labels), images.device)
    out = step_loss(images, labels, mixing)
    loss = out.loss_sum * ctx.world / ctx.all_reduce(out.normaliser)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    progress.add(out, loss, step, len(labels))
    return loss


@torch.no_grad()
def static_test_top1(model: MultiExitNet, data: RunData, cfg: RunConfig, device: torch.device) -> float:
    """Static test top-1 (the backbone's own classifier) in eval mode, for the LDAM-DRW protocol's best epoch.

    Uses no random numbers (no augmentation, no dropout), so a resumed run stays bit-identical; every process of
    a distributed run computes it on the whole test split, which keeps them in step without a collective.
    The next epoch puts the model back in training mode.
    """
    model.eval()
    labels = torch.from_numpy(data.test.labels).to(device)
    predictions = torch.cat([model.forward_static(images).argmax(1)
                             for images in eval_batches(data.test, cfg.data, cfg.eval.batch_size, device)])
    return (predictions == labels).float().mean().item()


def epoch_row(epoch: int, sums: dict[str, Tensor], seen: int, seconds: float) -> dict:
    """An epoch's metrics row from its running sums (loss, train top-1, exit fractions and per-exit loss, and each
    class's train top-1 where the epoch summed it: None for a class it did not see)."""
    counts = sums["exit_counts"].cpu()
    row = {
        "epoch": epoch,
        "loss": (sums["loss"] / sums["normaliser"]).item(),
        "train_top1": sums["correct"].item() / seen,
        "exit_fraction": (counts / seen).tolist(),
        "exit_loss": [s / c if c else None for s, c in zip(sums["exit_loss"].cpu().tolist(), counts.tolist())],
        "seconds": seconds,
    }
    if PER_CLASS[0] in sums:
        row["train_top1_per_class"] = [right / n if n else None for n, right in
                                       zip(sums["class_seen"].tolist(), sums["class_correct"].tolist())]
    return row


def nonfinite_error(epoch: int, step: int, steps: int) -> RunError:
    """The error of a run whose loss turned non-finite (no checkpoint of the diverged model is written)."""
    return RunError(f"non-finite training loss at epoch {epoch}, step {step} (both 0-based; {steps} steps per "
                    f"epoch); no checkpoint of the diverged model was written, {CHECKPOINT} keeps the last good "
                    f"state. Lower train.lr, or look for NaN / inf in the data")
