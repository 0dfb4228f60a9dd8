"""Batch augmentation on uint8 tensors, so the whole dataset can sit on the training device.

Per-image PIL transforms in DataLoader workers are the bottleneck on small images; here one batch is cropped,
flipped and normalised with a single gather, on whatever device holds it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Mean and std as 1 x C x 1 x 1 tensors, made once per device: a host-to-device copy every batch would
    make every training step wait for the GPU."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return m, s


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 N x H x W x C -> float N x C x H x W, scaled to [0, 1] then standardised per channel."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    m, s = _channel_stats(tuple(mean), tuple(std), x.device)
    return x.sub_(m).div_(s)


class BatchAugment:
    """Random crop with zero padding and horizontal flip, as torchvision's RandomCrop(size, padding) + flip.

    Crop offsets are uniform in {0, ..., 2 * padding}, drawn per example and per axis; each example is
    flipped with probability 1/2; the crop has the input's size.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 4, flip: bool = True):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.crop_padding = crop_padding
        self.flip = flip

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment uint8 N x H x W x C images; random draws come from ``generator`` on the images' device."""
        n, h, w, _ = images.shape
        p, dev = self.crop_padding, images.device
        padded = torch.nn.functional.pad(images, (0, 0, p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=dev)
        rows = dy + torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev).expand(n, w)
        if self.flip:
            flipped = torch.rand(n, 1, generator=generator, device=dev) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        cols = dx + cols
        batch = torch.arange(n, device=dev).view(n, 1, 1)
        return normalize(padded[batch, rows[:, :, None], cols[:, None, :]], self.mean, self.std)
