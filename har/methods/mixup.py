"""Mixup (Zhang et al., 2018) on the images and Manifold Mixup (Verma et al., 2019) at a random layer, for Table II.

A batch is mixed with a permutation of itself: x = lam * x + (1 - lam) * x[perm], and the loss is
lam * L(y) + (1 - lam) * L(y[perm]) at every exit. Mixup mixes the images. Manifold Mixup mixes, as Verma et al.'s
``supervised/models/preresnet.py`` does (``layer_mix = random.randint(0, 2)``), at a layer drawn uniformly per step
among ``MANIFOLD_LAYERS``: the images, the output of block group 1 or that of block group 2. lam ~ Beta(alpha,
alpha), the permutation and the layer are drawn on the host from (seed, epoch, step). In a distributed run each
process mixes within its share of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Manifold Mixup's mixing points, as numbers of block groups computed before the mix (0: the images themselves).
MANIFOLD_LAYERS = (0, 1, 2)


@dataclass(frozen=True)
class Mixing:
    """One step's mixing: the weight of the original examples, the partner of each, and Manifold Mixup's layer
    (the number of block groups before the mix; input Mixup always mixes the images and ignores it)."""

    lam: float
    perm: Tensor
    layer: int = 0

    def __call__(self, x: Tensor) -> Tensor:
        """Mix a batch (images or feature maps) with its partners; lam = 1 returns ``x`` unchanged."""
        if self.lam == 1.0:
            return x
        return self.lam * x + (1.0 - self.lam) * x[self.perm]


def draw_mixing(alpha: float, seed: int, epoch: int, step: int, batch: int, device: torch.device) -> Mixing:
    """lam ~ Beta(alpha, alpha), the partners' permutation and Manifold Mixup's layer, all from (seed, epoch, step).

    Drawn on the host from their own generator, so mixing never waits on the GPU, a resumed run draws the same,
    and the run's other random draws (order, augmentation) are those of the same run without mixup. The layer is
    drawn last, so input Mixup's lam and permutation are those it drew before Manifold Mixup had layers.
    """
    rng = np.random.default_rng([seed, epoch, step])
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(batch)).to(device, non_blocking=True)
    return Mixing(lam, perm, MANIFOLD_LAYERS[int(rng.integers(len(MANIFOLD_LAYERS)))])
