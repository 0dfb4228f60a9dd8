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

from har.evaluation.confidence import confidence_ceiling
from har.evaluation.metrics import classification_summary, confusion_matrix

NO_EXIT_THRESHOLD = 1.01  # above any softmax probability: every example reaches the last exit (static mode)


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


def exit_outcomes(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each exit's confidence (max softmax) and prediction [exits, examples]: all a sweep over s needs."""
    return probs.max(axis=2), probs.argmax(axis=2)


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
    confidence, predictions = exit_outcomes(probs)
    where = exit_indices(confidence, exit_threshold)
    result = result_at_exits(predictions, labels, where, probs.shape[2], exit_macs, backbone_macs, groups,
                             with_confusion=with_confusion)
    return {**result, "exit_threshold": float(exit_threshold)}


def result_at_exits(predictions: np.ndarray, labels: np.ndarray, where: np.ndarray, num_classes: int,
                    exit_macs: Sequence[float], backbone_macs: float, groups: Mapping[str, Sequence[int]], *,
                    with_confusion: bool = False) -> dict:
    """Metrics of dynamic inference given the exit each example leaves at (`where`, [examples]).

    Split from the threshold so that examples of one report may leave by different s (cross-fitting: each
    half of the test set at the s chosen on the other half).
    """
    num_exits, num_examples = predictions.shape
    chosen = predictions[where, np.arange(num_examples)]
    mean_macs = float(np.asarray(exit_macs, dtype=np.float64)[where].mean()) if num_examples else 0.0
    result = classification_summary(labels, chosen, num_classes, groups)
    result.update(mean_macs=mean_macs, saving=1.0 - mean_macs / backbone_macs)
    per_exit = []
    for k in range(num_exits):
        mask = where == k
        entry = {
            "fraction": float(mask.mean()) if num_examples else 0.0,
            "accuracy": float((chosen[mask] == labels[mask]).mean()) if mask.any() else None,
            "class_counts": np.bincount(labels[mask], minlength=num_classes).tolist(),
        }
        if with_confusion:
            entry["confusion"] = confusion_matrix(labels[mask], chosen[mask], num_classes).tolist()
        per_exit.append(entry)
    result["per_exit"] = per_exit
    return result


def sweep_results(confidence: np.ndarray, predictions: np.ndarray, labels: np.ndarray, num_classes: int,
                  exit_thresholds: Sequence[float], exit_macs: Sequence[float], backbone_macs: float,
                  groups: Mapping[str, Sequence[int]]) -> list[dict]:
    """`dynamic_result` for every s of a sweep, from outcomes computed once (`exit_outcomes`)."""
    return [{**result_at_exits(predictions, labels, exit_indices(confidence, s), num_classes, exit_macs,
                               backbone_macs, groups), "exit_threshold": float(s)} for s in exit_thresholds]


# Steps of the default s sweep: 0.05 / C for cosine classifiers (their confidence lives within a few 1/C of 1/C,
# and the paper's ImageNet-LT s are 1.7, 1.75, 1.8 x 1e-3), 0.005 of probability for linear ones.
COSINE_STEP_PER_CLASS = 0.05
LINEAR_STEP = 0.005
SIGNIFICANT_DIGITS = 4


def default_exit_thresholds(num_classes: int, classifier: str) -> list[float]:
    """An s sweep over the range the exit confidence can take, then one value above it (no early exit).

    The max softmax lies in [1/C, 1] for a linear classifier but only in [1/C, e / (e + (C - 1) / e)] for the
    raw cosines of a cosine classifier (about 0.45 for 10 classes, 0.07 for 100, 0.0073 for 1000), so a fixed
    grid on [0, 1] would leave LDAM models with one or two useful points. Cosine steps are 0.05 / C, so the
    grid holds every multiple of 0.05 / C (1.7 / C, 1.75 / C, ...); values are rounded to significant digits,
    not decimals, which would erase the resolution at C = 1000.
    """
    floor, top = 1.0 / num_classes, confidence_ceiling(num_classes, classifier)
    step = LINEAR_STEP if classifier == "linear" else COSINE_STEP_PER_CLASS / num_classes
    steps = int(math.floor((top - floor) / step + 1e-9))
    grid = [float(f"{floor + k * step:.{SIGNIFICANT_DIGITS}g}") for k in range(steps + 1)]
    return [s for s in grid if s <= top] + [NO_EXIT_THRESHOLD]


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
