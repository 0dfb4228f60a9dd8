"""Tests for har.losses against values computed by hand or by independent numpy formulas written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from har.losses import (
    CrossEntropyLoss,
    FocalLoss,
    HARLoss,
    LDAMLoss,
    ReweightSchedule,
    build_exit_loss,
    class_balanced_weights,
    exit_statistics,
)

# ------------------------------------------------------- independent reference formulas (numpy, float64)


def ref_ce(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Unweighted per-example cross entropy, -log softmax(z)_y, by explicit loops."""
    out = []
    for row, y in zip(logits.astype(np.float64), target):
        top = row.max()
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        out.append(log_z - row[y])
    return np.array(out)


def ref_cb_weights(counts: list[int], beta: float) -> np.ndarray:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    total = sum(raw)
    return np.array([r / total * len(counts) for r in raw])


def ref_focal(logits: np.ndarray, target: np.ndarray, gamma: float, weight: np.ndarray | None) -> float:
    """LDAM-DRW FocalLoss: weighted ce per example, (1 - exp(-ce)) ** gamma * ce, plain mean."""
    ce = ref_ce(logits, target)
    if weight is not None:
        ce = ce * weight[target]
    return float(np.mean((1 - np.exp(-ce)) ** gamma * ce))


def ref_ldam_margins(counts: list[int], max_margin: float) -> np.ndarray:
    raw = np.array([n ** (-0.25) for n in counts])
    return raw * (max_margin / raw.max())


def ref_ldam(logits, target, counts, max_margin, scale, weight) -> float:
    margins = ref_ldam_margins(counts, max_margin)
    shifted = logits.astype(np.float64).copy()
    for i, y in enumerate(target):
        shifted[i, y] -= margins[y]
    ce = ref_ce(scale * shifted, target)
    w = np.ones(len(counts)) if weight is None else weight
    return float(np.sum(w[target] * ce) / np.sum(w[target]))


def t(array) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float32)


def close(a, b, tol: float = 1e-5) -> bool:
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 3)).astype(np.float32)
TARGET = np.array([0, 1, 2, 2, 1, 0])
COUNTS = [5000, 500, 50]
WEIGHT = np.array([0.3, 0.9, 2.1])  # mean over TARGET is not 1, so weighted and plain means differ

# ---------------------------------------------------------------- class weights


def test_class_balanced_weights_by_hand():
    # counts [1, 2], beta 0.5: raw (0.5/0.5, 0.5/0.75) = (1, 2/3); normalised to sum 2 -> (1.2, 0.8).
    assert close(class_balanced_weights([1, 2], 0.5), [1.2, 0.8])


def test_class_balanced_weights_formula_sum_and_beta_zero():
    counts = [1000, 100, 10, 1]
    w = class_balanced_weights(counts, 0.999)
    assert w.dtype == torch.float32
    assert close(w, ref_cb_weights(counts, 0.999))
    assert math.isclose(float(w.sum()), len(counts), rel_tol=1e-6)
    assert bool((w[1:] > w[:-1]).all())  # rarer classes weigh more
    assert torch.equal(class_balanced_weights(counts, 0.0), torch.ones(4))


@pytest.mark.parametrize("counts, beta", [([10, 5], 1.0), ([10, 5], -0.1), ([10, 0], 0.9), ([], 0.9)])
def test_class_balanced_weights_rejects_bad_input(counts, beta):
    with pytest.raises(ValueError):
        class_balanced_weights(counts, beta)


def test_reweight_schedule_modes():
    expected = ref_cb_weights(COUNTS, 0.9999)
    none = ReweightSchedule("none", COUNTS)
    assert none.weights(0) is None and none.weights(500) is None
    cb = ReweightSchedule("cb", COUNTS)
    assert close(cb.weights(0), expected) and close(cb.weights(300), expected)
    drw = ReweightSchedule("drw", COUNTS)
    assert drw.drw_epoch == 160
    assert drw.weights(0) is None and drw.weights(159) is None
    assert close(drw.weights(160), expected) and close(drw.weights(199), expected)
    early = ReweightSchedule("drw", COUNTS, beta=0.9, drw_epoch=3)
    assert early.weights(2) is None and close(early.weights(3), ref_cb_weights(COUNTS, 0.9))


