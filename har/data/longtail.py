"""Long-tailed subsets of balanced datasets, cut exactly as LDAM-DRW cuts CIFAR-10/100-LT.

Matching LDAM-DRW's ``IMBALANCECIFAR10.gen_imbalanced_data`` index for index keeps our numbers comparable with
the published ones, so the order of random draws below must not change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LongTailSplit:
    """Indices into the balanced training set: the long-tailed training subset and a balanced validation set.

    Attributes:
        train_indices: Long-tailed subset, grouped by class in class order, as LDAM-DRW builds it.
        val_indices: Validation images drawn from the training images the subset left out, grouped by class.
        class_counts: Training images per class.
        val_counts: Validation images per class.
        ratio: Imbalance ratio n_max / n_min.
        seed: Seed of the shuffles.
    """

    train_indices: np.ndarray
    val_indices: np.ndarray
    class_counts: list[int]
    val_counts: list[int]
    ratio: float
    seed: int


def longtail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images per class decaying exponentially from ``n_max`` to ``n_max / ratio`` (LDAM-DRW's 'exp' profile).

    Raises:
        ValueError: ``ratio`` < 1 or fewer than two classes.
    """
    if ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1 (n_max / n_min), got {ratio}")
    if num_classes < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got {num_classes}")
    imb_factor = 1.0 / ratio  # LDAM-DRW's parametrisation; kept so the float rounding matches
    return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def make_longtail_split(labels: np.ndarray, num_classes: int, ratio: float, seed: int = 0,
                        val_per_class: int = 50) -> LongTailSplit:
    """Cut LDAM-DRW's long-tailed training subset and a balanced validation set from a balanced training set.

    Per class in order, the class's indices are shuffled with one ``RandomState(seed)`` (what LDAM-DRW's
    ``np.random.seed(seed)`` followed by global shuffles amounts to); the first ``n_c`` form the training
    subset and the next ``val_per_class`` the validation set. The head class has no left-out images, so it
    gets fewer (a warning names such classes) rather than changing the training subset.

    Raises:
        ValueError: labels out of range or not balanced, ``val_per_class`` < 0, or a bad ratio.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must be a 1-D array of class ids in [0, {num_classes})")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    per_class = np.bincount(labels, minlength=num_classes)
    if np.any(per_class != per_class[0]):
        raise ValueError(f"the long-tailed cut needs a balanced training set, got {per_class.min()} to "
                         f"{per_class.max()} images per class")
    counts = longtail_counts(int(per_class[0]), num_classes, ratio)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c, n_c in enumerate(counts):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        train.append(idx[:n_c])
        val.append(idx[n_c:n_c + val_per_class])
    val_counts = [len(v) for v in val]
    short = [c for c, n in enumerate(val_counts) if n < val_per_class]
    if short:
        log.warning("classes %s have fewer than %d training images left out of the long-tailed subset: their "
                    "validation sets hold %s images", short, val_per_class, [val_counts[c] for c in short])
    return LongTailSplit(np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64),
                         counts, val_counts, float(ratio), seed)


def subsample_per_class(indices: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the first ``ceil(fraction * n_c)`` of each class's indices, so quick runs keep the class profile.

    Args:
        indices: Indices into ``labels``; their order decides which ones are kept, and is preserved.
        labels: Labels of the whole dataset.
        fraction: Share of each class to keep, in (0, 1]; every class present keeps at least one index.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    indices = np.asarray(indices)
    classes = np.asarray(labels)[indices]
    keep = np.zeros(len(indices), dtype=bool)
    for c in np.unique(classes):
        pos = np.flatnonzero(classes == c)
        keep[pos[:math.ceil(round(fraction * len(pos), 9))]] = True  # round: 0.7 * 10 must give 7, not 8
    return indices[keep]


def shot_groups(class_counts: Sequence[int], many_above: int = 100,
                few_below: int = 20) -> dict[str, list[int]]:
    """Class ids by training count: "many" (> 100), "medium" (20..100) and "few" (< 20) shots, as usual."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        groups["many" if n > many_above else "few" if n < few_below else "medium"].append(c)
    return groups
