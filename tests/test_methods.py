"""Mixup, Manifold Mixup and the decoupled second stage (cRT, LWS, tau-norm): each one's defining behaviour."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import tiny_config

import har.engine.run_state as run_state_module
from har.config import from_dict
from har.engine.step import StepLoss
from har.engine.trainer import train
from har.errors import ConfigError, RunError
from har.evaluation.evaluate import evaluate_run
from har.methods import decoupled
from har.methods.mixup import MANIFOLD_LAYERS, Mixing, draw_mixing
from har.models import create_model
from har.run.assembly import build_loss, build_model
from har.run.checkpoint import load_checkpoint
from har.run.stage_one import load_stage_one

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
        return Mixing(1.0, torch.randperm(batch), MANIFOLD_LAYERS[step % len(MANIFOLD_LAYERS)])

    for kind in ("input", "manifold"):
        monkeypatch.setattr(run_state_module, "draw_mixing", never_mixes)
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
    assert a.layer == b.layer
    layers = np.array([draw_mixing(2.0, 0, 1, s, 4, torch.device("cpu")).layer for s in range(3000)])
    assert np.allclose(np.bincount(layers, minlength=3) / 3000, 1 / 3, atol=0.03)  # Verma et al.: uniform
    lams = np.array([draw_mixing(0.2, 0, 0, s, 4, torch.device("cpu")).lam for s in range(4000)])
    # Beta(0.2, 0.2): mean 0.5, variance 1 / (4 * 1.4); most mass near 0 and 1
    assert lams.mean() == pytest.approx(0.5, abs=0.03) and lams.var() == pytest.approx(1 / 5.6, abs=0.02)


@pytest.mark.parametrize("layer", MANIFOLD_LAYERS)
def test_manifold_mixup_mixes_the_feature_map_at_its_layer(layer):
    torch.manual_seed(0)
    model = create_model("resnet32", 3, layout="CEBEBBE").eval()  # exits after the stem and after group 1
    x = torch.randn(4, 3, 32, 32)
    mixing = Mixing(0.3, torch.tensor([1, 0, 3, 2]), layer)
    b = model.backbone
    with torch.no_grad():
        mixed = model(x, mix=mixing, mix_at=layer)
        h = b.stem(0.3 * x + 0.7 * x[[1, 0, 3, 2]] if layer == 0 else x)  # by hand: mix after `layer` groups
        heads = [model.heads[0](h)]
        for i, group in enumerate(b.groups):
            h = group(h)
            if i + 1 == layer:
                h = 0.3 * h + 0.7 * h[[1, 0, 3, 2]]
            if i == 0:
                heads.append(model.heads[1](h))
        plain = model(x)
    for got, want in zip(mixed, [*heads, b.classifier(b.pool_features(h))], strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(mixed[0], plain[0]) == (layer > 0)  # the exit after the stem sees mixed images only at 0
    assert not torch.allclose(mixed[-1], plain[-1])


@pytest.mark.parametrize("layer", MANIFOLD_LAYERS)
def test_manifold_step_mixes_at_the_drawn_layer_with_both_targets(layer):
    torch.manual_seed(0)
    cfg = plain_config(train={"mixup": "manifold"})
    model = build_model(cfg, 3).eval()
    step = StepLoss(model, build_loss(cfg, [40, 12, 4]), 1, "manifold")
    x, y, perm = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.tensor([2, 3, 0, 1])
    mixing = Mixing(0.3, perm, layer)
    with torch.no_grad():
        out = step(x, y, mixing)
        z = model(x, mix=mixing, mix_at=layer)[-1]
    want = 0.3 * F.cross_entropy(z, y, reduction="sum") + 0.7 * F.cross_entropy(z, y[perm], reduction="sum")
    assert torch.allclose(out.loss_sum, want, atol=1e-5) and float(out.normaliser) == pytest.approx(4.0)


def test_manifold_mixup_refuses_intermediate_exits():
    cfg = plain_config(train={"mixup": "manifold"}, model={"layout": "CEBBBE"})
    with pytest.raises(ConfigError, match="train.mixup: manifold"):
        StepLoss(build_model(cfg, 3), build_loss(cfg, [40, 12, 4]), 2, "manifold")


def test_class_balanced_order_visits_classes_in_rounds_of_four_examples():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    order = decoupled.class_balanced_order(labels, torch.Generator().manual_seed(0))
    assert len(order) == len(labels)
    visits = labels[order].view(-1, 4)  # 250 visits of 4 examples of one class
    assert torch.equal(visits, visits[:, :1].expand(-1, 4))
    rounds = visits[: len(visits) // 3 * 3, 0].view(-1, 3)  # every class once in each round
    assert all(sorted(r.tolist()) == [0, 1, 2] for r in rounds)
    rare = order[labels[order] == 2]  # class 2 cycles through its 10 examples, each cycle a fresh shuffle
    cycles = rare[: len(rare) // 10 * 10].view(-1, 10)
    assert all(sorted(c.tolist()) == list(range(990, 1000)) for c in cycles)
    assert not all(torch.equal(c, cycles[0]) for c in cycles)
    head = order[labels[order] == 0]
    assert len(set(head.tolist())) == len(head)  # about 333 of its 900 examples, none twice
    again = decoupled.class_balanced_order(labels, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


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


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def learned(state):
    """The backbone's learned weights (conv, batch-norm affine), without batch-norm statistics."""
    return {k: v for k, v in backbone_state(state).items() if not k.endswith(BN_STATS)}


