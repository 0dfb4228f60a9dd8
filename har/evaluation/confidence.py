"""How confident an exit can be at all: the bound every threshold on its softmax is checked against."""

from __future__ import annotations

import math


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
