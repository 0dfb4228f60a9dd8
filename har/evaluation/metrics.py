"""Accuracy metrics for long-tailed classification: overall, per class, many / medium / few, confusion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class; NaN for a class with no example in `labels`."""
    support = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[labels == predictions], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, correct / np.maximum(support, 1), np.nan)


def shot_accuracy(class_accuracy: np.ndarray, groups: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
    """Unweighted mean of per-class accuracy in each shot group, as classifier-balancing reports it.

    A group with no class (or no evaluated class) is None, not 0: "no few-shot class" is not "0% on them".
    """
    result: dict[str, float | None] = {}
    for name, classes in groups.items():
        values = class_accuracy[list(classes)] if len(classes) else np.array([])
        values = values[~np.isnan(values)]
        result[name] = float(values.mean()) if values.size else None
    return result


def classification_summary(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                           groups: Mapping[str, Sequence[int]]) -> dict:
    """Top-1, many / medium / few and per-class accuracy of one set of predictions."""
    class_acc = per_class_accuracy(labels, predictions, num_classes)
    return {
        "top1": float((labels == predictions).mean()) if labels.size else None,
        "shot": shot_accuracy(class_acc, groups),
        "per_class": [None if np.isnan(a) else float(a) for a in class_acc],
    }
