"""Mini-batches for the training loop, reproducible from a seed and split over the processes of a distributed run.

`TensorBatches` keeps a small uint8 dataset (CIFAR) on the training device and augments there; `ImageBatches`
decodes and transforms image files in data-loader workers (ImageNet-LT, iNaturalist). Both draw an epoch's
example order from a generator and yield the batches of that order from any step on, so a resumed epoch sees
the same batches. In a run of `world` processes, each global batch of `batch_size` examples is cut into `world`
equal shares and process `rank` gets its own: the union over processes is exactly the one-process batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from har.data.augment import BatchAugment, normalize


class _Batches:
    """Batch counting and the share of a global batch that one process trains on."""

    def __init__(self, num_examples: int, batch_size: int, drop_last: bool, rank: int, world: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} does not split evenly over {world} processes; "
                             f"make train.batch_size a multiple of {world}")
        self.num_examples, self.batch_size, self.drop_last = num_examples, batch_size, drop_last
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def share(self, batch: Tensor) -> Tensor:
        """This process's rows of a global batch (contiguous; a short last batch is shared as evenly as can be)."""
        if self.world == 1:
            return batch
        return batch.tensor_split(self.world)[self.rank]


class TensorBatches(_Batches):
    """Batches of (normalised float N x C x H x W images, labels) from uint8 N x H x W x C images.

    The data stays on the device of ``images``; shuffling and augmentation draw from the generator passed to
    :meth:`epoch`, so an epoch is a function of that generator's state. Every process of a distributed run
    augments the whole global batch (same draws) and keeps its share, so the shares add up to the one-process
    batch exactly.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool,
                 augment: BatchAugment | None, mean: Sequence[float], std: Sequence[float],
                 drop_last: bool = False, rank: int = 0, world: int = 1):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 N x H x W x C, got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        super().__init__(len(images), batch_size, drop_last, rank, world)
        self.images, self.labels = images, labels
        self.shuffle = shuffle
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.generator_device = images.device

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
            yield self.share(x), self.share(self.labels[idx])


class _SeededItems(Dataset):
    """``dataset[(index, seed)]``: the item with its random transforms drawn from ``seed``, whichever worker or
    process loads it, so augmentation does not depend on the number of workers or processes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ImageBatches(_Batches):
    """Batches of (float images, labels) on ``device`` from a dataset of (transformed image, label) items.

    The order is drawn on the CPU; each example's augmentation seed is a function of the epoch's order and its
    position in it, so a resumed epoch, or the same global batch split over processes, augments every example
    exactly as the uninterrupted one-process run.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, device: torch.device, workers: int = 0,
                 pin_memory: bool = False, drop_last: bool = False, rank: int = 0, world: int = 1) -> None:
        super().__init__(len(dataset), batch_size, drop_last, rank, world)
        self.items = _SeededItems(dataset)
        self.shuffle, self.device = shuffle, device
        self.workers, self.pin_memory = workers, pin_memory and device.type == "cuda"
        self.generator_device = torch.device("cpu")

    def order(self, generator: torch.Generator) -> Tensor:
        n = self.num_examples
        return torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)

    def epoch(self, generator: torch.Generator, order: Tensor | None = None,
              start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the data from batch ``start``; ``generator`` (CPU) is only used when ``order`` is None."""
        if order is None:
            order = self.order(generator)
        order = order.cpu()
        base = int.from_bytes(hashlib.sha256(order.numpy().tobytes()).digest()[:7], "little")
        indices, positions = order.tolist(), torch.arange(len(order))
        shares = [self.share(positions[i * self.batch_size:(i + 1) * self.batch_size]).tolist()
                  for i in range(start, len(self))]
        batch_sampler = [[(indices[p], base + p) for p in share] for share in shares]
        loader = DataLoader(self.items, batch_sampler=batch_sampler, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
