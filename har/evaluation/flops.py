"""Computational cost of multi-exit models, counted in multiply-accumulates (MACs) by PyTorch's flop counter.

Only convolutions and matrix products are counted (batch norm, ReLU and pooling are not), the usual convention
for CNN cost figures such as ResNet-32's 68.9M MACs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from har.evaluation.dynamic import ExitCosts
from har.models import MultiExitNet
from har.models.exits import Segment, position_name


def count_macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates performed by ``fn()`` (the flop counter reports 2 flops per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() // 2


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_table(model: MultiExitNet, image_size: tuple[int, int, int] = (3, 32, 32)) -> dict:
    """Per-exit cost of a multi-exit model for one image (JSON-serialisable).

    Each piece is counted separately on a batch of 1 in eval mode (the model's mode is restored afterwards).
    The cost of leaving at an exit is the backbone computed up to it plus every head evaluated so far, this
    one included; the last exit (the backbone's own classifier, whose ``head_macs`` and ``head_params`` are 0
    as it is part of the backbone) thus costs the full backbone plus all intermediate heads.

    Returns:
        ``image_size``, ``backbone_macs``, ``backbone_params``, ``total_params``, ``backbone_segments`` (MACs
        of the stem, each group and the final classifier) and ``exits``: one dict per exit with ``index``,
        ``position``, ``head_macs``, ``head_params``, ``cumulative_macs`` and ``relative_cost``
        (cumulative_macs / backbone_macs).
    """
    device = next(model.parameters()).device
    image = torch.zeros(1, *image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            backbone_macs = count_macs(lambda: model.forward_static(image))
            backbone_segments, exits = [], []
            spent = 0
            features = image
            for segment in model.segments():
                output, macs = _run_counted(segment.module, features)
                spent += macs
                if segment.kind == "head":
                    exits.append(_exit_row(segment, macs, _params(segment.module), spent, backbone_macs))
                    continue
                features = output
                backbone_segments.append({"name": segment.name, "macs": macs})
                if segment.kind == "classifier":
                    exits.append(_exit_row(segment, 0, 0, spent, backbone_macs))
    finally:
        model.train(was_training)
    if sum(row["macs"] for row in backbone_segments) != backbone_macs:
        raise RuntimeError(f"{type(model.backbone).__name__}'s segments do not add up to its forward pass.")
    head_params = sum(row["head_params"] for row in exits)
    total_params = _params(model)
    return {
        "image_size": list(image_size),
        "backbone_macs": backbone_macs,
        "backbone_params": total_params - head_params,
        "total_params": total_params,
        "backbone_segments": backbone_segments,
        "exits": exits,
    }


def _run_counted(module: torch.nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Output of ``module(x)`` and the MACs it took."""
    counter = FlopCounterMode(display=False)
    with counter:
        output = module(x)
    return output, counter.get_total_flops() // 2


def _exit_row(
    segment: Segment, head_macs: int, head_params: int, cumulative: int, backbone_macs: int
) -> dict:
    position = "final classifier" if segment.kind == "classifier" else position_name(segment.position)
    return {
        "index": segment.exit_index,
        "position": position,
        "head_macs": head_macs,
        "head_params": head_params,
        "cumulative_macs": cumulative,
        "relative_cost": cumulative / backbone_macs,
    }


def dynamic_cost(exit_index: np.ndarray | Tensor, table: dict) -> dict:
    """Mean cost per example of early-exit inference, given each example's exit and :func:`flops_table`.

    Returns:
        ``mean_macs``, ``saving`` = 1 - mean_macs / backbone_macs (negative when the heads cost more than
        early exits save) and ``saving_trunk``, the saving with the heads not counted (`ExitCosts`).
    """
    if isinstance(exit_index, Tensor):
        exit_index = exit_index.detach().cpu().numpy()
    exit_index = np.asarray(exit_index)
    num_exits = len(table["exits"])
    if exit_index.size == 0:
        raise ValueError("exit_index is empty: need at least one example to average the cost over.")
    integer = np.issubdtype(exit_index.dtype, np.integer)
    if not integer or exit_index.min() < 0 or exit_index.max() >= num_exits:
        raise ValueError(
            f"exit_index must hold integers in [0, {num_exits - 1}], got values"
            f" {np.unique(exit_index)[:10].tolist()} of dtype {exit_index.dtype}."
        )
    return ExitCosts.from_table(table).of(exit_index)
