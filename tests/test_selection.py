"""Choosing s without choosing on the reported images: class-stratified halves of the test set, cross-fitted."""

import numpy as np
import pytest

from har.evaluation.dynamic import ExitCosts
from har.evaluation.selection import (
    CROSSFIT,
    crossfit_selected,
    parse_selection_key,
    protocol,
    selection_key,
    stratified_halves,
)

GROUPS = {"many": [0], "medium": [1], "few": []}
# Two exits: the first costs 10 of the backbone's 100 with its head (5 without), the last the backbone alone.
COSTS = ExitCosts((10.0, 100.0), (5.0, 100.0), 100.0)


def two_class_probs(confidence, predicted):
    """probs [exits, examples, 2] whose predicted class and max probability are given per exit and example."""
    c, p = np.asarray(confidence, dtype=float), np.asarray(predicted)
    probs = np.empty(c.shape + (2,))
    probs[..., 0] = np.where(p == 0, c, 1 - c)
    probs[..., 1] = 1 - probs[..., 0]
    return probs


def test_halves_are_disjoint_cover_the_split_and_hold_every_class():
    labels = np.repeat(np.arange(10), [7, 2, 3, 50, 5, 9, 2, 4, 11, 6])
    a, b = stratified_halves(labels, seed=0)
    assert len(np.intersect1d(a, b)) == 0 and np.array_equal(np.union1d(a, b), np.arange(len(labels)))
    assert abs(len(a) - len(b)) <= 1
    for c in range(10):
        assert (labels[a] == c).any() and (labels[b] == c).any()
        assert abs((labels[a] == c).sum() - (labels[b] == c).sum()) <= 1
    again = stratified_halves(labels, seed=0)
    assert np.array_equal(again[0], a) and np.array_equal(again[1], b)  # fixed by the seed


def test_each_half_is_reported_at_the_s_chosen_on_the_other():
    """Half A rewards exiting early (s = 0.5), half B punishes it (s = 0.9); choosing s on the images it reports
    would give top-1 1.0 on both, cross-fitting reports each half at the other's s: every image wrong."""
    labels = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    a, b = stratified_halves(labels, seed=3)
    in_a = np.isin(np.arange(8), a)
    early = np.where(in_a, labels, 1 - labels)  # exit 0: right on A, wrong on B
    last = np.where(in_a, 1 - labels, labels)  # last exit: wrong on A, right on B
    probs = two_class_probs([[0.8] * 8, [0.6] * 8], [early, last])
    selected = crossfit_selected(probs, labels, (a, b), [0.5, 0.9], [], COSTS, GROUPS)["best"]
    assert selected["exit_thresholds"] == [0.5, 0.9] and selected["exit_threshold"] == 0.5
    assert selected["protocol"] == CROSSFIT
    assert selected["top1"] == 0.0
    assert [e["fraction"] for e in selected["per_exit"]] == [0.5, 0.5]  # B leaves early, A goes on
    assert sum(e["class_counts"][c] for e in selected["per_exit"] for c in (0, 1)) == 8  # every image once


def test_dynamic_top1_at_a_target_saving():
    """Two identical halves: each picks the s saving the least at or above the target, under each reading, and
    the union reports it."""
    half_labels = np.array([0, 0, 0, 1, 1, 1])
    conf0 = [0.95, 0.75, 0.55, 0.95, 0.75, 0.55]
    right0 = np.array([True, False, False, True, False, False])
    labels = np.concatenate([half_labels, half_labels])
    early = np.where(np.tile(right0, 2), labels, 1 - labels)
    probs = two_class_probs([conf0 * 2, [0.6] * 12], [early, labels])
    halves = (np.arange(6), np.arange(6, 12))
    # heads counted: all out early save 0.9, the four above 0.55 save 0.6, the two above 0.75 save 0.3, none 0;
    # heads not counted: 0.95, 0.633, 0.317, 0
    selected = crossfit_selected(probs, labels, halves, [0.5, 0.7, 0.9, 1.01], [0.5, 0.95], COSTS, GROUPS)
    assert set(selected) == {"best", "saving>=0.5", "saving>=0.95", "saving_trunk>=0.5", "saving_trunk>=0.95"}
    at_half = selected["saving>=0.5"]
    assert at_half["exit_thresholds"] == pytest.approx([0.65, 0.65])  # the middle of [0.55, 0.75)
    assert at_half["top1"] == pytest.approx(4 / 6) and at_half["saving"] == pytest.approx(0.6)
    assert at_half["saving_trunk"] == pytest.approx(1 - (4 * 5 + 2 * 100) / 600)
    assert at_half["target"] == {"reading": "saving", "saving": 0.5, "reached": [True, True]}
    assert [e["fraction"] for e in at_half["per_exit"]] == pytest.approx([4 / 6, 2 / 6])
    assert selected["saving_trunk>=0.5"]["exit_thresholds"] == pytest.approx([0.65, 0.65])
    unreachable = selected["saving>=0.95"]  # no s saves that much: the largest saving, every image out early
    assert unreachable["exit_thresholds"] == pytest.approx([0.275, 0.275])  # the middle of [0, 0.55)
    assert unreachable["top1"] == pytest.approx(2 / 6) and unreachable["target"]["reached"] == [False, False]
    assert selected["best"]["top1"] == 1.0 and selected["best"]["saving"] == pytest.approx(0.3)
    assert "target" not in selected["best"]


