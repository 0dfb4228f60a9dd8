"""Tests of the multi-exit models, their layouts, early-exit inference and cost accounting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import feature_shapes, thresholds_between

from har.evaluation.flops import count_macs, dynamic_cost, flops_table
from har.models import create_model, list_models, parse_layout
from har.models.exits import ExitHead, NormedLinear, batch_norm_from, exit_by_threshold

pytestmark = pytest.mark.usefixtures("single_thread")


def resnet_cifar_expected_macs(num_classes: int, blocks_per_group: int = 5) -> int:
    """MACs of a bare CIFAR ResNet (ResNet-32 by default) from its architecture: sum of Cin*Cout*9*Hout*Wout + 64*C."""
    convs = [(3, 16, 32)]  # (in channels, out channels, output side)
    for in_ch, out_ch, side in ((16, 16, 32), (16, 32, 16), (32, 64, 8)):
        convs += [(in_ch, out_ch, side)] + [(out_ch, out_ch, side)] * (2 * blocks_per_group - 1)
    return sum(cin * cout * 9 * side * side for cin, cout, side in convs) + 64 * num_classes


def test_resnet32_params_and_macs() -> None:
    model = create_model("resnet32", 10, layout="CBBBE").eval()
    assert sum(p.numel() for p in model.parameters()) == 464_154
    macs = count_macs(lambda: model.forward_static(torch.zeros(1, 3, 32, 32)))
    assert resnet_cifar_expected_macs(10) == 68_862_592
    assert macs == 68_862_592


def test_resnet8_is_resnet32s_shape_with_one_block_per_group() -> None:
    """The tests' stand-in: the same exits and feature maps as ResNet-32 at a fraction of the cost."""
    small, full = create_model("resnet8", 10).eval(), create_model("resnet32", 10)
    assert small.layout == full.layout and small.num_exits == full.num_exits == 4
    assert feature_shapes(small.backbone, 32) == feature_shapes(full.backbone, 32)
    macs = count_macs(lambda: small.forward_static(torch.zeros(1, 3, 32, 32)))
    assert macs == resnet_cifar_expected_macs(10, blocks_per_group=1) < resnet_cifar_expected_macs(10) / 5


