"""The early-exit executors give the cached evaluation's exits and predictions, at every s and chunking."""

import numpy as np
import pytest
import torch
from conftest import thresholds_between

from har.evaluation.dynamic import NO_EXIT_THRESHOLD, exit_indices, exit_outcomes, softmax
from har.evaluation.early_exit import (
    BatchOneExecutor,
    ChunkedExecutor,
    default_buckets,
    exit_stages,
    plan_pieces,
    static_stages,
    thresholds_for_savings,
)
from har.evaluation.flops import dynamic_cost, flops_table
from har.models import create_model
from har.models.exits import batch_norm_from, exit_by_threshold

MARGIN = 1e-4  # far above float32 rounding between batch sizes, far below a random model's spread of confidences
BUCKETS = (2, 4)  # chunks of 4, remainders padded to 2 or 4: 13 images give pieces 4, 4, 4, 1 -> 2


def cached(outputs: list[torch.Tensor], s: float) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and exits as `har evaluate` computes them from the cached logits of every exit."""
    confidence, predictions = exit_outcomes(softmax(torch.stack(outputs).numpy()))
    where = exit_indices(confidence, s)
    return predictions[where, np.arange(len(where))], where


@pytest.fixture(scope="module", params=[("resnet32", "CEBEBEBE", 8, 13), ("resnet50", "CEBEBEBEBE", 32, 6)],
                ids=["resnet32", "resnet50"])
def case(request, single_thread):
    """A randomly initialised model with batch-norm statistics from its images, the images and every exit's logits."""
    name, layout, side, count = request.param
    torch.manual_seed(0)
    x = torch.randn(count, 3, side, side)
    model = batch_norm_from(create_model(name, 4, layout=layout), x)
    with torch.no_grad():
        outputs = model(x)
    return model, x, outputs


def thresholds(outputs: list[torch.Tensor]) -> list[float]:
    """s = 0 (all leave at the first exit), no early exit, and values between confidences, away from any of them."""
    top = torch.stack([out.softmax(1).amax(1) for out in outputs[:-1]])
    return [0.0, NO_EXIT_THRESHOLD, *thresholds_between(top, MARGIN, [0.2, 0.5, 0.8])]


def clear_predictions(outputs: list[torch.Tensor], exits: np.ndarray) -> np.ndarray:
    """Where the top two classes at the exit taken are not (nearly) tied: only there is a prediction compared."""
    top2 = torch.stack([out.softmax(1) for out in outputs]).topk(2, dim=2).values.numpy()
    chosen = top2[exits, np.arange(len(exits))]
    return (chosen[:, 0] - chosen[:, 1]) > MARGIN


def test_both_executors_give_the_cached_exits_and_predictions(case):
    model, x, outputs = case
    chunked, batch_one = ChunkedExecutor(exit_stages(model), BUCKETS), BatchOneExecutor(exit_stages(model))
    seen = set()
    for s in thresholds(outputs):
        want_pred, want_exit = cached(outputs, s)
        clear = clear_predictions(outputs, want_exit)
        assert clear.mean() > 0.8
        pred, exits = chunked(x, s)
        assert pred.dtype == exits.dtype == torch.long
        one = np.array([batch_one(x[i:i + 1], s) for i in range(len(x))])
        for got_pred, got_exit in ((pred.numpy(), exits.numpy()), (one[:, 0], one[:, 1])):
            np.testing.assert_array_equal(got_exit, want_exit)
            np.testing.assert_array_equal(got_pred[clear], want_pred[clear])
        if s == 0.0:
            padded = sum(bucket for _, _, bucket in plan_pieces(len(x), BUCKETS))
            assert (want_exit == 0).all() and chunked.stage_rows == [(len(x), padded)]  # later stages skipped
        if s == NO_EXIT_THRESHOLD:
            assert (want_exit == model.num_exits - 1).all() and len(chunked.stage_rows) == model.num_exits
        seen.update(want_exit.tolist())
    assert len(seen) > 2  # the thresholds between confidences send examples out of intermediate exits


