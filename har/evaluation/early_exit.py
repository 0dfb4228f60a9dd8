"""Early-exit executors that skip work for real, built from a `MultiExitNet`'s segments.

`MultiExitNet.forward_early_exit` drops the examples that leave with a boolean mask after every exit of every
batch: each mask synchronises the host with a GPU, and the ever smaller sub-batches are launch-bound. Two
executors here keep the exit rule (leave at the first exit whose max softmax is strictly above s, else at the last;
`exit_by_threshold`) and organise the work for a device:

- `BatchOneExecutor`: one image at a time, each stage (the trunk up to an exit plus that exit's head) a fixed
  batch-1 step, captured once as a CUDA graph on CUDA and replayed; one host read per exit (its confidence and
  prediction together) decides whether to go on. On the CPU the same steps run eagerly.
- `ChunkedExecutor`: a whole split, one stage at a time, in large chunks; after each exit the survivors are
  compacted once (one `nonzero` for the whole stage) and every chunk is padded to one of a few bucket sizes, so a
  GPU reuses a few shapes (and their CUDA graphs and cuDNN plans).

Both give the predictions and exits of the cached evaluation (`har.evaluation.dynamic`) up to float rounding:
an example whose confidence lies within rounding of s may leave elsewhere, as between any two batch sizes.
Their CUDA paths have not run on a GPU yet (docs/benchmarks.md).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from har.evaluation.flops import dynamic_cost
from har.models import MultiExitNet
from har.models.exits import exit_by_threshold, exit_confidence

DEFAULT_CHUNK = 1024  # rows per chunk, for a GPU; a CPU is faster with chunks whose activations fit its cache
BUCKET_LEVELS = 4  # default buckets: the chunk and its halvings, chunk / 8 the smallest
GRAPH_WARMUP = 3  # eager calls on a side stream before a capture (cuDNN picks its kernels there)

StepFn = Callable[[Tensor], tuple[Tensor, ...]]


@dataclass(frozen=True)
class Stage:
    """The work between two exits: `trunk` maps the running feature map on, `head` gives the exit's logits."""

    trunk: nn.Module
    head: nn.Module
    exit_index: int

    def step(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Feature map after the trunk, and the exit's confidence and prediction (the exit rule's inputs)."""
        features = self.trunk(x)
        confidence, prediction = exit_confidence(self.head(features))
        return features, confidence, prediction


def _eval_segments(model: MultiExitNet) -> list:
    if model.training:
        raise ValueError("early-exit executors need the model in eval mode (batch norm would see each sub-batch)")
    return model.segments()


def exit_stages(model: MultiExitNet) -> list[Stage]:
    """One stage per exit, from `model.segments()`: stem and groups up to the exit, then its head."""
    stages, trunk = [], []
    for segment in _eval_segments(model):
        if segment.kind in ("stem", "group"):
            trunk.append(segment.module)
        else:
            stages.append(Stage(nn.Sequential(*trunk), segment.module, segment.exit_index))
            trunk = []
    return stages


def static_stages(model: MultiExitNet) -> list[Stage]:
    """The bare backbone as one stage (no exit head), the reference an early-exit executor is timed against."""
    segments = _eval_segments(model)
    trunk = nn.Sequential(*(s.module for s in segments if s.kind in ("stem", "group")))
    return [Stage(trunk, segments[-1].module, segments[-1].exit_index)]


def float32_threshold(exit_threshold: float) -> float:
    """s as the exit rule compares it: a float32 tensor against a Python number compares in float32."""
    return float(torch.tensor(exit_threshold, dtype=torch.float32))


def default_buckets(chunk: int, levels: int = BUCKET_LEVELS) -> tuple[int, ...]:
    """The chunk and its halvings, smallest first: `levels` shapes per stage, padding under chunk / 2**(levels-1)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return tuple(sorted({max(1, chunk >> k) for k in range(levels)}))


