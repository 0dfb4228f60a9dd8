"""Metrics and dynamic evaluation from cached per-exit outputs."""

import numpy as np
import pytest

from har.evaluation.dynamic import (
    NO_EXIT_THRESHOLD,
    READINGS,
    ExitCosts,
    choose_exit_threshold,
    default_exit_thresholds,
    dynamic_result,
    exit_indices,
    exit_outcomes,
    softmax,
    sweep_results,
    threshold_for_saving,
)
from har.evaluation.metrics import confusion_matrix, per_class_accuracy, shot_accuracy

GROUPS = {"many": [0], "medium": [1], "few": [2]}
# A MACs table of a backbone of 100 with heads of 5 and 15 before its classifier: leaving at each exit costs the
# trunk 5 / 40 / 100, plus the heads so far 10 / 60 / 120.
TABLE = {"backbone_macs": 100, "exits": [{"head_macs": 5, "cumulative_macs": 10},
                                         {"head_macs": 15, "cumulative_macs": 60},
                                         {"head_macs": 0, "cumulative_macs": 120}]}
COSTS = ExitCosts.from_table(TABLE)


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


def test_both_saving_readings_from_a_macs_table():
    assert COSTS == ExitCosts((10.0, 60.0, 120.0), (5.0, 40.0, 100.0), 100.0)
    assert set(READINGS) == {"saving", "saving_trunk"}


def test_dynamic_costs_and_s_above_one_sends_everything_to_the_last_exit():
    probs = probs_from([[0.95, 0.5, 0.6, 0.9], [0.99, 0.97, 0.7, 0.5], [0.99, 0.99, 0.99, 0.99]])
    labels = np.array([0, 0, 1, 0])
    r = dynamic_result(probs, labels, 0.9, COSTS, GROUPS, with_confusion=True)
    assert [e["fraction"] for e in r["per_exit"]] == [0.25, 0.25, 0.5]
    assert r["mean_macs"] == pytest.approx((10 + 60 + 120 + 120) / 4)
    assert r["saving"] == pytest.approx(1 - 77.5 / 100)
    assert r["saving_trunk"] == pytest.approx(1 - (5 + 40 + 100 + 100) / 4 / 100)
    assert r["top1"] == 0.75 and r["per_exit"][2]["accuracy"] == 0.5
    assert r["per_exit"][2]["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 0, 0]]
    everything_last = dynamic_result(probs, labels, 1.01, COSTS, GROUPS)
    assert [e["fraction"] for e in everything_last["per_exit"]] == [0, 0, 1]
    assert everything_last["saving"] == pytest.approx(-0.2)  # minus the heads' cost
    assert everything_last["saving_trunk"] == pytest.approx(0.0, abs=1e-12)  # heads not counted: the static model


def test_choose_exit_threshold_on_a_sweep():
    sweep = [{"exit_threshold": 0.5, "top1": 0.70, "saving": 0.40},
             {"exit_threshold": 0.8, "top1": 0.78, "saving": 0.20},
             {"exit_threshold": 0.9, "top1": 0.78, "saving": 0.10},
             {"exit_threshold": 1.01, "top1": 0.79, "saving": -0.1}]
    assert choose_exit_threshold(sweep) == 1.01
    with pytest.raises(ValueError):
        choose_exit_threshold([])


TWO_EXITS = ExitCosts((10.0, 110.0), (5.0, 100.0), 100.0)  # a head of 5 before the backbone's classifier


@pytest.mark.parametrize(("target", "reading", "s", "reached"), [
    (0.5, "saving", 0.3, True),  # 2 of 3 out early save 0.567, 1 of 3 0.233: the two above s = 0.3 leave
    (0.2, "saving", 0.5, True),  # 0.233: only the example at 0.6 leaves, s in the middle of [0.4, 0.6)
    (0.95, "saving", 0.1, False),  # all out early save 0.9 at most: the largest saving, s below every confidence
    (-0.2, "saving", NO_EXIT_THRESHOLD, True),  # all at the last exit (-0.1) already reaches it
    (0.32, "saving_trunk", 0.3, True),  # trunk savings: 0.95, 0.633, 0.317, 0
    (0.3, "saving_trunk", 0.5, True),
    (0.0, "saving_trunk", NO_EXIT_THRESHOLD, True),  # no head counted: the static model saves exactly 0
])
def test_s_for_a_target_saves_the_least_at_or_above_it_from_the_middle_of_its_band(target, reading, s, reached):
    confidence = np.array([[0.2, 0.4, 0.6], [0.5, 0.5, 0.5]])
    choice = threshold_for_saving(confidence, TWO_EXITS, target, reading)
    assert choice.exit_threshold == pytest.approx(s) and choice.reached == reached


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("target", [0.05, 0.15, 0.25, 0.32])
def test_s_chosen_on_bunched_confidences_reaches_a_target_within_a_point_on_other_images(reading, target):
    """LDAM's raw-cosine confidences bunch (here around 0.125, sd 0.003): the s sweep's step of 0.005 moves about
    half the images at once, while s chosen from the confidences themselves saves the least at or above the target
    on the images it was chosen on and lands within a point of it on others drawn alike (ResNet-32's MACs)."""
    heads, cumulative = (4719232, 4719232, 1770112, 0), (5161600, 33473792, 57657216, 80071168)  # docs/method.md
    costs = ExitCosts.from_table({"backbone_macs": 68862592, "exits": [
        {"head_macs": h, "cumulative_macs": c} for h, c in zip(heads, cumulative, strict=True)]})
    assert costs.trunk == (442368.0, 24035328.0, 46448640.0, 68862592.0)
    rng = np.random.default_rng(0)
    chosen_on, reported_on = (rng.normal(0.125, 0.003, size=(4, 20000)) for _ in range(2))
    choice = threshold_for_saving(chosen_on, costs, target, reading)
    assert choice.reached
    here = costs.of(exit_indices(chosen_on, choice.exit_threshold))[reading]
    assert target <= here < target + 0.001  # one image moves the saving by less than 1.1 / 20000
    assert abs(costs.of(exit_indices(reported_on, choice.exit_threshold))[reading] - target) < 0.01
    coarse = [s for s in np.arange(0.1, 0.15, 0.005) if costs.of(exit_indices(chosen_on, s))[reading] >= target]
    assert costs.of(exit_indices(chosen_on, max(coarse)))[reading] > target + 0.02  # the sweep's step overshoots


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
    sweep = sweep_results(confidence, predictions, labels, 3, thresholds, COSTS, GROUPS)
    assert sweep == [dynamic_result(probs, labels, s, COSTS, GROUPS) for s in thresholds]
