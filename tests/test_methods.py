"""Mixup, Manifold Mixup and the decoupled second stage (cRT, LWS, tau-norm): each one's defining behaviour."""

import json

import numpy as np
import pytest
import torch
from test_train import tiny_config

import har.engine.trainer as trainer_module
from har.config import ConfigError, from_dict
from har.engine.checkpoint import RunError, load_checkpoint
from har.engine.trainer import build_model, train
from har.evaluation.evaluate import evaluate_run
from har.methods import decoupled
from har.methods.mixup import Mixing, draw_mixing
from har.models import create_model

PLAIN = {"model": {"layout": "CBBBE"}, "loss": {"har": False, "reweight": "none"}}


def plain_config(**sections):
    merged = {key: dict(PLAIN.get(key, {})) for key in PLAIN}
    for section, fields in sections.items():
        merged.setdefault(section, {}).update(fields)
    return tiny_config(**merged)


def weights(run_dir):
    return load_checkpoint(run_dir / "last.pt")["model"]


def test_mixup_with_lambda_one_equals_plain_training(tmp_path, tiny_data, monkeypatch):
    train(plain_config(), tmp_path / "plain", data=tiny_data)

    def never_mixes(alpha, seed, epoch, step, batch, device):
        return Mixing(1.0, torch.randperm(batch))

    for kind in ("input", "manifold"):
        monkeypatch.setattr(trainer_module, "draw_mixing", never_mixes)
        history = train(plain_config(train={"mixup": kind}), tmp_path / kind, data=tiny_data)
        plain, mixed = weights(tmp_path / "plain"), weights(tmp_path / kind)
        assert all(torch.equal(plain[k], mixed[k]) for k in plain), kind
        assert [r["loss"] for r in history] == [json.loads(line)["loss"] for line in
                                                (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]


def test_mixup_trains_on_mixed_images_and_mixed_targets(tmp_path, tiny_data):
    plain = train(plain_config(), tmp_path / "plain", data=tiny_data)
    mixed = train(plain_config(train={"mixup": "input"}), tmp_path / "mixup", data=tiny_data)
    manifold = train(plain_config(train={"mixup": "manifold"}), tmp_path / "manifold", data=tiny_data)
    assert plain[0]["loss"] != mixed[0]["loss"] != manifold[0]["loss"]
    assert all(np.isfinite(r["loss"]) for r in mixed + manifold)


def test_draws_are_reproducible_and_lambda_follows_beta():
    a = draw_mixing(1.0, 0, 3, 7, 16, torch.device("cpu"))
    b = draw_mixing(1.0, 0, 3, 7, 16, torch.device("cpu"))
    assert a.lam == b.lam and torch.equal(a.perm, b.perm) and sorted(a.perm.tolist()) == list(range(16))
    lams = np.array([draw_mixing(0.2, 0, 0, s, 4, torch.device("cpu")).lam for s in range(4000)])
    # Beta(0.2, 0.2): mean 0.5, variance 1 / (4 * 1.4); most mass near 0 and 1
    assert lams.mean() == pytest.approx(0.5, abs=0.03) and lams.var() == pytest.approx(1 / 5.6, abs=0.02)


def test_manifold_mixup_mixes_the_pooled_features_of_the_final_classifier():
    torch.manual_seed(0)
    model = create_model("resnet32", 3, layout="CEBBBE").eval()
    x = torch.randn(4, 3, 32, 32)
    mixing = Mixing(0.3, torch.tensor([1, 0, 3, 2]))
    with torch.no_grad():
        plain = model(x)
        mixed = model(x, mix_features=mixing)
        features = model.pooled_features(x)
    assert torch.equal(plain[0], mixed[0])  # the exit before the mixing point sees unmixed features
    expected = model.backbone.classifier(0.3 * features + 0.7 * features[[1, 0, 3, 2]])
    assert torch.allclose(mixed[-1], expected, atol=1e-6)


def test_class_balanced_order_draws_every_class_equally_often():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    draws = torch.cat([decoupled.class_balanced_order(labels, torch.Generator().manual_seed(s)) for s in range(20)])
    per_class = torch.bincount(labels[draws], minlength=3).float() / len(draws)
    assert torch.allclose(per_class, torch.full((3,), 1 / 3), atol=0.01)
    assert set(draws[labels[draws] == 2].tolist()) == set(range(990, 1000))  # every rare example is drawn


@pytest.fixture
def stage_one(tmp_path, tiny_data):
    folder = tmp_path / "stage1"
    train(plain_config(), folder, data=tiny_data)
    return folder


def stage_two_config(stage_one, method, **sections):
    values = {"decouple": {"method": method, "stage_one": str(stage_one)},
              "train": {"epochs": 2, "lr": 0.5, "schedule": "cosine", "warmup_epochs": 0}}
    for section, fields in sections.items():
        values.setdefault(section, {}).update(fields)
    return plain_config(**values)


def backbone_state(state):
    return {k: v for k, v in state.items() if "classifier" not in k}


def test_crt_retrains_only_a_fresh_classifier_and_leaves_the_backbone_unchanged(tmp_path, tiny_data, stage_one):
    history = train(stage_two_config(stage_one, "crt"), tmp_path / "crt", data=tiny_data)
    before, after = weights(stage_one), weights(tmp_path / "crt")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in backbone_state(before))  # BN statistics included
    assert not torch.equal(before["backbone.classifier.weight"], after["backbone.classifier.weight"])
    assert len(history) == 2 and evaluate_run(tmp_path / "crt", data=tiny_data)["test"]["static"]["top1"] >= 0