def plan_pieces(rows: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut `rows` into (start, rows, bucket) pieces: the largest bucket that fits while one does, then the rest
    padded to the smallest bucket that holds it. Padding stays below the smallest bucket."""
    sizes = sorted(buckets)
    pieces, start = [], 0
    while start < rows:
        left = rows - start
        fits = [b for b in sizes if b <= left]
        bucket = fits[-1] if fits else next(b for b in sizes if b >= left)
        count = min(bucket, left)
        pieces.append((start, count, bucket))
        start += count
    return pieces


class _Runner:
    """`fn` on batches of one size: eagerly (shorter batches padded with zeros), or captured once as a CUDA graph
    reading `static_input` and replayed (its outputs are overwritten by the next replay: read them first)."""

    def __init__(self, fn: StepFn, static_input: Tensor, graph: bool) -> None:
        self.fn, self.size, self.input, self.graph = fn, static_input.shape[0], static_input, None
        if not graph:
            return
        device = static_input.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                fn(static_input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(static_input)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        rows = x.shape[0]
        if self.graph is None:
            if rows < self.size:
                x = torch.cat((x, x.new_zeros((self.size - rows, *x.shape[1:]))))
            return self.fn(x)
        if x.data_ptr() != self.input.data_ptr():  # a batch-1 stage reads its predecessor's output in place
            self.input[:rows].copy_(x)
        self.graph.replay()
        return self.outputs


def _use_graphs(graphs: bool | None, device: torch.device) -> bool:
    if graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, the input is on {device}")
    return device.type == "cuda" if graphs is None else graphs


class BatchOneExecutor:
    """Per-image early exit at batch 1: one step per stage (a CUDA graph on CUDA), one host read per exit.

    Args:
        stages: `exit_stages(model)`, or `static_stages(model)` for the bare backbone.
        graphs: capture each stage as a CUDA graph (None: on CUDA inputs).
    """

    def __init__(self, stages: Sequence[Stage], graphs: bool | None = None) -> None:
        self.stages, self.graphs = list(stages), graphs
        self.runners: list[_Runner] = []

    def _decision_step(self, stage: Stage) -> StepFn:
        def step(x: Tensor) -> tuple[Tensor, Tensor]:
            features, confidence, prediction = stage.step(x)
            return features, torch.cat((confidence.double(), prediction.double()))  # read in one transfer
        return step

    def _build(self, image: Tensor) -> None:
        graph = _use_graphs(self.graphs, image.device)
        x = image.clone()
        for stage in self.stages:
            runner = _Runner(self._decision_step(stage), x, graph)
            self.runners.append(runner)
            if graph:  # each graph reads its predecessor's output buffer in place
                x = runner.outputs[0]

    @torch.no_grad()
    def __call__(self, image: Tensor, exit_threshold: float) -> tuple[int, int]:
        """Prediction and exit index of one image ([1, C, H, W])."""
        if image.shape[0] != 1:
            raise ValueError(f"BatchOneExecutor takes one image, [1, C, H, W]; got shape {tuple(image.shape)}")
        if not self.runners:
            self._build(image)
        threshold = float32_threshold(exit_threshold)
        x = image
        for stage, runner in zip(self.stages, self.runners):
            x, decision = runner(x)
            confidence, prediction = decision.tolist()  # the exit's one host read
            if confidence > threshold or stage is self.stages[-1]:
                return int(prediction), stage.exit_index
        raise AssertionError("unreachable: the last stage always returns")


class ChunkedExecutor:
    """Early exit over a whole split, stage by stage, in chunks padded to a few bucket sizes.

    Args:
        stages: `exit_stages(model)`, or `static_stages(model)` for the bare backbone.
        buckets: the chunk sizes a stage runs at; the largest is the chunk (default: `default_buckets`).
        graphs: capture each (stage, bucket) as a CUDA graph on first use (None: on CUDA inputs).

    After a call, `stage_rows` holds each stage's (examples, rows computed with padding).
    """

    def __init__(self, stages: Sequence[Stage], buckets: Sequence[int] | None = None,
                 graphs: bool | None = None) -> None:
        self.buckets = tuple(sorted(set(buckets or default_buckets(DEFAULT_CHUNK))))
        if self.buckets[0] < 1:
            raise ValueError(f"bucket sizes must be positive, got {self.buckets}")
        self.stages, self.graphs = list(stages), graphs
        self.runners: dict[tuple[int, int], _Runner] = {}
        self.stage_rows: list[tuple[int, int]] = []

    def _runner(self, index: int, bucket: int, x: Tensor) -> _Runner:
        if (index, bucket) not in self.runners:
            graph = _use_graphs(self.graphs, x.device)
            self.runners[index, bucket] = _Runner(self.stages[index].step, x.new_zeros((bucket, *x.shape[1:])), graph)
        return self.runners[index, bucket]

    @torch.no_grad()
    def __call__(self, images: Tensor, exit_threshold: float) -> tuple[Tensor, Tensor]:
        """Predictions and exit indices [N] (long, on the images' device), in the order of `images`."""
        total = images.shape[0]
        predictions = torch.zeros(total, dtype=torch.long, device=images.device)
        exits = torch.zeros_like(predictions)
        alive = torch.arange(total, device=images.device)
        x = images
        self.stage_rows = []
        if total == 0:
            return predictions, exits
        for index, stage in enumerate(self.stages):
            last = index == len(self.stages) - 1
            rows = x.shape[0]
            pieces = plan_pieces(rows, self.buckets)
            self.stage_rows.append((rows, sum(bucket for _, _, bucket in pieces)))
            features = confidence = prediction = None
            for start, count, bucket in pieces:
                f, c, p = self._runner(index, bucket, x)(x[start:start + count])
                if confidence is None:
                    confidence, prediction = c.new_empty(rows), p.new_empty(rows)
                    features = None if last else f.new_empty((rows, *f.shape[1:]))
                confidence[start:start + count] = c[:count]
                prediction[start:start + count] = p[:count]
                if features is not None:
                    features[start:start + count] = f[:count]
            if last:
                predictions[alive], exits[alive] = prediction, stage.exit_index
                break
            leaves = confidence > exit_threshold
            predictions[alive] = torch.where(leaves, prediction, predictions[alive])
            exits[alive] = torch.where(leaves, stage.exit_index, exits[alive])
            keep = (~leaves).nonzero().squeeze(1)  # the stage's one synchronisation: how many go on
            if keep.numel() == 0:
                break
            alive, x = alive.index_select(0, keep), features.index_select(0, keep)
        return predictions, exits


def thresholds_for_savings(logits: Sequence[Tensor], table: dict, targets: Sequence[float]) -> dict[float, float]:
    """Per reachable target MACs saving, an s whose saving as the counter predicts it (`flops_table`, the exit rule
    on cached `logits`) is nearest to the target.

    The saving never grows with s (examples only move to later, dearer exits), so the sorted confidences of the
    intermediate exits are bisected; s = 0 sends every example out of the first exit, the largest saving. The s
    returned lies midway between the chosen confidence and the next one observed: the same exits in the cache,
    but no example sits on the threshold, where rounding would decide its exit (unless the two are neighbouring
    float32 values).
    """
    def saving(s: float) -> float:
        return dynamic_cost(exit_by_threshold(logits, s)[1], table)["saving"]

    grid = torch.cat([torch.zeros(1), *(exit_confidence(z)[0] for z in logits[:-1])]).unique().tolist()
    chosen = {}
    for target in targets:
        i = bisect.bisect_left(grid, True, key=lambda s: saving(s) < target)
        if i > 0:
            j = min(range(i - 1, min(i + 1, len(grid))), key=lambda k: abs(saving(grid[k]) - target))
            chosen[target] = grid[j]
            if j + 1 < len(grid) and grid[j] < float32_threshold((grid[j] + grid[j + 1]) / 2) < grid[j + 1]:
                chosen[target] = (grid[j] + grid[j + 1]) / 2
    return chosen
