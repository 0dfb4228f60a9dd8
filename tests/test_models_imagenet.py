"""Tests of the ImageNet backbones (ResNet-50, DenseNet-169): layouts, reference sizes, early exit and cost."""

from __future__ import annotations

import pytest
import torch
from conftest import feature_shapes, thresholds_between

from har.evaluation.flops import flops_table
from har.models import MultiExitNet, check_layout, create_model
from har.models.densenet import DenseNet169
from har.models.exits import Backbone, ExitHead, NormedLinear, batch_norm_from, exit_by_threshold
from har.models.resnet import ResNet50, SeparableExitHead

MODELS = {"resnet50": ResNet50, "densenet169": DenseNet169}
# Bare torchvision figures for 1000 classes at 224 x 224: parameters, GMACs and the tolerance on the GMACs.
REFERENCE = {"resnet50": (25_557_032, 4.09, 0.005), "densenet169": (14_149_480, 3.36, 0.01)}
TABLE_V = ["CBBBBE", "CEBBBBE", "CBEBBBE", "CBBEBBE", "CBBBEBE"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def backbones() -> dict[str, Backbone]:
    """One 10-class backbone per model, in eval mode, shared by the layout tests (building takes seconds)."""
    torch.manual_seed(0)
    return {name: cls(10).eval() for name, cls in MODELS.items()}


@pytest.fixture(scope="module")
def cost_tables() -> dict[str, dict]:
    """``flops_table`` of each 1000-class model with its default layout at 224 x 224, computed once."""
    return {name: flops_table(create_model(name, 1000), (3, 224, 224)) for name in MODELS}


@pytest.mark.parametrize("name", list(MODELS))
def test_default_layout_and_head_kind(name: str) -> None:
    model = create_model(name, 10)
    assert model.layout == "CEBEBEBEBE" and model.num_exits == 5
    head_kind = SeparableExitHead if name == "resnet50" else ExitHead
    assert all(type(head) is head_kind for head in model.heads)
    narrow = create_model(name, 10, layout="CEBBBBE", exit_channels=32)
    assert narrow.heads[0].classifier.in_features == 32


@pytest.mark.parametrize("layout", [*TABLE_V, "CEBEBEBEBE"])
@pytest.mark.parametrize("name", list(MODELS))
def test_table_v_layouts_give_outputs(backbones: dict[str, Backbone], name: str, layout: str) -> None:
    check_layout(name, layout)
    model = MultiExitNet(backbones[name], layout).eval()
    assert model.num_exits == layout.count("E")
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 64, 64))
    assert len(outputs) == model.num_exits
    assert all(out.shape == (2, 10) for out in outputs)


@pytest.mark.parametrize("name", list(MODELS))
def test_positions_match_feature_maps(backbones: dict[str, Backbone], name: str) -> None:
    backbone = backbones[name]
    shapes = feature_shapes(backbone, 64)
    assert [s[1] for s in shapes] == list(backbone.channels)
    assert [64 // s[2] for s in shapes] == list(backbone.reductions)


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_layouts_raise(name: str) -> None:
    with pytest.raises(ValueError, match="CEBEBEBEBE"):
        check_layout(name, "CEBEBEBE")


@pytest.mark.parametrize("name", list(MODELS))
def test_cosine_classifier(name: str) -> None:
    model = create_model(name, 1000, layout="CBBEBBE", classifier="cosine")
    assert isinstance(model.backbone.classifier, NormedLinear)
    assert isinstance(model.heads[0].classifier, NormedLinear)
    assert sum(p.numel() for p in model.backbone.parameters()) == REFERENCE[name][0] - 1000  # no bias


@pytest.mark.parametrize("name", list(MODELS))
def test_early_exit_equals_masked_evaluation(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    model = batch_norm_from(create_model(name, 4), x)
    with torch.no_grad():
        outputs = model(x)
    probs = torch.stack([out.softmax(1) for out in outputs])
    top2 = probs.topk(2, dim=2).values
    margin = 1e-4  # far above float32 rounding, far below the spread of a random model's confidences
    # thresholds between confidences, never on one: a sub-batch forward differs from the full batch by rounding
    for threshold in [0.0, 1.01, *thresholds_between(top2[:-1, :, 0], margin, [0.25, 0.5, 0.75])]:
        predictions, exit_index = model.forward_early_exit(x, threshold)
        expected_predictions, expected_exit = exit_by_threshold(outputs, threshold)
        assert torch.equal(exit_index, expected_exit)
        chosen = top2[exit_index, torch.arange(len(x))]
        clear = (chosen[:, 0] - chosen[:, 1]) > margin  # predictions compared where the top two are not tied
        assert clear.float().mean() > 0.8
        assert torch.equal(predictions[clear], expected_predictions[clear])
    assert (model.forward_early_exit(x, 0.0)[1] == 0).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_size_and_cost_table(cost_tables: dict[str, dict], name: str) -> None:
    params, gmacs, tolerance = REFERENCE[name]
    table = cost_tables[name]
    assert table["backbone_params"] == params
    assert table["backbone_macs"] == pytest.approx(gmacs * 1e9, rel=tolerance)
    exits = table["exits"]
    assert [row["position"] for row in exits] == [
        "after stem", "after group 1", "after group 2", "after group 3", "final classifier"
    ]
    cumulative = [row["cumulative_macs"] for row in exits]
    assert all(a < b for a, b in zip(cumulative, cumulative[1:], strict=False))
    assert sum(row["head_macs"] for row in exits) < 0.15 * table["backbone_macs"]
