"""The learning-rate schedule of LDAM-DRW's CIFAR runs: linear warm-up, then step decays."""

from __future__ import annotations

from collections.abc import Sequence


def lr_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int], decay: float) -> float:
    """Multiplier of the base lr in a 0-based epoch.

    Warm-up: (epoch + 1) / warmup_epochs for the first epochs (LDAM-DRW's `adjust_learning_rate`), then the
    lr is multiplied by `decay` at every milestone reached (default: x0.01 at 160, x0.01 again at 180).
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return decay ** sum(epoch >= m for m in milestones)
