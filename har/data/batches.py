"""The batches a run trains and evaluates on, for either kind of split (CIFAR arrays or image lists)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from har.config import DataConfig
from har.data.augment import BatchAugment, normalize
from har.data.build import ListSplit, Split
from har.data.imagelist import ImageListDataset
from har.data.loader import ImageBatches, TensorBatches


def train_batches(split: Split | ListSplit, cfg: DataConfig, batch_size: int, device: torch.device,
                  rank: int = 0, world: int = 1) -> TensorBatches | ImageBatches:
    """Shuffled, augmented training batches: on the device for CIFAR, from loader workers for image lists.

    A last batch of one example is dropped (batch norm cannot train on it); a distributed run drops any short
    last batch, so that every process always gets its full share.
    """
    n = len(split)
    drop_last = n % batch_size == 1 or (world > 1 and n % batch_size != 0)
    mean, std = cfg.normalization()
    if isinstance(split, ListSplit):
        dataset = ImageListDataset(split.entries, split.root, train=True, image_size=cfg.image_size, mean=mean,
                                   std=std)
        return ImageBatches(dataset, batch_size, shuffle=True, device=device, workers=cfg.workers,
                            pin_memory=cfg.pin_memory, drop_last=drop_last, rank=rank, world=world)
    return TensorBatches(torch.from_numpy(split.images).to(device), torch.from_numpy(split.labels).to(device),
                         batch_size, shuffle=True, augment=BatchAugment(mean, std), mean=mean, std=std,
                         drop_last=drop_last, rank=rank, world=world)


def eval_batches(split: Split | ListSplit, cfg: DataConfig, batch_size: int,
                 device: torch.device) -> Iterator[Tensor]:
    """The split's images in order, normalised, without augmentation (resize and centre crop for image lists)."""
    mean, std = cfg.normalization()
    if isinstance(split, ListSplit):
        dataset = ImageListDataset(split.entries, split.root, train=False, image_size=cfg.image_size, mean=mean,
                                   std=std)
        batches = ImageBatches(dataset, batch_size, shuffle=False, device=device, workers=cfg.workers,
                               pin_memory=cfg.pin_memory)
        for images, _ in batches.epoch(torch.Generator()):
            yield images
        return
    images: np.ndarray = split.images
    for start in range(0, len(images), batch_size):
        yield normalize(torch.from_numpy(images[start:start + batch_size]).to(device), mean, std)
