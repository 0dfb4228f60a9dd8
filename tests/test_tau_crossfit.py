"""tau-norm's tau cross-fitted on the test halves: chosen on one half, reported on the other, every class in both."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import synthetic_data
from test_methods import plain_config, stage_two_config

import har.evaluation.selection as selection
from har.config import from_dict
from har.data.batches import eval_batches
from har.engine.trainer import train
from har.errors import RunError
from har.evaluation.evaluate import crossfit_tau_norm, evaluate_from_cache, evaluate_run
from har.methods import decoupled
from har.run.assembly import build_model
from har.run.checkpoint import atomic_save, load_checkpoint

# Norms 5, 1, 2. Bias-free logits by hand: tau 0 -> f @ W.T; tau 1 -> [0.6 f1 + 0.8 f2, f1, f2 / 1].
WEIGHT = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
# Half A: two class-0 images right only at tau 0 ([1, 0]: [3, 1, 0] vs [0.6, 1, 0]; [0, 1]: [4, 0, 2] vs
# [0.8, 0, 1]) and images of classes 1 and 2 right at both. Half B: a class-1 and a class-2 image right only at
# tau 1 and a class-0 image right at both.
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [-1.0, 1.0],  # A
                         [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # B
LABELS = np.array([0, 0, 1, 2, 1, 2, 0])
HALVES = (np.array([0, 1, 2, 3]), np.array([4, 5, 6]))


def test_each_half_is_scored_with_the_tau_chosen_on_the_other():
    final, record = crossfit_tau_norm(FEATURES, WEIGHT, LABELS, HALVES, (0.0, 1.0))
    assert record["protocol"] == selection.CROSSFIT
    assert record["taus"] == [0.0, 1.0]  # A prefers tau 0, B tau 1
    assert record["top1_by_tau"][0] == {"0": 1.0, "1": 0.5}
    assert record["top1_by_tau"][1] == pytest.approx({"0": 1 / 3, "1": 1.0})
    # B reported at tau 0, A at tau 1: of B only [1, 1] (class 0) is right, of A the class-1 and class-2 images
    assert float((final.argmax(1) == LABELS).mean()) == pytest.approx(3 / 7)
    by_hand = {0: FEATURES @ WEIGHT.T, 1: FEATURES @ (WEIGHT / WEIGHT.norm(dim=1, keepdim=True)).T}
    assert np.allclose(final[HALVES[1]], by_hand[0][HALVES[1]].numpy())
    assert np.allclose(final[HALVES[0]], by_hand[1][HALVES[0]].numpy())
    assert all(set(LABELS[h]) == {0, 1, 2} for h in HALVES)


def test_a_tie_goes_to_the_smallest_tau():
    assert decoupled.best_tau({1.0: 0.5, 0.5: 0.5, 2.0: 0.25}) == 0.5


@pytest.fixture(scope="module")
def tau_run(tmp_path_factory):
    root, data = tmp_path_factory.mktemp("tau"), synthetic_data()
    train(plain_config(), root / "stage1", data=data)
    train(stage_two_config(root / "stage1", "tau_norm"), root / "tau", data=data)
    return root / "tau", data


def pooled_test_features(run, data):
    """The test split's pooled features under the run's checkpoint, and that checkpoint."""
    cfg, ckpt = from_dict(yaml.safe_load((run / "config.yaml").read_text())), load_checkpoint(run / "last.pt")
    model = build_model(cfg, data.num_classes)
    model.load_state_dict(ckpt["model"])
    cpu = torch.device("cpu")
    features = decoupled.pooled_features(model, eval_batches(data.test, cfg.data, cfg.eval.batch_size, cpu))
    return cfg, ckpt, features


def test_evaluation_writes_the_cross_fitted_final_logits(tau_run):
    run, data = tau_run
    reports = evaluate_run(run, device="cpu", data=data)
    test, record = reports["test"], reports["test"]["tau_selection"]
    assert "tau_selection" not in reports["val"]
    cfg, ckpt, features = pooled_test_features(run, data)
    halves = selection.stratified_halves(data.test.labels, cfg.data.seed)
    assert all(set(data.test.labels[h]) == set(range(data.num_classes)) for h in halves)
    # the checkpoint keeps stage one's weight, untouched by the val-chosen tau
    stage_one = load_checkpoint(run.parent / "stage1" / "last.pt")["model"]["backbone.classifier.weight"]
    assert torch.equal(ckpt[decoupled.STAGE_ONE_WEIGHT], stage_one)
    cached = np.load(run / "eval" / "test.npz")
    for half, tau in ((halves[1], record["taus"][0]), (halves[0], record["taus"][1])):
        want = decoupled.tau_logits(features[torch.from_numpy(half)], stage_one, tau)
        assert np.allclose(cached["logits"][-1][half], want.numpy(), atol=1e-5)
    for top1, half, tau in zip(record["top1_by_tau"], halves, record["taus"], strict=True):
        predictions = decoupled.tau_predictions(features[torch.from_numpy(half)], stage_one, cfg.decouple.taus)
        by_hand = (predictions == torch.from_numpy(data.test.labels[half])).float().mean(1).tolist()
        assert list(top1.values()) == pytest.approx(by_hand) and len(top1) == len(cfg.decouple.taus)
        assert tau == decoupled.best_tau(dict(zip(cfg.decouple.taus, by_hand, strict=True)))
    static = (cached["logits"][-1].argmax(1) == data.test.labels).mean()
    assert test["static"]["top1"] == pytest.approx(static)


def test_the_cross_fitted_tau_norm_reports_again_from_its_cache(tau_run, tmp_path):
    """The cache holds the cross-fitted final logits and the record of tau's choice; an older cache without the
    record takes it from the existing report."""
    run, data = tau_run
    written = evaluate_run(run, device="cpu", data=data)["test"]
    again = tmp_path / "tau"
    shutil.copytree(run, again)
    (again / "last.pt").unlink()
    test = evaluate_from_cache(again)["test"]
    assert test["tau_selection"] == written["tau_selection"]
    assert {k: v for k, v in test.items() if k != "run"} == {k: v for k, v in written.items() if k != "run"}
    with np.load(again / "eval" / "test.npz") as cached:
        older = {"logits": cached["logits"], "labels": cached["labels"]}
    np.savez_compressed(again / "eval" / "test.npz", **older)
    assert evaluate_from_cache(again)["test"]["tau_selection"] == written["tau_selection"]


def test_under_the_val_protocol_the_test_split_keeps_the_val_chosen_tau(tau_run, monkeypatch):
    run, data = tau_run
    monkeypatch.setattr(selection, "protocol", lambda dataset: selection.VAL)  # as for ImageNet-LT
    test = evaluate_run(run, device="cpu", data=data)["test"]
    assert "tau_selection" not in test
    _, ckpt, features = pooled_test_features(run, data)
    val_chosen = features @ ckpt["model"]["backbone.classifier.weight"].T  # bias zero
    assert np.allclose(np.load(run / "eval" / "test.npz")["logits"][-1], val_chosen.numpy(), atol=1e-5)


def test_a_tau_norm_checkpoint_without_stage_ones_weight_is_refused(tau_run, tmp_path):
    run, data = tau_run
    ckpt = load_checkpoint(run / "last.pt")
    saved = dict(ckpt)
    del ckpt[decoupled.STAGE_ONE_WEIGHT]
    atomic_save(ckpt, run / "last.pt")
    for name in ("val.json", "val.npz"):
        (run / "eval" / name).unlink(missing_ok=True)
    try:
        with pytest.raises(RunError, match=f"holds no {decoupled.STAGE_ONE_WEIGHT}.*run har train again"):
            evaluate_run(run, device="cpu", data=data)
        assert not (run / "eval" / "val.json").exists()  # refused before the first split is written
    finally:
        atomic_save(saved, run / "last.pt")