def test_backbone_positions_match_feature_maps() -> None:
    backbone = create_model("resnet32", 10).backbone
    shapes = feature_shapes(backbone, 32)
    assert [s[1] for s in shapes] == list(backbone.channels)
    assert [32 // s[2] for s in shapes] == list(backbone.reductions)


@pytest.mark.parametrize(
    ("layout", "positions"),
    [("CBBBE", ()), ("CEBBBE", (0,)), ("CBEBBE", (1,)), ("CBBEBE", (2,)), ("CEBEBEBE", (0, 1, 2))],
)
def test_layouts_give_exits_and_shapes(layout: str, positions: tuple[int, ...]) -> None:
    assert parse_layout(layout, 3) == positions
    model = create_model("resnet32", 7, layout=layout)
    assert model.layout == layout and model.num_exits == len(positions) + 1 and model.num_classes == 7
    outputs = model(torch.randn(2, 3, 16, 16))
    assert len(outputs) == model.num_exits
    assert all(out.shape == (2, 7) for out in outputs)
    assert model.forward_static(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_default_layout_is_exit_before_every_group() -> None:
    model = create_model("resnet32", 10)
    assert model.layout == "CEBEBEBE" and model.num_exits == 4


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("", "non-empty"),
        ("BBBE", "start"),
        ("CEBEBEB", "end with 'E'"),
        ("CBBE", "2 'B's"),
        ("CBBBBE", "4 'B's"),
        ("CEEBBBE", "'EE'"),
        ("CBBBEE", "'EE'"),
        ("CBXBBE", "characters"),
        ("cbbbe", "characters"),
        ("CBCBBE", "single stem"),
    ],
)
def test_bad_layouts_raise(layout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_layout(layout, 3)
    assert "CEBEBEBE" in str(info.value)
    with pytest.raises(ValueError):
        create_model("resnet32", 10, layout=layout)


def test_cosine_classifier_outputs_cosines() -> None:
    model = create_model("resnet32", 10, classifier="cosine")
    assert isinstance(model.backbone.classifier, NormedLinear)
    assert all(isinstance(head.classifier, NormedLinear) for head in model.heads)
    assert sum(p.numel() for p in model.backbone.parameters()) == 464_154 - 10  # no bias
    for out in model(torch.randn(4, 3, 16, 16)):
        assert out.abs().max() <= 1 + 1e-5


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"'resnet9000'.*resnet32"):
        create_model("resnet9000", 10)
    assert "resnet32" in list_models()
    with pytest.raises(ValueError, match=r"'softmax'.*linear.*cosine"):
        create_model("resnet32", 10, classifier="softmax")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet32", 0)
    with pytest.raises(ValueError, match="stride"):
        ExitHead(16, 10, stride=0)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_early_exit_equals_masked_evaluation(classifier: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(48, 3, 8, 8)
    model = batch_norm_from(create_model("resnet32", 10, classifier=classifier), x)
    with torch.no_grad():
        outputs = model(x)
    probs = torch.stack([out.softmax(1) for out in outputs])
    top2 = probs.topk(2, dim=2).values
    margin = 1e-4  # far above float32 rounding, far below the spread of a random model's confidences
    thresholds = thresholds_between(top2[:-1, :, 0], margin, [0.1, 0.25, 0.5, 0.75, 0.9])
    exits_seen = set()
    for threshold in [0.0, 1.01, *thresholds]:  # 0: every example leaves at exit 0; above 1: none leaves early
        predictions, exit_index = model.forward_early_exit(x, threshold)
        expected_predictions, expected_exit = exit_by_threshold(outputs, threshold)
        assert predictions.dtype == exit_index.dtype == torch.long
        assert torch.equal(exit_index, expected_exit)
        # a prediction is compared only where its top two classes are not (nearly) tied
        chosen = top2[exit_index, torch.arange(len(x))]
        clear = (chosen[:, 0] - chosen[:, 1]) > margin
        assert clear.float().mean() > 0.9
        assert torch.equal(predictions[clear], expected_predictions[clear])
        exits_seen.update(exit_index.tolist())
        if threshold == 0.0:
            assert (exit_index == 0).all()
        if threshold > 1:
            assert (exit_index == model.num_exits - 1).all()
            assert torch.equal(predictions[clear], outputs[-1].argmax(1)[clear])
    assert exits_seen == set(range(model.num_exits))


def test_early_exit_without_intermediate_exits() -> None:
    model = create_model("resnet32", 5, layout="CBBBE").eval()
    x = torch.randn(3, 3, 8, 8)
    predictions, exit_index = model.forward_early_exit(x, 0.0)
    assert exit_index.tolist() == [0, 0, 0]
    assert torch.equal(predictions, model.forward_static(x).argmax(1))


def test_flops_table_and_dynamic_cost() -> None:
    model = create_model("resnet32", 10).train()
    table = flops_table(model)
    assert model.training
    json.dumps(table)
    exits = table["exits"]
    assert [row["index"] for row in exits] == [0, 1, 2, 3]
    positions = ["after stem", "after group 1", "after group 2", "final classifier"]
    assert [row["position"] for row in exits] == positions
    assert table["backbone_macs"] == resnet_cifar_expected_macs(10)
    assert table["backbone_params"] == 464_154
    assert table["total_params"] == sum(p.numel() for p in model.parameters())
    cumulative = [row["cumulative_macs"] for row in exits]
    assert all(a < b for a, b in zip(cumulative, cumulative[1:], strict=False))
    head_macs = sum(row["head_macs"] for row in exits)
    assert exits[-1]["head_macs"] == 0
    assert cumulative[-1] == table["backbone_macs"] + head_macs
    assert table["backbone_params"] + sum(row["head_params"] for row in exits) == table["total_params"]
    # Exit 0 sits after the 16-channel 32x32 stem: two stride-2 convs to 16x16 then 8x8, then the dense layer.
    assert exits[0]["head_macs"] == 16 * 64 * 9 * 16 * 16 + 64 * 64 * 9 * 8 * 8 + 64 * 10
    assert exits[0]["cumulative_macs"] == 3 * 16 * 9 * 32 * 32 + exits[0]["head_macs"]

    at_last = dynamic_cost(np.full(100, 3), table)
    assert at_last["mean_macs"] == cumulative[-1]
    assert at_last["saving"] == pytest.approx(-head_macs / table["backbone_macs"])
    assert at_last["saving_trunk"] == pytest.approx(0.0, abs=1e-12)  # heads not counted: the bare backbone
    mixed = dynamic_cost(torch.tensor([0, 3]), table)
    assert mixed["mean_macs"] == pytest.approx((cumulative[0] + cumulative[-1]) / 2)
    stem = table["backbone_segments"][0]["macs"]  # exit 0 after the stem: the stem alone, heads not counted
    assert mixed["saving_trunk"] == pytest.approx(1 - (stem + table["backbone_macs"]) / 2 / table["backbone_macs"])
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        dynamic_cost(np.array([4]), table)


@pytest.mark.parametrize(("name", "classifier", "side"), [("resnet32", "linear", 32), ("resnet32", "cosine", 32),
                                                           ("resnet50", "linear", 64)])
def test_exit_classifiers_compute_in_float32_under_bf16_autocast(name: str, classifier: str, side: int) -> None:
    """Under autocast the convolutions run in bf16 but every exit's dense layer, whose outputs feed the loss (and
    LDAM scales by 30), computes in float32: its logits are the layer applied in float32 to the bf16 features."""
    torch.manual_seed(0)
    model = create_model(name, 10, classifier=classifier).eval()
    images = torch.randn(2, 3, side, side)
    layers = [head.classifier for head in model.heads] + [model.backbone.classifier]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images)
        features = model.heads[0].features(model.backbone.stem(images))
        got = layers[0](features)
    assert features.dtype == torch.bfloat16  # the network itself runs in bf16
    assert len(outputs) == len(layers) and all(out.dtype == torch.float32 for out in outputs)
    weight = layers[0].weight
    with torch.no_grad():
        expected = (F.normalize(features.float(), dim=1) @ F.normalize(weight, dim=0) if classifier == "cosine"
                    else features.float() @ weight.T + layers[0].bias)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(got, expected.bfloat16().float())  # not rounded to bf16's 8-bit mantissa
