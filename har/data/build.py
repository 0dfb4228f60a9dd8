"""From a data config to the three splits of one run: LT train, balanced validation, balanced test."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from har.config import DataConfig
from har.data.cifar import load_cifar, resolve_data_root
from har.data.longtail import make_longtail_split, shot_groups, subsample_per_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Images (uint8, N x 32 x 32 x 3) and labels of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class RunData:
    """What training and evaluation of one run read."""

    train: Split
    val: Split
    test: Split
    class_counts: list[int]  # training images per class: the long-tailed profile the losses see
    groups: dict[str, list[int]]  # many / medium / few class ids by training count
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


def build_data(cfg: DataConfig) -> RunData:
    """Load the dataset and cut the long-tailed training subset, the validation and the test split."""
    arrays = load_cifar(cfg.dataset, resolve_data_root(cfg.root), download=cfg.download)
    split = make_longtail_split(arrays.train_labels, arrays.num_classes, cfg.ratio, seed=cfg.seed,
                                val_per_class=cfg.val_per_class)
    train_idx, val_idx = split.train_indices, split.val_indices
    test_idx = np.arange(len(arrays.test_labels))
    if cfg.train_fraction < 1:
        train_idx = subsample_per_class(train_idx, arrays.train_labels, cfg.train_fraction)
        log.info("quick run: keeping %d of %d long-tailed training images", len(train_idx),
                 len(split.train_indices))
    if cfg.eval_fraction < 1:
        val_idx = subsample_per_class(val_idx, arrays.train_labels, cfg.eval_fraction)
        test_idx = subsample_per_class(test_idx, arrays.test_labels, cfg.eval_fraction)
    counts = np.bincount(arrays.train_labels[train_idx], minlength=arrays.num_classes).tolist()
    return RunData(
        train=Split(arrays.train_images[train_idx], arrays.train_labels[train_idx]),
        val=Split(arrays.train_images[val_idx], arrays.train_labels[val_idx]),
        test=Split(arrays.test_images[test_idx], arrays.test_labels[test_idx]),
        class_counts=counts,
        groups=shot_groups(split.class_counts),
        classes=list(arrays.classes),
    )
