"""Dynamic (early-exit) evaluation computed from cached per-exit outputs.

One forward pass per split caches every exit's logits; each exit threshold s, each choice of s and each
figure is then a cheap computation on that cache, as MSDNet's dynamic evaluation does. The rule is the
one `MultiExitNet.forward_early_exit` applies for real: an example leaves at the first exit whose maximum
softmax probability is strictly greater than s, else at the last exit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from har.evaluation.metrics import classification_summary, confusion_matrix


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 for stable thresholds."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=-1, keepdims=True)


def exit_indices(confidence: np.ndarray, exit_threshold: float) -> np.ndarray:
    """First exit (axis 0) whose confidence exceeds the threshold, the last exit where none does."""
    leaves = confidence > exit_threshold
    leaves[-1] = True
    return leaves.argmax(axis=0)


def dynamic_result(probs: np.ndarray, labels: np.ndarray, exit_threshold: float, exit_macs: Sequence[float],
                   backbone_macs: float, groups: Mapping[str, Sequence[int]], *,
                   with_confusion: bool = False) -> dict:
    """Accuracy, cost and per-exit breakdown of dynamic inference at one exit threshold.

    Args:
        probs: softmax probabilities [exits, examples, classes].
        labels: true classes [examples].
        exit_threshold: s.
        exit_macs: MACs spent by an example that leaves at each exit (backbone so far + heads so far).
        backbone_macs: MACs of the bare backbone (static mode), the reference for the saving.
        groups: shot groups (many / medium / few class ids).
        with_confusion: add each exit's confusion matrix over the examples that leave there.
    """
    num_exits, num_examples, num_classes = probs.shape
    where = exit_indices(probs.max(axis=2), exit_threshold)
    chosen = probs[where, np.arange(num_examples)]
    predictions = chosen.argmax(axis=1)
    mean_macs = float(np.asarray(exit_macs, dtype=np.float64)[where].mean()) if num_examples else 0.0
    result = classification_summary(labels, predictions, num_classes, groups)
    result.update(exit_threshold=float(exit_threshold), mean_macs=mean_macs,
                  saving=1.0 - mean_macs / backbone_macs)
    per_exit = []
    for k in range(num_exits):
        mask = where == k
        entry = {
            "fraction": float(mask.mean()) if num_examples else 0.0,
            "accuracy": float((predictions[mask] == labels[mask]).mean()) if mask.any() else None,
            "class_counts": np.bincount(labels[mask], minlength=num_classes).tolist(),
        }
        if with_confusion:
            entry["confusion"] = confusion_matrix(labels[mask], predictions[mask], num_classes).tolist()
        per_exit.append(entry)
    result["per_exit"] = per_exit
    return result


def default_exit_thresholds(num_classes: int, classifier: str, steps: int = 21) -> list[float]:
    """An s sweep over the range the exit confidence can take, then one value above it (no early exit).

    The max softmax lies in [1/C, 1] for a linear classifier but only in [1/C, e / (e + (C - 1) / e)] for the
    raw cosines of a cosine classifier (about 0.45 for 10 classes, 0.07 for 100), so a fixed grid on [0, 1]
    would leave LDAM models with one or two useful points.
    """
    top = 1.0 if classifier == "linear" else math.e / (math.e + (num_classes - 1) / math.e)
    grid = np.linspace(1.0 / num_classes, top, steps)
    return [round(float(s), 4) for s in grid] + [1.01]


def choose_exit_threshold(sweep: Sequence[Mapping], target_saving: float | None = None) -> float:
    """Pick s from a sweep computed on the validation split.

    Without a target: the most accurate s (ties: the larger saving). With a target saving: the most
    accurate s among those saving at least that much; if none does, the s with the largest saving.
    """
    if not sweep:
        raise ValueError("cannot choose an exit threshold from an empty sweep")
    candidates = list(sweep)
    if target_saving is not None:
        reaching = [r for r in candidates if r["saving"] >= target_saving]
        if not reaching:
            return float(max(candidates, key=lambda r: r["saving"])["exit_threshold"])
        candidates = reaching
    best = max(candidates, key=lambda r: (r["top1"], r["saving"]))
    return float(best["exit_threshold"])