def test_reweight_schedule_rejects_unknown_mode():
    with pytest.raises(ValueError, match="drw"):
        ReweightSchedule("focal", COUNTS)


# ---------------------------------------------------------------- exit losses


def test_cross_entropy_plain_and_weighted_mean():
    ce = ref_ce(LOGITS, TARGET)
    assert close(CrossEntropyLoss()(t(LOGITS), torch.tensor(TARGET)), ce.mean())
    weighted = CrossEntropyLoss(t(WEIGHT))(t(LOGITS), torch.tensor(TARGET))
    w = WEIGHT[TARGET]
    assert close(weighted, np.sum(w * ce) / np.sum(w))


def test_focal_gamma_zero_is_unweighted_cross_entropy():
    loss = FocalLoss(0.0)(t(LOGITS), torch.tensor(TARGET))
    assert close(loss, ref_ce(LOGITS, TARGET).mean())


@pytest.mark.parametrize("weight", [None, WEIGHT])
def test_focal_matches_ldam_drw_formula(weight):
    loss = FocalLoss(0.5, None if weight is None else t(weight))(t(LOGITS), torch.tensor(TARGET))
    assert close(loss, ref_focal(LOGITS, TARGET, 0.5, weight))


def test_focal_gradient_finite_when_ce_is_zero():
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    FocalLoss(0.5)(logits, torch.tensor([0, 1])).backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_ldam_margins():
    margins = LDAMLoss(COUNTS).margins
    assert close(margins, ref_ldam_margins(COUNTS, 0.5))
    assert math.isclose(float(margins[2]), 0.5, rel_tol=1e-6)  # rarest class has the largest margin
    assert math.isclose(float(margins[1] / margins[0]), (5000 / 500) ** 0.25, rel_tol=1e-5)
    assert math.isclose(float(margins[2] / margins[1]), (500 / 50) ** 0.25, rel_tol=1e-5)


@pytest.mark.parametrize("weight", [None, WEIGHT])
def test_ldam_value(weight):
    cosines = np.tanh(LOGITS)  # in [-1, 1] like the normalised linear layer's output
    loss = LDAMLoss(COUNTS, weight=None if weight is None else t(weight))(t(cosines), torch.tensor(TARGET))
    assert close(loss, ref_ldam(cosines, TARGET, COUNTS, 0.5, 30.0, weight), tol=1e-4)


def test_set_weight_switches_and_follows_module_device():
    loss = CrossEntropyLoss()
    loss.set_weight(torch.tensor(WEIGHT, dtype=torch.float64))
    assert loss.weight.dtype == torch.float32 and "weight" in dict(loss.named_buffers())
    assert "weight" not in loss.state_dict()  # rebuilt from the schedule, never restored
    loss.set_weight(None)
    assert close(loss(t(LOGITS), torch.tensor(TARGET)), ref_ce(LOGITS, TARGET).mean())
    moved = LDAMLoss(COUNTS).to("meta")
    moved.set_weight(t(WEIGHT))
    assert moved.weight.device.type == "meta" and moved.margins.device.type == "meta"
    with pytest.raises(ValueError):
        moved.set_weight(torch.ones(4))


def test_new_weights_are_written_into_the_same_tensor_never_into_the_callers():
    """A CUDA-graphed step reads the weight buffer at a fixed address; the schedule's tensors stay untouched."""
    loss = CrossEntropyLoss()
    first, second = torch.ones(len(WEIGHT)), t(WEIGHT)
    loss.set_weight(first)
    buffer = loss.weight
    loss.set_weight(second)
    assert loss.weight is buffer and torch.equal(buffer, second.float())
    assert torch.equal(first, torch.ones(len(WEIGHT)))  # the first caller's tensor was copied, not adopted