def test_a_batch_of_one_and_the_static_backbone(case):
    model, x, outputs = case
    s = thresholds(outputs)[3]
    pred, exits = ChunkedExecutor(exit_stages(model), BUCKETS)(x[:1], s)
    assert exits.tolist() == cached(outputs, s)[1][:1].tolist()
    static_pred = outputs[-1].argmax(1).numpy()
    clear = clear_predictions(outputs, np.full(len(x), model.num_exits - 1))
    pred, exits = ChunkedExecutor(static_stages(model), (3,))(x, s)  # one chunk size that does not divide 13 or 6
    assert (exits == model.num_exits - 1).all()
    np.testing.assert_array_equal(pred.numpy()[clear], static_pred[clear])
    one = BatchOneExecutor(static_stages(model))
    assert [one(x[i:i + 1], s) for i in range(len(x)) if clear[i]] == [
        (int(p), model.num_exits - 1) for p in static_pred[clear]]


def test_chunks_run_only_at_bucket_sizes(case):
    model, x, outputs = case
    stages = exit_stages(model)
    sizes = set()
    hooks = [stage.trunk.register_forward_pre_hook(lambda _, args: sizes.add(args[0].shape[0])) for stage in stages]
    try:
        for s in thresholds(outputs):
            ChunkedExecutor(stages, BUCKETS)(x, s)
    finally:
        for hook in hooks:
            hook.remove()
    assert sizes <= set(BUCKETS)


@pytest.mark.parametrize("rows", [0, 1, 7, 100, 1024, 1500])
@pytest.mark.parametrize("buckets", [(1,), (3, 8), default_buckets(64), default_buckets(1024)])
def test_pieces_cover_the_rows_with_little_padding(rows, buckets):
    pieces = plan_pieces(rows, buckets)
    assert [start for start, _, _ in pieces] == list(np.cumsum([0] + [n for _, n, _ in pieces])[:-1])
    assert sum(n for _, n, _ in pieces) == rows
    assert all(bucket in buckets and 0 < n <= bucket for _, n, bucket in pieces)
    assert sum(bucket - n for _, n, bucket in pieces) < min(buckets)
    assert len({bucket for _, _, bucket in pieces}) <= len(buckets)


def test_default_buckets_are_the_chunk_and_its_halvings():
    assert default_buckets(1024) == (128, 256, 512, 1024)
    assert default_buckets(2) == (1, 2)
    with pytest.raises(ValueError, match="chunk"):
        default_buckets(0)


def test_no_intermediate_exit_and_train_mode():
    model = create_model("resnet32", 5, layout="CBBBE")
    with pytest.raises(ValueError, match="eval mode"):
        exit_stages(model)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    pred, exits = ChunkedExecutor(exit_stages(model), (2,))(x, 0.0)
    assert exits.tolist() == [0, 0, 0] and len(pred) == 3
    assert BatchOneExecutor(exit_stages(model))(x[:1], 0.0)[1] == 0
    with pytest.raises(ValueError, match="one image"):
        BatchOneExecutor(exit_stages(model))(x, 0.0)
    empty = ChunkedExecutor(exit_stages(model))(x[:0], 0.5)
    assert [t.shape[0] for t in empty] == [0, 0]


def test_thresholds_for_savings_are_nearest_and_off_every_confidence(case):
    model, x, outputs = case
    table = flops_table(model, image_size=tuple(x.shape[1:]))
    logits = list(outputs)

    def saving(s):
        return dynamic_cost(exit_by_threshold(logits, s)[1], table)["saving"]

    confidences = torch.cat([out.softmax(1).amax(1) for out in outputs[:-1]])
    grid = [0.0, *confidences.unique().tolist()]
    chosen = thresholds_for_savings(logits, table, [0.05, 0.2, 0.35, 2.0])
    assert 2.0 not in chosen and chosen  # no s saves 200%
    for target, s in chosen.items():
        assert abs(saving(s) - target) == min(abs(saving(g) - target) for g in grid)
        assert s not in grid[1:] or not (confidences > s).any()  # midway, unless no confidence lies above


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_cached_exits(case, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions: rounding far below MARGIN
    model, x, outputs = case
    gpu_model, gx = model.cuda(), x.cuda()
    try:
        chunked = ChunkedExecutor(exit_stages(gpu_model), BUCKETS, graphs=True)
        one = BatchOneExecutor(exit_stages(gpu_model), graphs=True)
        for s in thresholds(outputs):
            want = cached(outputs, s)[1].tolist()
            assert chunked(gx, s)[1].tolist() == want
            assert [one(gx[i:i + 1], s)[1] for i in range(len(gx))] == want
        assert len(chunked.runners) > 1 and all(r.graph is not None for r in chunked.runners.values())
    finally:
        model.cpu()
