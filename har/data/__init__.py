"""Datasets, long-tailed splits and on-device batching."""

from har.data.augment import BatchAugment, normalize
from har.data.cifar import CifarArrays, load_cifar, resolve_data_root
from har.data.loader import TensorBatches
from har.data.longtail import LongTailSplit, longtail_counts, make_longtail_split, shot_groups, subsample_per_class
from har.errors import DataError
from har.facts import CIFAR_MEAN, CIFAR_STD

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "BatchAugment",
    "CifarArrays",
    "DataError",
    "LongTailSplit",
    "TensorBatches",
    "load_cifar",
    "longtail_counts",
    "make_longtail_split",
    "normalize",
    "resolve_data_root",
    "shot_groups",
    "subsample_per_class",
]