def test_build_exit_loss():
    assert isinstance(build_exit_loss("ce", COUNTS), CrossEntropyLoss)
    focal = build_exit_loss("focal", COUNTS, focal_gamma=2.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 2.0
    ldam = build_exit_loss("ldam", COUNTS, ldam_max_margin=0.3, ldam_scale=10.0)
    assert isinstance(ldam, LDAMLoss) and ldam.scale == 10.0
    assert math.isclose(float(ldam.margins.max()), 0.3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="ldam"):
        build_exit_loss("hinge", COUNTS)


# ---------------------------------------------------------------- HAR
# Three exits, three classes. A row's confidence: [5, 0, 0] -> p = e^5 / (e^5 + 2) = 0.987 at class 0;
# [1, 0.5, 0] -> p = 0.506: correct but below t = 0.9; a wrong row puts 5 on another class.

CONF = 5.0


def row(kind: str, y: int) -> list[float]:
    values = [0.0, 0.0, 0.0]
    if kind == "confident":
        values[y] = CONF
    elif kind == "weak":  # correct argmax, p_y = 0.506
        values[y], values[(y + 1) % 3] = 1.0, 0.5
    else:  # wrong
        values[(y + 1) % 3] = CONF
    return values


def har_batch(pattern: list[list[str]], target: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """pattern[i][k] is the kind of example i's logits at exit k."""
    exits = [t([row(pattern[i][k], y) for i, y in enumerate(target)]) for k in range(len(pattern[0]))]
    return exits, torch.tensor(target)


def ce_matrix(exits: list[torch.Tensor], target: torch.Tensor) -> np.ndarray:
    """[N, K] per-example, per-exit unweighted cross entropy from the reference formula."""
    return np.stack([ref_ce(z.numpy(), target.numpy()) for z in exits], axis=1)


def test_har_all_confident_at_first_exit():
    exits, target = har_batch([["confident", "wrong", "wrong"]] * 3, [0, 1, 2])
    har = HARLoss(CrossEntropyLoss(), 0.9)
    assert har.exit_index(exits, target).tolist() == [0, 0, 0]
    assert close(har(exits, target), ce_matrix(exits, target)[:, 0].mean())


def test_har_exit_rules_per_example():
    pattern = [
        ["wrong", "wrong", "confident"],  # (b) confident only at the last exit
        ["weak", "confident", "confident"],  # (c) correct at exit 0 but below t: exits at 1
        ["wrong", "weak", "wrong"],  # (d) never confident: all exits
        ["confident", "confident", "confident"],  # exits at 0
    ]
    exits, target = har_batch(pattern, [0, 1, 2, 1])
    comp = HARLoss(CrossEntropyLoss(), 0.9).components(exits, target)
    assert comp.exit_index.tolist() == [2, 1, 2, 0]
    ce = ce_matrix(exits, target)
    expected = [ce[0].sum(), ce[1, :2].sum(), ce[2].sum(), ce[3, 0]]
    assert close(comp.per_example.detach(), expected)
    assert close(comp.normaliser, np.ones(4))
    assert close(comp.loss.detach(), np.mean(expected))


def test_har_threshold_is_strict_on_raw_probability():
    exits, target = har_batch([["weak", "confident"]], [0])
    p_weak = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5) + 1.0)
    assert HARLoss(CrossEntropyLoss(), p_weak - 1e-3).exit_index(exits, target).tolist() == [0]
    assert HARLoss(CrossEntropyLoss(), p_weak + 1e-3).exit_index(exits, target).tolist() == [1]


def test_har_requires_correct_argmax_below_half():
    # p = (0.40, 0.45, 0.15): the true class 0 clears t = 0.3 but is not the prediction, so no exit at 0.
    exits = [torch.log(t([[0.40, 0.45, 0.15]])), t([[5.0, 0.0, 0.0]])]
    assert HARLoss(CrossEntropyLoss(), 0.3).exit_index(exits, torch.tensor([0])).tolist() == [1]


def test_har_ldam_decides_on_unscaled_cosines():
    # Raw softmax p_y = 0.539 < 0.6 although the scaled (x30) softmax would be ~1: must not exit at 0.
    exits = [t([[0.9, 0.1, 0.0]]), t([[1.0, -1.0, -1.0]])]
    har = HARLoss(LDAMLoss([100, 10, 1]), 0.6)
    assert har.exit_index(exits, torch.tensor([0])).tolist() == [1]


