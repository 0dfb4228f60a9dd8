"""Mini-batches straight from tensors: no workers, no copies to another device, reproducible from a seed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from har.data.augment import BatchAugment, normalize


class TensorBatches:
    """Batches of (normalised float N x C x H x W images, labels) from uint8 N x H x W x C images.

    The data stays on the device of ``images``; shuffling and augmentation draw from the generator passed to
    :meth:`epoch`, so an epoch is a function of that generator's state.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool,
                 augment: BatchAugment | None, mean: Sequence[float], std: Sequence[float],
                 drop_last: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, generator: torch.Generator) -> Tensor:
        """The example order of an epoch: the generator's first draw (identity without shuffling)."""
        n, dev = len(self.images), self.images.device
        return torch.randperm(n, generator=generator, device=dev) if self.shuffle else torch.arange(n, device=dev)

    def epoch(self, generator: torch.Generator, order: Tensor | None = None,
              start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the data; ``generator`` must live on the images' device.

        A pass stopped after ``start`` batches continues identically from the ``order`` it drew and the
        generator's state at that point (the augmentation draws of later batches come from the generator).
        """
        if order is None:
            order = self.order(generator)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            images = self.images[idx]
            x = self.augment(images, generator) if self.augment else normalize(images, self.mean, self.std)
            yield x, self.labels[idx]
