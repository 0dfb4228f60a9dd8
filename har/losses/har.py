"""Hardness Aware Reweighting loss (Duggal et al., IEEE BigData 2021, Eqs. 3-4).

An example trains only the exits up to the first one that already classifies it correctly and confidently, so
easy examples are cheap in the loss and hard ones accumulate the losses of every exit: an implicit,
per-example hardness weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from har.losses.exit_losses import ExitLoss


def first_exit(leaves: Tensor) -> Tensor:
    """0-based exit of each example [N] from whether it may leave at each exit but the last [K-1, N] (bool): the
    first that lets it, else the last exit, K-1."""
    # The leading run of exits that keep the example, counted per example, is the index of the first exit taken.
    return (~leaves).long().cumprod(dim=0).sum(dim=0)


class HARComponents(NamedTuple):
    """Everything the training loop needs to log HAR behaviour without extra host syncs.

    Attributes:
        per_example: HAR loss of each example [N] (class weight included), summed over its trained exits.
        exit_index: 0-based exit at which each example exits [N] (long).
        normaliser: Per-example denominator of the batch mean [N].
        loss: Scalar batch loss, ``per_example.sum() / normaliser.sum()``.
    """

    per_example: Tensor
    exit_index: Tensor
    normaliser: Tensor
    loss: Tensor


class HARLoss(nn.Module):
    """Sum of an exit loss over exits 0..k_i, where k_i is the first exit that is correct and confident.

    Confidence is the softmax of the *raw* logits at the true class; for LDAM these are unscaled cosines,
    which is why the paper's threshold for LDAM is as low as 2 / C. Examples that never qualify train every
    exit. The batch is reduced as the exit loss's own mean, so with one exit HAR equals that loss exactly.

    Args:
        exit_loss: Loss applied at every exit.
        threshold: Training threshold t in (0, 1) on the true-class probability, or None to train every exit
            on every example (plain multi-exit training).
    """

    def __init__(self, exit_loss: ExitLoss, threshold: float | None) -> None:
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise ValueError(f"threshold must be None or a number in (0, 1), got {threshold!r}")
        super().__init__()
        self.exit_loss = exit_loss
        self.threshold = None if threshold is None else float(threshold)

    @staticmethod
    def _check(logits: Sequence[Tensor], target: Tensor) -> None:
        if len(logits) == 0:
            raise ValueError("logits must hold at least one exit's [N, C] tensor, got an empty sequence")
        for k, exit_logits in enumerate(logits):
            if exit_logits.ndim != 2 or exit_logits.shape[0] != target.shape[0]:
                raise ValueError(
                    f"exit {k} logits must have shape [N, C] with N = {target.shape[0]}, "
                    f"got {tuple(exit_logits.shape)}"
                )

    def exit_index(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        """0-based exit of each example [N]: first exit that is correct with p_y > t, else the last exit."""
        self._check(logits, target)
        last = len(logits) - 1
        with torch.no_grad():
            if self.threshold is None or last == 0:
                return torch.full_like(target, last, dtype=torch.long)
            rows = target[:, None]
            exits = []
            for exit_logits in logits[:-1]:
                prob = exit_logits.float().softmax(dim=1).gather(1, rows).squeeze(1)
                exits.append((exit_logits.argmax(dim=1) == target) & (prob > self.threshold))
            return first_exit(torch.stack(exits))

    def components(self, logits: Sequence[Tensor], target: Tensor) -> HARComponents:
        """HAR loss with its per-example parts; see ``HARComponents``."""
        index = self.exit_index(logits, target)
        per_exit = torch.stack([self.exit_loss.per_example(z, target) for z in logits], dim=1)
        trained = torch.arange(len(logits), device=index.device)[None, :] <= index[:, None]
        # ``where``, not a 0/1 product: a non-finite loss at an untrained exit must not turn the sum into NaN.
        per_example = torch.where(trained, per_exit, torch.zeros_like(per_exit)).sum(dim=1)
        normaliser = self.exit_loss.normaliser(target)
        return HARComponents(per_example, index, normaliser, per_example.sum() / normaliser.sum())

    def forward(self, logits: Sequence[Tensor], target: Tensor) -> Tensor:
        """Scalar HAR loss of the batch."""
        return self.components(logits, target).loss


def exit_statistics(components: HARComponents, num_exits: int) -> tuple[Tensor, Tensor]:
    """Per-exit example counts [K] (long) and sums of detached HAR loss [K], as device tensors.

    Uses ``scatter_add`` rather than ``bincount``, whose CUDA kernel reads the maximum back to the host.
    Divide the sums by the counts for the mean HAR loss of the examples exiting at each exit.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits!r}")
    index = components.exit_index
    counts = torch.zeros(num_exits, dtype=torch.long, device=index.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    values = components.per_example.detach()
    sums = torch.zeros(num_exits, dtype=values.dtype, device=values.device).scatter_add_(0, index, values)
    return counts, sums
