"""How s (the exit threshold) is chosen without choosing on the images it is reported on.

The paper chose s "directly on the test split depending on the desired FLOPS saving" (Sec. IV-B). Choosing and
reporting on the same images is optimistic, and the CIFAR validation split is no substitute: it holds 50 images
per class from the training images the LT subset leaves out, so it has none of the head class and 450 images in
all. We cross-fit instead: the test set is cut once into two class-stratified halves A and B (fixed by a seed);
s is chosen on A and applied to B, and chosen on B and applied to A. Every test image is reported once, at an s
chosen on images other than itself, and the reported metrics are those of the union of both reported halves.
ImageNet-LT has its own validation list (20 per class, every class): there s is chosen on it and the test split
only reports (`VAL_PROTOCOL_DATASETS`). iNaturalist's validation list is also its test split, so it is
cross-fitted like CIFAR. tau-norm's tau is cross-fitted on the same halves under the same protocol
(`crossfit_tau`). Pure numpy on cached probabilities (`har.evaluation.dynamic`) and predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from har.evaluation.dynamic import (
    READINGS,
    Choice,
    ExitCosts,
    choose_exit_threshold,
    exit_indices,
    exit_outcomes,
    result_at_exits,
    sweep_results,
    threshold_for_saving,
)
from har.methods.decoupled import best_tau

CROSSFIT = "crossfit-test-halves"
VAL = "val"
# Datasets whose own validation split (every class, disjoint from the test split) chooses s for the test split.
VAL_PROTOCOL_DATASETS = frozenset({"imagenet_lt"})


def protocol(dataset: str) -> str:
    """The selection protocol of a dataset's test report: `val` for ImageNet-LT, cross-fitting otherwise."""
    return VAL if dataset in VAL_PROTOCOL_DATASETS else CROSSFIT