def test_har_weighted_cross_entropy():
    pattern = [["wrong", "confident"], ["confident", "wrong"], ["weak", "weak"], ["wrong", "wrong"]]
    exits, target = har_batch(pattern, [0, 1, 2, 2])
    ce = ce_matrix(exits, target)
    w = WEIGHT[target.numpy()]
    loss_all = HARLoss(CrossEntropyLoss(t(WEIGHT)), None)(exits, target)
    assert close(loss_all, np.sum(w * ce.sum(axis=1)) / np.sum(w))
    loss_har = HARLoss(CrossEntropyLoss(t(WEIGHT)), 0.9)(exits, target)
    per_example = [ce[0].sum(), ce[1, 0], ce[2].sum(), ce[3].sum()]
    assert close(loss_har, np.sum(w * per_example) / np.sum(w))


@pytest.mark.parametrize("name", ["ce", "focal", "ldam"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_har_single_exit_equals_exit_loss(name, threshold):
    exit_loss = build_exit_loss(name, COUNTS)
    exit_loss.set_weight(t(WEIGHT))
    logits, target = t(np.tanh(LOGITS)), torch.tensor(TARGET)
    assert close(HARLoss(exit_loss, threshold)([logits], target), exit_loss(logits, target), tol=1e-6)
    references = {
        "ce": np.sum(WEIGHT[TARGET] * ref_ce(np.tanh(LOGITS), TARGET)) / np.sum(WEIGHT[TARGET]),
        "focal": ref_focal(np.tanh(LOGITS), TARGET, 0.5, WEIGHT),
        "ldam": ref_ldam(np.tanh(LOGITS), TARGET, COUNTS, 0.5, 30.0, WEIGHT),
    }
    assert close(HARLoss(exit_loss, threshold)([logits], target), references[name], tol=1e-4)


def test_har_threshold_none_trains_every_exit():
    exits, target = har_batch([["confident", "confident", "confident"]] * 2, [0, 2])
    har = HARLoss(CrossEntropyLoss(), None)
    assert har.exit_index(exits, target).tolist() == [2, 2]
    assert close(har(exits, target), ce_matrix(exits, target).sum(axis=1).mean())


def test_har_gradient_stops_after_exit():
    pattern = [["confident", "wrong", "wrong"], ["weak", "confident", "wrong"], ["wrong", "wrong", "wrong"]]
    exits, target = har_batch(pattern, [0, 1, 2])
    exits = [z.requires_grad_() for z in exits]
    HARLoss(FocalLoss(0.5), 0.9)(exits, target).backward()
    for i, k_i in enumerate([0, 1, 2]):
        for k, z in enumerate(exits):
            has_grad = bool(z.grad[i].abs().sum() > 0)
            assert has_grad == (k <= k_i), (i, k)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 1.5, True])
def test_har_rejects_invalid_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        HARLoss(CrossEntropyLoss(), threshold)


def test_har_rejects_empty_logits():
    with pytest.raises(ValueError):
        HARLoss(CrossEntropyLoss(), 0.5)([], torch.tensor([0]))


def test_exit_statistics():
    pattern = [
        ["confident", "wrong", "wrong"],
        ["weak", "confident", "wrong"],
        ["confident", "wrong", "wrong"],
        ["wrong", "wrong", "wrong"],
    ]
    exits, target = har_batch(pattern, [0, 1, 2, 1])
    comp = HARLoss(CrossEntropyLoss(), 0.9).components(exits, target)
    counts, sums = exit_statistics(comp, 3)
    ce = ce_matrix(exits, target)
    assert counts.dtype == torch.long and counts.tolist() == [2, 1, 1]
    assert close(sums, [ce[0, 0] + ce[2, 0], ce[1, :2].sum(), ce[3].sum()])
    counts4, sums4 = exit_statistics(comp, 4)  # an exit nobody reached reports zeros
    assert counts4.tolist() == [2, 1, 1, 0] and float(sums4[3]) == 0.0
    assert not sums.requires_grad
