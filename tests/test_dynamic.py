"""Metrics and dynamic evaluation from cached per-exit outputs."""

import numpy as np
import pytest

from har.evaluation.dynamic import (
    choose_exit_threshold,
    default_exit_thresholds,
    dynamic_result,
    exit_indices,
    exit_outcomes,
    softmax,
    sweep_results,
)
from har.evaluation.metrics import confusion_matrix, per_class_accuracy, shot_accuracy

GROUPS = {"many": [0], "medium": [1], "few": [2]}


def test_per_class_and_shot_accuracy_are_unweighted_means_and_empty_groups_are_none():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 0, 1, 1, 0, 2])
    acc = per_class_accuracy(labels, preds, 4)
    assert acc[:3].tolist() == [0.75, 0.5, 1.0] and np.isnan(acc[3])
    shots = shot_accuracy(acc, {"many": [0, 1], "medium": [2, 3], "few": []})
    assert shots == {"many": pytest.approx(0.625), "medium": 1.0, "few": None}
    cm = confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 1]]


def probs_from(confidences):
    """probs [exits, examples, 3] whose predicted class is 0 with the given max probability."""
    c = np.asarray(confidences, dtype=float)
    rest = (1 - c) / 2
    return np.stack([c, rest, rest], axis=-1)


def test_exit_rule_is_first_confidence_strictly_above_s():
    conf = np.array([[0.95, 0.5, 0.2], [0.99, 0.9, 0.3], [0.1, 0.2, 0.4]])
    assert exit_indices(conf.copy(), 0.85).tolist() == [0, 1, 2]
    assert exit_indices(conf.copy(), 0.9).tolist() == [0, 2, 2]  # 0.9 is not > 0.9
    assert exit_indices(conf.copy(), 0.95).tolist() == [1, 2, 2]  # 0.95 is not > 0.95
    assert exit_indices(conf.copy(), 0.0).tolist() == [0, 0, 0]


def test_dynamic_costs_and_s_above_one_sends_everything_to_the_last_exit():
    probs = probs_from([[0.95, 0.5, 0.6, 0.9], [0.99, 0.97, 0.7, 0.5], [0.99, 0.99, 0.99, 0.99]])
    labels = np.array([0, 0, 1, 0])
    exit_macs = [10.0, 60.0, 120.0]  # the last exit: backbone 100 + heads 20
    r = dynamic_result(probs, labels, 0.9, exit_macs, 100.0, GROUPS, with_confusion=True)
    assert [e["fraction"] for e in r["per_exit"]] == [0.25, 0.25, 0.5]
    assert r["mean_macs"] == pytest.approx((10 + 60 + 120 + 120) / 4)
    assert r["saving"] == pytest.approx(1 - 77.5 / 100)
    assert r["top1"] == 0.75 and r["per_exit"][2]["accuracy"] == 0.5
    assert r["per_exit"][2]["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    everything_last = dynamic_result(probs, labels, 1.01, exit_macs, 100.0, GROUPS)
    assert [e["fraction"] for e in everything_last["per_exit"]] == [0, 0, 1]
    assert everything_last["saving"] == pytest.approx(-0.2)  # minus the heads' cost


def test_choose_exit_threshold_on_a_sweep():
    sweep = [{"exit_threshold": 0.5, "top1": 0.70, "saving": 0.40},
             {"exit_threshold": 0.8, "top1": 0.78, "saving": 0.20},
             {"exit_threshold": 0.9, "top1": 0.78, "saving": 0.10},
             {"exit_threshold": 1.01, "top1": 0.79, "saving": -0.1}]
    assert choose_exit_threshold(sweep) == 1.01
    assert choose_exit_threshold(sweep, 0.15) == 0.8
    assert choose_exit_threshold(sweep, 0.5) == 0.5  # unreachable target: the largest saving
    with pytest.raises(ValueError):
        choose_exit_threshold([])


def test_softmax_rows_sum_to_one_and_are_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]]))
    assert p.sum(1) == pytest.approx([1, 1]) and p[0].tolist() == [0.5, 0.5] and p[1, 1] == pytest.approx(0.75)


def test_default_sweep_spans_the_confidence_range_of_each_classifier():
    linear = default_exit_thresholds(10, "linear")
    assert linear[0] == 0.1 and linear[-2] == 1.0 and linear[-1] == 1.01
    assert all(b - a == pytest.approx(0.005) for a, b in zip(linear, linear[1:-1]))
    cosine = default_exit_thresholds(100, "cosine")
    top = np.e / (np.e + 99 / np.e)  # softmax of cosines (1, -1, ..., -1): the largest reachable
    assert cosine[0] == 0.01 and top - 0.0005 < cosine[-2] <= top < 0.07 < cosine[-1]
    assert all(a < b for a, b in zip(cosine, cosine[1:]))


def test_cosine_sweep_at_1000_classes_holds_the_papers_imagenet_s():
    """Steps of 0.05 / C, rounded to significant digits: 1.7, 1.75 and 1.8 x 1e-3 are grid points."""
    cosine = default_exit_thresholds(1000, "cosine")
    assert {0.0017, 0.00175, 0.0018} <= set(cosine)
    top = np.e / (np.e + 999 / np.e)
    assert max(cosine[:-1]) <= top < cosine[-1]  # the last value is above the ceiling: nobody exits early
    assert len(cosine) == len(set(cosine))


def test_sweep_from_outcomes_equals_dynamic_result_per_s():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(size=(3, 40, 3)) * 2)
    labels = rng.integers(0, 3, 40)
    confidence, predictions = exit_outcomes(probs)
    thresholds = [0.4, 0.6, 0.8, 1.01]
    sweep = sweep_results(confidence, predictions, labels, 3, thresholds, [10.0, 60.0, 120.0], 100.0, GROUPS)
    assert sweep == [dynamic_result(probs, labels, s, [10.0, 60.0, 120.0], 100.0, GROUPS) for s in thresholds]
