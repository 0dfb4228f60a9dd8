"""Mixup (Zhang et al., 2018) and Manifold Mixup (Verma et al., 2019) at the pooled features, for Table II.

A batch is mixed with a permutation of itself: x = lam * x + (1 - lam) * x[perm], and the loss is
lam * L(y) + (1 - lam) * L(y[perm]) at every exit. Manifold Mixup mixes the pooled features that enter the
final classifier instead of the images (exits before it see unmixed features). lam ~ Beta(alpha, alpha) is
drawn with the permutation on the host from (seed, epoch, step). In a distributed run each process mixes within
its share of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Mixing:
    """One step's mixing: the weight of the original examples and the partner of each."""

    lam: float
    perm: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        """Mix a batch (images or features) with its partners; lam = 1 returns ``x`` unchanged."""
        if self.lam == 1.0:
            return x
        return self.lam * x + (1.0 - self.lam) * x[self.perm]


def draw_mixing(alpha: float, seed: int, epoch: int, step: int, batch: int, device: torch.device) -> Mixing:
    """lam ~ Beta(alpha, alpha) and the partners' permutation, both from (seed, epoch, step).

    Drawn on the host from their own generator, so mixing never waits on the GPU, a resumed run draws the same,
    and the run's other random draws (order, augmentation) are those of the same run without mixup.
    """
    rng = np.random.default_rng([seed, epoch, step])
    lam = float(rng.beta(alpha, alpha))
    return Mixing(lam, torch.from_numpy(rng.permutation(batch)).to(device, non_blocking=True))