def test_selection_keys_name_the_reading_and_the_target():
    assert selection_key("saving", 0.32) == "saving>=0.32"
    assert selection_key("saving_trunk", 0.05) == "saving_trunk>=0.05"
    assert parse_selection_key("saving_trunk>=0.32") == ("saving_trunk", 0.32) and parse_selection_key("best") is None


def test_empty_half_is_refused():
    probs = two_class_probs([[0.8, 0.8], [0.6, 0.6]], [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match="two non-empty halves"):
        crossfit_selected(probs, np.array([0, 1]), (np.arange(2), np.arange(0)), [0.5], [], COSTS, GROUPS)


def test_imagenet_lt_chooses_on_its_validation_list_and_the_others_cross_fit():
    assert protocol("imagenet_lt") == "val"
    assert {protocol(d) for d in ("cifar10", "cifar100", "inat2018")} == {CROSSFIT}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import synthetic_data

    from har.config import from_dict
    from har.engine.trainer import train

    cfg = from_dict({"data": {"dataset": "cifar10"}, "loss": {"name": "ce", "train_threshold": 0.5},
                     "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0, "device": "cpu"},
                     "eval": {"exit_thresholds": [0.0, 0.4, 0.6, 0.8, 1.01]}})
    run, data = tmp_path_factory.mktemp("sel") / "run", synthetic_data()
    train(cfg, run, data=data)
    return run, data


def test_evaluation_reports_each_target_saving_cross_fitted_on_the_test_halves(trained_run):
    from har.evaluation.evaluate import evaluate_run

    run, data = trained_run
    test = evaluate_run(run, device="cpu", data=data, target_savings=[0.1, 0.3])["test"]
    assert set(test["dynamic_selected"]) == {"best", "saving>=0.1", "saving>=0.3", "saving_trunk>=0.1",
                                             "saving_trunk>=0.3"}  # not the config's 0.25
    assert test["selection_protocol"] == CROSSFIT and sorted(test["halves"]["sizes"]) == [9, 9]
    for name, entry in test["dynamic_selected"].items():
        assert entry["protocol"] == CROSSFIT and entry["exit_threshold"] == entry["exit_thresholds"][0]
        assert test["exit_thresholds_chosen"][name] == entry["exit_thresholds"]
        assert sum(sum(e["class_counts"]) for e in entry["per_exit"]) == len(data.test.labels)
        assert all("confusion" in e for e in entry["per_exit"])


def test_under_the_val_protocol_the_test_split_reports_the_s_chosen_on_val(trained_run, monkeypatch):
    import har.evaluation.selection as selection
    from har.evaluation.dynamic import exit_outcomes, softmax
    from har.evaluation.evaluate import evaluate_run

    run, data = trained_run
    monkeypatch.setattr(selection, "protocol", lambda dataset: selection.VAL)  # as for ImageNet-LT
    reports = evaluate_run(run, device="cpu", data=data, target_savings=[0.3])
    confidence = exit_outcomes(softmax(np.load(run / "eval" / "val.npz")["logits"]))[0]
    on_val = selection.choose_all(confidence, reports["val"]["dynamic_sweep"],
                                  ExitCosts.from_table(reports["val"]["flops"]), [0.3])
    test = reports["test"]
    assert test["selection_protocol"] == "val"
    assert test["exit_thresholds_chosen"] == {name: [c.exit_threshold] * 2 for name, c in on_val.items()}
    assert test["dynamic_selected"]["saving>=0.3"]["target"]["reached"] == [on_val["saving>=0.3"].reached] * 2
