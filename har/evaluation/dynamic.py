"""Dynamic (early-exit) evaluation computed from cached per-exit outputs.

One forward pass per split caches every exit's logits; each exit threshold s, each choice of s and each
figure is then a cheap computation on that cache, as MSDNet's dynamic evaluation does. The rule is the
one `MultiExitNet.forward_early_exit` applies for real: an example leaves at the first exit whose maximum
softmax probability is strictly greater than s, else at the last exit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from har.evaluation.metrics import classification_summary, confusion_matrix
from har.facts import confidence_ceiling

NO_EXIT_THRESHOLD = 1.01  # above any softmax probability: every example reaches the last exit (static mode)

# The two readings of a FLOPs saving (the paper does not say which it used), as the result fields holding them:
# 1 - mean MACs / the bare backbone's, counting every exit head evaluated, or only the backbone up to the exit.
READINGS = {"saving": "heads counted", "saving_trunk": "heads not counted"}


@dataclass(frozen=True)
class ExitCosts:
    """MACs of an example that leaves at each exit, under both readings of a saving, and the bare backbone's.

    `with_heads[k]`: the backbone up to exit k plus every head evaluated on the way, this one included (all at the
    last exit costs more than the backbone); `trunk[k]`: the backbone up to exit k alone (all at the last exit is
    the backbone: saving 0).
    """

    with_heads: tuple[float, ...]
    trunk: tuple[float, ...]
    backbone: float

    @classmethod
    def from_table(cls, table: Mapping) -> ExitCosts:
        """From `har.evaluation.flops.flops_table`: the trunk is the cumulative cost less the heads so far."""
        exits = table["exits"]
        heads = np.cumsum([e["head_macs"] for e in exits], dtype=np.float64)
        with_heads = np.array([e["cumulative_macs"] for e in exits], dtype=np.float64)
        return cls(tuple(with_heads.tolist()), tuple((with_heads - heads).tolist()), float(table["backbone_macs"]))

    def of(self, where: np.ndarray) -> dict[str, float]:
        """`mean_macs` and the saving under each reading of examples leaving at exits `where`."""
        if not len(where):
            return {"mean_macs": 0.0, "saving": 1.0, "saving_trunk": 1.0}
        mean_macs = float(np.asarray(self.with_heads)[where].mean())
        mean_trunk = float(np.asarray(self.trunk)[where].mean())
        return {"mean_macs": mean_macs, "saving": 1.0 - mean_macs / self.backbone,
                "saving_trunk": 1.0 - mean_trunk / self.backbone}


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


def dynamic_result(probs: np.ndarray, labels: np.ndarray, exit_threshold: float, costs: ExitCosts,
                   groups: Mapping[str, Sequence[int]], *, with_confusion: bool = False) -> dict:
    """Accuracy, cost and per-exit breakdown of dynamic inference at one exit threshold.

    Args:
        probs: softmax probabilities [exits, examples, classes].
        labels: true classes [examples].
        exit_threshold: s.
        costs: MACs of leaving at each exit and of the bare backbone (static mode), the reference for savings.
        groups: shot groups (many / medium / few class ids).
        with_confusion: add each exit's confusion matrix over the examples that leave there.
    """
    confidence, predictions = exit_outcomes(probs)
    where = exit_indices(confidence, exit_threshold)
    result = result_at_exits(predictions, labels, where, probs.shape[2], costs, groups, with_confusion=with_confusion)
    return {**result, "exit_threshold": float(exit_threshold)}


def result_at_exits(predictions: np.ndarray, labels: np.ndarray, where: np.ndarray, num_classes: int,
                    costs: ExitCosts, groups: Mapping[str, Sequence[int]], *, with_confusion: bool = False) -> dict:
    """Metrics of dynamic inference given the exit each example leaves at (`where`, [examples]).

    Split from the threshold so that examples of one report may leave by different s (cross-fitting: each
    half of the test set at the s chosen on the other half).
    """
    num_exits, num_examples = predictions.shape
    chosen = predictions[where, np.arange(num_examples)]
    result = classification_summary(labels, chosen, num_classes, groups)
    result.update(costs.of(where))
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
                  exit_thresholds: Sequence[float], costs: ExitCosts,
                  groups: Mapping[str, Sequence[int]]) -> list[dict]:
    """`dynamic_result` for every s of a sweep, from outcomes computed once (`exit_outcomes`)."""
    return [{**result_at_exits(predictions, labels, exit_indices(confidence, s), num_classes, costs, groups),
             "exit_threshold": float(s)} for s in exit_thresholds]


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


def choose_exit_threshold(sweep: Sequence[Mapping]) -> float:
    """The most accurate s of a sweep (ties: the larger saving)."""
    if not sweep:
        raise ValueError("cannot choose an exit threshold from an empty sweep")
    return float(max(sweep, key=lambda r: (r["top1"], r["saving"]))["exit_threshold"])


class Choice(NamedTuple):
    """An s chosen for a target saving, and whether it reached the target on the images it was chosen on."""

    exit_threshold: float
    reached: bool


def threshold_for_saving(confidence: np.ndarray, costs: ExitCosts, target: float, reading: str = "saving") -> Choice:
    """The s whose saving (under `reading`, a key of READINGS) on these examples is the smallest at or above `target`.

    The paper set s "depending on the desired FLOPS saving". A fixed grid of s moves many examples per step where
    the exits' confidences bunch, so the candidates are the confidences of the intermediate exits themselves: every
    exit assignment that any s gives is among them. The saving never grows with s (examples only move to later,
    dearer exits) and two assignments of equal saving are one assignment (each exit costs more than the one before),
    so the smallest saving reaching the target is found by bisection, and "ties: the more accurate" cannot arise.
    The s returned is the middle of the band of s giving that assignment, so that no example of the choosing images
    sits on it; s above every confidence is NO_EXIT_THRESHOLD. No s reaching the target: the largest saving (every
    example out of the first exit), `reached` False.
    """
    candidates = np.concatenate([[0.0], np.unique(confidence[:-1])])  # s = c: examples with confidence > c leave

    def saving(i: int) -> float:
        return costs.of(exit_indices(confidence, candidates[i]))[reading]

    def first(predicate, lo: int, hi: int) -> int:
        """The first index in [lo, hi) where `predicate` holds (it holds from some index on), else hi."""
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if predicate(mid) else (mid + 1, hi)
        return hi

    reached = saving(0) >= target
    last = len(candidates) - 1
    chosen = first(lambda i: saving(i) < target, 0, len(candidates)) - 1 if reached else 0
    value = saving(chosen)
    band = first(lambda i: saving(i) <= value, 0, chosen + 1)  # the first candidate of the same assignment
    if chosen == last:
        return Choice(NO_EXIT_THRESHOLD, reached)
    middle = (candidates[band] + candidates[chosen + 1]) / 2
    return Choice(float(middle if candidates[band] <= middle < candidates[chosen + 1] else candidates[band]), reached)