def test_lws_learns_only_per_class_scales(tmp_path, tiny_data, stage_one):
    train(stage_two_config(stage_one, "lws"), tmp_path / "lws", data=tiny_data)
    before, after = weights(stage_one), weights(tmp_path / "lws")
    assert all(torch.equal(before[k], after[k]) for k in backbone_state(before))
    assert torch.equal(before["backbone.classifier.weight"], after["backbone.classifier.classifier.weight"])
    assert not torch.equal(after["backbone.classifier.scales"], torch.ones(3))
    evaluate_run(tmp_path / "lws", data=tiny_data)  # the evaluation builds the same scaled classifier


def test_tau_zero_leaves_the_classifier_unchanged_and_tau_is_chosen_on_val(tmp_path, tiny_data, stage_one):
    history = train(stage_two_config(stage_one, "tau_norm", decouple={"taus": [0.0]}), tmp_path / "tau0",
                    data=tiny_data)
    assert history[0]["tau"] == 0.0
    before, after = weights(stage_one), weights(tmp_path / "tau0")
    assert all(torch.equal(before[k], after[k]) for k in before)
    history = train(stage_two_config(stage_one, "tau_norm"), tmp_path / "tau", data=tiny_data)
    scores = history[0]["val_top1_by_tau"]
    assert len(scores) == 21 and scores[f"{history[0]['tau']:g}"] == max(scores.values())
    tau = history[0]["tau"]
    w = before["backbone.classifier.weight"]
    norm = w.norm(dim=1) ** tau
    assert torch.allclose(weights(tmp_path / "tau")["backbone.classifier.weight"], w / norm[:, None])
    evaluate_run(tmp_path / "tau", data=tiny_data)


def test_tau_normalize_divides_by_the_norm_power():
    layer = torch.nn.Linear(4, 3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    decoupled.tau_normalize(layer, 1.0)
    assert torch.allclose(layer.weight.norm(dim=1), torch.ones(3))
    assert torch.allclose(layer.bias, b / w.norm(dim=1))


def test_stage_two_refuses_a_missing_unfinished_or_mismatched_stage_one(tmp_path, tiny_data, stage_one):
    with pytest.raises(ConfigError, match="decouple.stage_one"):
        from_dict({"decouple": {"method": "crt"}})
    with pytest.raises(RunError, match="not a trained run folder"):
        train(stage_two_config(tmp_path / "nothing", "crt"), tmp_path / "a", data=tiny_data)
    wrong = stage_two_config(stage_one, "crt", model={"layout": "CEBBBE"})
    with pytest.raises(RunError, match="model.layout"):
        train(wrong, tmp_path / "b", data=tiny_data)
    cosine = stage_two_config(stage_one, "crt", model={"classifier": "cosine", "layout": "CBBBE"})
    with pytest.raises(RunError, match="classifier"):
        train(cosine, tmp_path / "c", data=tiny_data)
    with pytest.raises(ConfigError, match="tau-norm rescales a linear"):
        stage_two_config(stage_one, "tau_norm", loss={"name": "ldam"})


def test_lws_model_structure_is_built_for_evaluation():
    cfg = from_dict({"model": {"layout": "CBBBE"}, "decouple": {"method": "lws", "stage_one": "x"}})
    assert isinstance(build_model(cfg, 3).backbone.classifier, decoupled.LearnedScales)
