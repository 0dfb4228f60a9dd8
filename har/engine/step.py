"""The differentiable part of a training step as one module, so `torch.compile` can take all of it.

Compiling only the network leaves the loss, the HAR exit choice and the step's statistics as dozens of small
eager kernels, each launched from Python: on a GPU that launch time, not arithmetic, bounds a ResNet-32 step.
`StepLoss` holds forward, loss and statistics together; `train.compile` compiles it whole (with
`reduce-overhead`, forward and backward each become one CUDA graph replay).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from har.config import RunConfig
from har.engine.bf16 import bf16_convolutions
from har.errors import ConfigError
from har.losses import HARLoss, exit_statistics
from har.methods.mixup import Mixing


class StepOutput(NamedTuple):
    """One batch's loss parts (the caller divides by the normaliser summed over every process) and statistics."""

    loss_sum: Tensor  # sum of the examples' HAR losses; differentiable
    normaliser: Tensor  # sum of the examples' normalisers (the loss's mean reduction divides by it)
    correct: Tensor  # examples the last exit classifies correctly (long)
    exit_counts: Tensor  # examples leaving at each exit [K] (long)
    exit_loss: Tensor  # summed (unmixed) HAR loss of the examples leaving at each exit [K]
    class_seen: Tensor  # examples of each class [C] (long)
    class_correct: Tensor  # of those, the ones the last exit classifies correctly [C] (long)


class StepLoss(nn.Module):
    """Forward, HAR loss (mixed with the partners' labels under Mixup) and statistics of one batch.

    Args:
        model: The multi-exit network, possibly wrapped (DistributedDataParallel, torch.compile).
        har_loss: The run's HAR loss; its class weights may change between epochs (DRW).
        num_exits: Number of exits of ``model``.
        mixup: ``train.mixup``: ``off``, ``input`` (mix the images) or ``manifold`` (mix at the step's layer).
        amp: bf16 autocast for the network; the losses always run in float32.

    Raises:
        ConfigError: Manifold Mixup on a model with intermediate exits (an exit before the mixing layer would be
            trained on mixed targets of unmixed features).
    """

    def __init__(self, model: nn.Module, har_loss: HARLoss, num_exits: int, mixup: str = "off",
                 amp: bool = False) -> None:
        super().__init__()
        if mixup == "manifold" and num_exits > 1:
            raise ConfigError(f"train.mixup: manifold mixes at a random layer, so the model's {num_exits - 1} "
                              f"intermediate exits would learn mixed targets of unmixed features; train the bare "
                              f"backbone (model.layout without 'E' before the last, e.g. CBBBE) or use mixup: input")
        self.model, self.har_loss = model, har_loss
        self.num_exits, self.mixup, self.amp = num_exits, mixup, amp

    def forward(self, images: Tensor, labels: Tensor, mixing: Mixing | None = None) -> StepOutput:
        if mixing is not None and self.mixup == "input":
            images = mixing(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp), \
                bf16_convolutions(images.device, self.amp):
            manifold = mixing is not None and self.mixup == "manifold"
            outputs = self.model(images, mix=mixing, mix_at=mixing.layer) if manifold else self.model(images)
        return step_statistics(self.har_loss, outputs, labels, mixing, self.num_exits)


def build_step_loss(model: nn.Module, har_loss: HARLoss, num_exits: int, cfg: RunConfig, amp: bool,
                    distributed: bool = False) -> StepLoss:
    """Forward, loss and statistics of a step, compiled whole when `train.compile` asks for it.

    A distributed run compiles only the DistributedDataParallel module, the form torch.compile documents for
    it (it splits the graph at DDP's gradient buckets).
    """
    mode = cfg.train.compile
    if mode != "off" and distributed:
        model = torch.compile(model, mode=mode)
    step_loss = StepLoss(model, har_loss, num_exits, cfg.train.mixup, amp)
    return step_loss if mode == "off" or distributed else torch.compile(step_loss, mode=mode)


def step_statistics(har_loss: HARLoss, outputs: list[Tensor], labels: Tensor, mixing: Mixing | None,
                    num_exits: int) -> StepOutput:
    """One batch's HAR loss (mixed with the partners' labels under Mixup) and statistics from its exits' logits.

    The single run and the pack trainer both call it, so a pack member's loss is its single run's. The losses run
    in float32 at least (bf16 logits are widened; float64 ones, as in the tests, stay float64).
    """
    logits = [out.float() if out.dtype in (torch.bfloat16, torch.float16) else out for out in outputs]
    parts = har_loss.components(logits, labels)
    per_example, normaliser = parts.per_example, parts.normaliser
    if mixing is not None:  # lam * L(y) + (1 - lam) * L(y[perm]), HAR's exit choice from y
        partner = har_loss.components(logits, labels[mixing.perm])
        per_example = mixing.lam * per_example + (1 - mixing.lam) * partner.per_example
        normaliser = mixing.lam * normaliser + (1 - mixing.lam) * partner.normaliser
    with torch.no_grad():
        right = logits[-1].argmax(1) == labels
        counts, exit_sums = exit_statistics(parts, num_exits)
        zeros = torch.zeros(logits[-1].shape[1], dtype=torch.long, device=labels.device)
        class_seen = zeros.index_add(0, labels, torch.ones_like(labels))
        class_correct = zeros.index_add(0, labels, right.long())
    return StepOutput(per_example.sum(), normaliser.sum(), right.sum(), counts, exit_sums, class_seen, class_correct)
