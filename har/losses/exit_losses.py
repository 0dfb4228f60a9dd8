"""Losses applied at each exit of a multi-exit network: cross entropy, focal and LDAM (as in LDAM-DRW).

Each loss exposes its per-example values and the per-example normaliser of its own mean reduction, so
``HARLoss`` can sum an example's losses over several exits and still reduce the batch exactly as the
single-exit loss would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from har.losses.weights import as_class_counts

EXIT_LOSS_NAMES: tuple[str, ...] = ("ce", "focal", "ldam")


class ExitLoss(nn.Module):
    """Base class: ``forward`` is ``per_example(...).sum() / normaliser(...).sum()``.

    The class weight is a non-persistent buffer so ``.to(device)`` moves it, while checkpoints stay loadable
    whichever DRW phase they were saved in (the weights are rebuilt from the schedule, not restored).

    Args:
        weight: Optional per-class weights of shape [C].
    """

    weight: Tensor | None

    def __init__(self, weight: Tensor | None = None) -> None:
        super().__init__()
        # Empty buffer that follows ``.to(device)``: tells ``set_weight`` where to put weights even when the
        # module currently holds none.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self.register_buffer("weight", None, persistent=False)
        self.set_weight(weight)

    def set_weight(self, weight: Tensor | None) -> None:
        """Replace the class weights (e.g. when DRW switches on), placing them on the module's device.

        New weights of the same shape are copied into the current tensor rather than replacing it: a compiled step
        replayed as a CUDA graph reads buffers at fixed addresses and would otherwise be recorded again.
        """
        if weight is None:
            self.weight = None
            return
        if weight.ndim != 1:
            raise ValueError(f"weight must be 1-D [num_classes], got shape {tuple(weight.shape)}")
        if self.weight is not None and self.weight.shape == weight.shape:
            self.weight.copy_(weight.detach())
        else:  # a copy of its own, never the caller's tensor, since later weights are written into it
            self.weight = weight.detach().to(device=self._anchor.device, dtype=self._anchor.dtype, copy=True)

    def per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-example loss [N], with the class weight already applied."""
        raise NotImplementedError

    def normaliser(self, target: Tensor) -> Tensor:
        """What this loss's mean reduction divides each example by: w_y when weighted, else 1."""
        if self.weight is None:
            return torch.ones(target.shape, dtype=torch.float32, device=target.device)
        return self.weight[target]

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Batch loss with the same reduction as the reference implementation."""
        return self.per_example(logits, target).sum() / self.normaliser(target).sum()


class CrossEntropyLoss(ExitLoss):
    """Cross entropy; with weights the batch value is torch's weighted mean sum(w_y * ce) / sum(w_y)."""

    def per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, weight=self.weight, reduction="none")


class FocalLoss(ExitLoss):
    """Focal loss as in LDAM-DRW: ce already weighted, (1 - exp(-ce)) ** gamma * ce, plain mean over examples.

    ``1 - exp(-ce)`` is computed with ``expm1`` and clamped at the smallest normal float: the forward value is
    unchanged, but an example with ce == 0 no longer yields a NaN gradient for 0 < gamma < 1.

    Args:
        gamma: Focusing parameter, >= 0; 0 gives cross entropy.
        weight: Optional per-class weights of shape [C].
    """

    def __init__(self, gamma: float, weight: Tensor | None = None) -> None:
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma!r}")
        super().__init__(weight)
        self.gamma = float(gamma)

    def per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, target, weight=self.weight, reduction="none")
        one_minus_p = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).tiny)
        return one_minus_p**self.gamma * ce

    def normaliser(self, target: Tensor) -> Tensor:
        """Always 1: LDAM-DRW's focal loss averages plainly even when weighted."""
        return torch.ones(target.shape, dtype=torch.float32, device=target.device)


class LDAMLoss(ExitLoss):
    """Label-distribution-aware margin loss (Cao et al., 2019) on cosine logits.

    The true-class logit is lowered by m_y = n_y ** -1/4, scaled so the largest margin (rarest class) is
    ``max_margin``, then cross entropy is taken on ``scale * logits``. The HAR paper's Eq. 6 prints the margin
    as C / n, but LDAM and the paper's own "largest margin 0.5" use n ** -1/4; we follow LDAM.

    Args:
        class_counts: Training examples per class, all >= 1.
        max_margin: Margin of the rarest class, > 0.
        scale: Multiplier applied to the (cosine) logits before the softmax, > 0.
        weight: Optional per-class weights of shape [C].
    """

    margins: Tensor

    def __init__(
        self,
        class_counts: Sequence[int],
        max_margin: float = 0.5,
        scale: float = 30.0,
        weight: Tensor | None = None,
    ) -> None:
        counts = as_class_counts(class_counts)
        if max_margin <= 0:
            raise ValueError(f"max_margin must be > 0, got {max_margin!r}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        super().__init__()
        self.num_classes = int(counts.size)
        margins = counts**-0.25
        margins = margins * (max_margin / margins.max())
        # Non-persistent: derived from the class counts, which the caller always has.
        self.register_buffer("margins", torch.tensor(margins, dtype=torch.float32), persistent=False)
        self.scale = float(scale)
        self.set_weight(weight)

    def set_weight(self, weight: Tensor | None) -> None:
        if weight is not None and weight.shape != (self.num_classes,):
            raise ValueError(f"weight must have shape ({self.num_classes},), got {tuple(weight.shape)}")
        super().set_weight(weight)

    def per_example(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[-1]} classes but LDAM was built for {self.num_classes}"
            )
        true_margin = self.margins[target, None].to(logits.dtype)
        margin = torch.zeros_like(logits).scatter_(1, target[:, None], true_margin)
        return F.cross_entropy(self.scale * (logits - margin), target, weight=self.weight, reduction="none")


def build_exit_loss(
    name: str,
    class_counts: Sequence[int],
    *,
    focal_gamma: float = 0.5,
    ldam_max_margin: float = 0.5,
    ldam_scale: float = 30.0,
) -> ExitLoss:
    """Build an unweighted exit loss by name; class weights are set later through ``set_weight``.

    Args:
        name: One of ``EXIT_LOSS_NAMES``.
        class_counts: Training examples per class (used by LDAM for its margins).
        focal_gamma: Focal loss gamma.
        ldam_max_margin: LDAM margin of the rarest class.
        ldam_scale: LDAM logit scale.
    """
    if name == "ce":
        return CrossEntropyLoss()
    if name == "focal":
        return FocalLoss(focal_gamma)
    if name == "ldam":
        return LDAMLoss(class_counts, max_margin=ldam_max_margin, scale=ldam_scale)
    raise ValueError(f"unknown exit loss {name!r}; choose one of {', '.join(EXIT_LOSS_NAMES)}")