def stratified_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of halves A and B: each class's examples shuffled by `seed`, the first half of them in A.

    A class with an odd count gives its extra example to A and B in turn (by class id), so the halves differ
    in size by at most one; every class with two or more examples is in both halves. Sorted indices.
    """
    rng = np.random.RandomState(seed)
    first, second = [], []
    odd = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = len(members) // 2
        if len(members) % 2:
            cut += 1 - odd
            odd = 1 - odd
        first.append(members[:cut])
        second.append(members[cut:])
    halves = (np.sort(np.concatenate(first)) if first else np.zeros(0, dtype=np.int64),
              np.sort(np.concatenate(second)) if second else np.zeros(0, dtype=np.int64))
    return halves[0].astype(np.int64), halves[1].astype(np.int64)


def selection_key(reading: str, target: float) -> str:
    """The name of the choice of s for a target saving under a reading (a key of READINGS): `saving>=0.32`."""
    return f"{reading}>={target:g}"


def parse_selection_key(name: str) -> tuple[str, float] | None:
    """(reading, target) of a `selection_key`; None for `best`."""
    reading, sep, target = name.partition(">=")
    return (reading, float(target)) if sep and reading in READINGS else None


def choose_all(confidence: np.ndarray, sweep: Sequence[Mapping], costs: ExitCosts,
               target_savings: Sequence[float]) -> dict[str, Choice]:
    """`best` (the most accurate s of the sweep; `reached` True) and, for each target X and reading R,
    `selection_key(R, X)`: the s whose saving is the smallest at or above X (`threshold_for_saving`)."""
    chosen = {"best": Choice(choose_exit_threshold(sweep), True)}
    chosen.update({selection_key(reading, x): threshold_for_saving(confidence, costs, x, reading)
                   for x in target_savings for reading in READINGS})
    return chosen


def _selected_entry(result: dict, name: str, choices: Sequence[Choice], protocol_name: str) -> dict:
    """A `dynamic_selected` entry: the union's result, the s of each half, the protocol and, for a target, what was
    asked and whether each choosing half reached it."""
    thresholds = [c.exit_threshold for c in choices]
    entry = {**result, "exit_threshold": thresholds[0], "exit_thresholds": thresholds, "protocol": protocol_name}
    if (key := parse_selection_key(name)) is not None:
        entry["target"] = {"reading": key[0], "saving": key[1], "reached": [c.reached for c in choices]}
    return entry


def crossfit_selected(probs: np.ndarray, labels: np.ndarray, halves: tuple[np.ndarray, np.ndarray],
                      exit_thresholds: Sequence[float], target_savings: Sequence[float], costs: ExitCosts,
                      groups: Mapping[str, Sequence[int]], protocol_name: str = CROSSFIT) -> dict[str, dict]:
    """For each choice (`best`, one per target and reading): s chosen on each half, applied to the other, metrics
    of the union.

    Each entry is a `dynamic_result` over all examples plus `exit_thresholds` [s chosen on A (applied to B),
    s chosen on B (applied to A)], `exit_threshold` (the first of them, kept for readers of one s), `protocol` and,
    for a target, `target` {reading, saving, reached [on A, on B]}.
    """
    if not (len(halves[0]) and len(halves[1])):
        raise ValueError(f"cross-fitting needs two non-empty halves, got sizes {len(halves[0])} and {len(halves[1])}")
    confidence, predictions = exit_outcomes(probs)
    num_classes = probs.shape[2]
    chosen_by_half = [choose_all(confidence[:, h], sweep_results(confidence[:, h], predictions[:, h], labels[h],
                                                                 num_classes, exit_thresholds, costs, groups),
                                 costs, target_savings) for h in halves]
    selected = {}
    for name in chosen_by_half[0]:
        choices = [chosen[name] for chosen in chosen_by_half]
        where = crossfit_exits(confidence, halves, [c.exit_threshold for c in choices])
        result = result_at_exits(predictions, labels, where, num_classes, costs, groups, with_confusion=True)
        selected[name] = _selected_entry(result, name, choices, protocol_name)
    return selected


def crossfit_exits(confidence: np.ndarray, halves: tuple[np.ndarray, np.ndarray],
                   exit_thresholds: Sequence[float]) -> np.ndarray:
    """The exit of every example when half B leaves at the s chosen on A and half A at the s chosen on B
    (`exit_thresholds` [s_A, s_B], as the entries of `crossfit_selected` hold them; [s, s] for the val protocol)."""
    where = np.empty(confidence.shape[1], dtype=np.int64)
    for reported, s in ((halves[1], exit_thresholds[0]), (halves[0], exit_thresholds[1])):
        where[reported] = exit_indices(confidence[:, reported], s)
    return where


def chosen_elsewhere_selected(probs: np.ndarray, labels: np.ndarray, chosen: Mapping[str, Choice], costs: ExitCosts,
                              groups: Mapping[str, Sequence[int]], protocol_name: str = VAL) -> dict[str, dict]:
    """Each choice's s, chosen on another split (ImageNet-LT's validation list), applied to all of these examples."""
    confidence, predictions = exit_outcomes(probs)
    selected = {}
    for name, choice in chosen.items():
        result = result_at_exits(predictions, labels, exit_indices(confidence, choice.exit_threshold), probs.shape[2],
                                 costs, groups, with_confusion=True)
        selected[name] = _selected_entry(result, name, [choice, choice], protocol_name)
    return selected


def crossfit_tau(predictions_by_tau: np.ndarray, labels: np.ndarray, taus: Sequence[float],
                 halves: tuple[np.ndarray, np.ndarray]) -> dict:
    """tau-norm's tau chosen by top-1 on each half, to score the other half (as s is in `crossfit_selected`).

    `predictions_by_tau` [taus, examples] holds each candidate tau's final-exit predictions. Returns the test
    report's `tau_selection`: `protocol`, `taus` [tau chosen on A (scores B), tau chosen on B (scores A)] and
    `top1_by_tau` [on A, on B], each {f"{tau:g}": top-1}.
    """
    if not (len(halves[0]) and len(halves[1])):
        raise ValueError(f"cross-fitting needs two non-empty halves, got sizes {len(halves[0])} and {len(halves[1])}")
    scores = [{float(tau): float((predictions_by_tau[i, h] == labels[h]).mean()) for i, tau in enumerate(taus)}
              for h in halves]
    return {"protocol": CROSSFIT, "taus": [best_tau(s) for s in scores],
            "top1_by_tau": [{f"{tau:g}": s[tau] for tau in sorted(s)} for s in scores]}
