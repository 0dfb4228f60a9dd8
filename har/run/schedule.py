"""Learning-rate schedules: linear warm-up, then LDAM-DRW's step decays or a cosine decay (Kang et al.'s stage two)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_factor(epoch: int, warmup_epochs: int, milestones: Sequence[int], decay: float, schedule: str = "step",
              epochs: int = 0) -> float:
    """Multiplier of the base lr in a 0-based epoch.

    Warm-up: (epoch + 1) / warmup_epochs for the first epochs (LDAM-DRW's `adjust_learning_rate`), then the
    lr is multiplied by `decay` at every milestone reached (default: x0.01 at 160, x0.01 again at 180). The cosine
    schedule ignores milestones and decay: after warm-up it falls from 1 towards 0 over the remaining epochs.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)))
    return decay ** sum(epoch >= m for m in milestones)
