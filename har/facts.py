"""What the package knows before it reads any data or builds any model, at the ground beside `har.config`.

The config checks a run against these facts (a dataset's classes, a backbone's block groups, the most confident
softmax a classifier can give) without importing `har.data`, `har.models` or `har.evaluation`, which read them
from here too: each fact is written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CIFAR_DATASETS = ("cifar10", "cifar100")  # arrays from the pickle layout, cut into long-tailed subsets here
LIST_DATASETS = ("imagenet_lt", "inat2018")  # read from split lists and an image folder

# Normalisation statistics: LDAM-DRW's for CIFAR, torchvision's ImageNet statistics for the list datasets.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PublishedList:
    """A published split list: file name, git blob id, number of lines and number of classes."""

    file_name: str
    blob_id: str
    lines: int
    num_classes: int


# ImageNet-LT (Liu et al., 2019): the published split lists.
IMAGENET_LT_LISTS = {
    "train": PublishedList("ImageNet_LT_train.txt", "a063f095fcd475db4cf8b0658c4b73955535bbf9", 115_846, 1000),
    "val": PublishedList("ImageNet_LT_val.txt", "3ed3188b2f44829ce2dec1cc27040d8d40984088", 20_000, 1000),
    "test": PublishedList("ImageNet_LT_test.txt", "76a2fb9749d6cd29e765cc4f8c270f2504131e2f", 50_000, 1000),
}
# iNaturalist 2018: the split lists of Kang et al. ("Decoupling Representation and Classifier").
INAT2018_LISTS = {
    "train": PublishedList("iNaturalist18_train.txt", "4accdb7584d2f0a5106c40a33ed6afa392189bcc", 437_513, 8142),
    "val": PublishedList("iNaturalist18_val.txt", "4c23900857fd0f5adcd4cc0dffef345039eeb05f", 24_426, 8142),
}
PUBLISHED_LISTS: dict[str, dict[str, PublishedList]] = {"imagenet_lt": IMAGENET_LT_LISTS, "inat2018": INAT2018_LISTS}

# Classes of each dataset: what the thresholds are checked against before any data is read.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet_lt": IMAGENET_LT_LISTS["train"].num_classes,
                   "inat2018": INAT2018_LISTS["train"].num_classes}


def confidence_ceiling(num_classes: int, classifier: str) -> float:
    """The largest softmax probability an exit can give one class.

    A linear classifier's logits are unbounded, so its softmax approaches 1. A cosine classifier's raw logits
    are cosines in [-1, 1], so the most confident softmax has e at the class and 1/e at the C - 1 others:
    e / (e + (C - 1) / e), about 0.451 for 10 classes, 0.069 for 100 and 0.0073 for 1000. A threshold at or
    above the ceiling can never be exceeded (the rules compare with a strict >).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if classifier == "linear":
        return 1.0
    if classifier == "cosine":
        return math.e / (math.e + (num_classes - 1) / math.e)
    raise ValueError(f"unknown classifier {classifier!r}; choose linear or cosine")


# Each backbone's default layout (an exit before each block group), by its name in `har.models`; the registry's
# `register_model` adds a new backbone's here, so that configs naming it are checked like the built-in ones.
BACKBONE_LAYOUTS: dict[str, str] = {"resnet32": "CEBEBEBE", "resnet8": "CEBEBEBE", "resnet50": "CEBEBEBEBE",
                                    "densenet169": "CEBEBEBEBE"}


def backbone_names() -> list[str]:
    """Sorted names of the known backbones."""
    return sorted(BACKBONE_LAYOUTS)


def default_layout(name: str) -> str:
    """A backbone's default layout (ValueError for an unknown name)."""
    if name not in BACKBONE_LAYOUTS:
        raise ValueError(f"Unknown model {name!r}; choose one of {backbone_names()}.")
    return BACKBONE_LAYOUTS[name]


def _num_groups(name: str) -> int:
    return default_layout(name).count("B")


def bare_layout(name: str) -> str:
    """The layout of a registered model without intermediate exits: stem, one B per block group, final exit."""
    return "C" + "B" * _num_groups(name) + "E"


def check_layout(name: str, layout: str | None) -> None:
    """Validate a model name and exit layout without building the model (config validation uses this)."""
    groups = _num_groups(name)
    if layout is not None:
        parse_layout(layout, groups)


def parse_layout(layout: str, num_groups: int) -> tuple[int, ...]:
    """Positions of the intermediate exits of a layout string, as the number of block groups before each.

    Args:
        layout: e.g. 'CEBEBEBE': 'C' stem, 'B' block group, 'E' exit; must end with the backbone's own 'E'.
        num_groups: number of block groups of the backbone.

    Returns:
        Increasing positions in [0, num_groups), e.g. (0, 1, 2) for 'CEBEBEBE' and () for 'CBBBE'.

    Raises:
        ValueError: if the string is not a valid layout for a backbone with ``num_groups`` groups.
    """
    hint = (
        f"(examples for {num_groups} block groups: {'C' + 'EB' * num_groups + 'E'!r} with an exit before"
        f" every group, {'C' + 'B' * num_groups + 'E'!r} without intermediate exits)"
    )
    if not isinstance(layout, str) or not layout:
        raise ValueError(f"Layout must be a non-empty string, got {layout!r} {hint}.")
    bad = sorted(set(layout) - set("CBE"))
    if bad:
        raise ValueError(f"Layout {layout!r} has characters {bad}; allowed are 'C', 'B', 'E' {hint}.")
    if not layout.startswith("C") or layout.count("C") != 1:
        raise ValueError(f"Layout {layout!r} must start with the single stem 'C' {hint}.")
    if not layout.endswith("E"):
        raise ValueError(f"Layout {layout!r} must end with 'E', the backbone's classifier {hint}.")
    if layout.count("B") != num_groups:
        raise ValueError(
            f"Layout {layout!r} has {layout.count('B')} 'B's but the backbone has {num_groups} block groups"
            f" {hint}."
        )
    if "EE" in layout:
        raise ValueError(f"Layout {layout!r} has two adjacent exits 'EE' {hint}.")
    positions = []
    groups_done = 0
    for char in layout[1:-1]:
        if char == "B":
            groups_done += 1
        else:
            positions.append(groups_done)
    return tuple(positions)