def bn_statistics_changed(before, after):
    return any(not torch.equal(before[k], after[k]) for k in backbone_state(before) if k.endswith("running_mean"))


def test_crt_retrains_only_a_fresh_classifier_and_leaves_the_backbone_unchanged(tmp_path, tiny_data, stage_one):
    history = train(stage_two_config(stage_one, "crt"), tmp_path / "crt", data=tiny_data)
    before, after = weights(stage_one), weights(tmp_path / "crt")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in learned(before))
    assert bn_statistics_changed(before, after)  # train-mode batch norm, as Kang et al.'s run_networks.py
    assert not torch.equal(before["backbone.classifier.weight"], after["backbone.classifier.weight"])
    assert len(history) == 2 and evaluate_run(tmp_path / "crt", data=tiny_data)["test"]["static"]["top1"] >= 0


def test_lws_learns_only_per_class_scales(tmp_path, tiny_data, stage_one):
    train(stage_two_config(stage_one, "lws"), tmp_path / "lws", data=tiny_data)
    before, after = weights(stage_one), weights(tmp_path / "lws")
    assert all(torch.equal(before[k], after[k]) for k in learned(before))
    assert bn_statistics_changed(before, after)
    assert torch.equal(before["backbone.classifier.weight"], after["backbone.classifier.classifier.weight"])
    assert torch.equal(before["backbone.classifier.bias"], after["backbone.classifier.classifier.bias"])
    assert not torch.equal(after["backbone.classifier.scales"], torch.ones(3))
    evaluate_run(tmp_path / "lws", data=tiny_data)  # the evaluation builds the same scaled classifier


def test_crt_classifier_restarts_from_a_new_layers_init(stage_one, tiny_data):
    cfg = stage_two_config(stage_one, "crt")
    model = build_model(cfg, 3)
    load_stage_one(cfg, model, torch.device("cpu"))
    stage_one_weight = model.backbone.classifier.weight.detach().clone()
    params = decoupled.trainable_parameters(cfg, model)
    layer = model.backbone.classifier
    bound = 1 / layer.in_features ** 0.5  # nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    assert params == [layer.weight, layer.bias] and not torch.equal(layer.weight, stage_one_weight)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert [p for p in model.parameters() if p.requires_grad] == params


def test_tau_norm_logits_drop_the_bias_at_every_tau():
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))  # norms 5, 1, 2
        layer.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    f = torch.tensor([[1.0, 1.0]])
    by_hand = {0.0: [7.0, 1.0, 2.0], 0.5: [7 / 5 ** 0.5, 1.0, 2 / 2 ** 0.5], 1.0: [1.4, 1.0, 1.0]}
    for tau, want in by_hand.items():
        scaled = torch.nn.Linear(2, 3)
        scaled.load_state_dict(layer.state_dict())
        decoupled.tau_normalize(scaled, tau)
        assert torch.allclose(scaled(f), torch.tensor([want]), atol=1e-6), tau
        assert torch.equal(scaled.bias, torch.zeros(3))


def test_choose_tau_scores_the_bias_free_logits():
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
        layer.bias.copy_(torch.tensor([0.0, 5.0, 5.0]))  # with the bias tau 0 would be right on both
    # by hand, without bias: tau 0 -> [3, 1, 0], [4, 0, 2]; tau 0.5 -> [1.34, 1, 0], [1.79, 0, 1.41];
    # tau 1 -> [0.6, 1, 0], [0.8, 0, 1]
    choice = decoupled.choose_tau(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 2]), layer,
                                  (0.0, 0.5, 1.0))
    assert choice == {"tau": 1.0, "val_top1_by_tau": {"0": 0.0, "0.5": 0.0, "1": 1.0}}


def test_lws_logits_are_the_classifiers_logits_bias_included_times_the_scales():
    layer = torch.nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]]))
        layer.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    lws = decoupled.LearnedScales(layer, 3)
    assert torch.equal(lws.scales, torch.ones(3))
    with torch.no_grad():
        lws.scales.copy_(torch.tensor([2.0, 0.5, 3.0]))
    # W f + b = [4, 1, 0] for f = [1, 1], times the scales
    assert torch.allclose(lws(torch.tensor([[1.0, 1.0]])), torch.tensor([[8.0, 0.5, 0.0]]))


def test_tau_norm_run_chooses_on_val_and_saves_the_bias_free_classifier(tmp_path, tiny_data, stage_one):
    history = train(stage_two_config(stage_one, "tau_norm", decouple={"taus": [0.0]}), tmp_path / "tau0",
                    data=tiny_data)
    assert history[0]["tau"] == 0.0 and history[0]["val_classes_missing"] == []
    before, after = weights(stage_one), weights(tmp_path / "tau0")
    assert all(torch.equal(before[k], after[k]) for k in before if k != "backbone.classifier.bias")
    assert torch.equal(after["backbone.classifier.bias"], torch.zeros(3))
    history = train(stage_two_config(stage_one, "tau_norm"), tmp_path / "tau", data=tiny_data)
    scores = history[0]["val_top1_by_tau"]
    assert len(scores) == 21 and scores[f"{history[0]['tau']:g}"] == max(scores.values())
    tau = history[0]["tau"]
    w = before["backbone.classifier.weight"]
    norm = w.norm(dim=1) ** tau
    assert torch.allclose(weights(tmp_path / "tau")["backbone.classifier.weight"], w / norm[:, None])
    evaluate_run(tmp_path / "tau", data=tiny_data)


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
