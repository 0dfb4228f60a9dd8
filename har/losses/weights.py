"""Per-class loss weights: class-balanced (effective number) and the deferred re-weighting schedule (DRW).

Both follow LDAM-DRW (Cao et al., NeurIPS 2019; github.com/kaidic/LDAM-DRW, ``cifar_train.py``), which the HAR
paper uses as its re-weighting baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

REWEIGHT_MODES: tuple[str, ...] = ("none", "cb", "drw")


def as_class_counts(class_counts: Sequence[int]) -> np.ndarray:
    """Class counts as float64; rejects empty lists and empty classes (weight and margin undefined)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got {class_counts!r}")
    if np.any(counts < 1):
        raise ValueError(f"class_counts must all be >= 1, got {class_counts!r}")
    return counts


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Class-balanced weights w_c = (1 - beta) / (1 - beta ** n_c), normalised to sum to C classes.

    The effective number (1 - beta ** n) / (1 - beta) models diminishing returns of extra samples (Cui et al.,
    CVPR 2019); normalising to sum C keeps the overall loss scale comparable to unweighted training.

    Args:
        class_counts: Training examples per class, all >= 1.
        beta: Hyper-parameter in [0, 1); 0 gives all ones, values near 1 approach inverse frequency.

    Returns:
        Float32 tensor of shape [C] on the CPU.
    """
    counts = as_class_counts(class_counts)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    weights = weights / weights.sum() * counts.size
    return torch.tensor(weights, dtype=torch.float32)


class ReweightSchedule:
    """Per-epoch class weights for the exit losses.

    Modes:
        ``"none"``: no weights at any epoch.
        ``"cb"``: class-balanced weights from epoch 0.
        ``"drw"``: no weights before ``drw_epoch``, class-balanced from it on. Deferring lets the features be
        learnt on the natural distribution first (LDAM-DRW switches at epoch 160 of 200).

    Args:
        mode: One of ``REWEIGHT_MODES``.
        class_counts: Training examples per class.
        beta: Effective-number hyper-parameter for the class-balanced weights.
        drw_epoch: 0-based epoch at which ``"drw"`` switches weights on.
    """

    def __init__(
        self, mode: str, class_counts: Sequence[int], beta: float = 0.9999, drw_epoch: int = 160
    ) -> None:
        if mode not in REWEIGHT_MODES:
            raise ValueError(f"unknown reweighting mode {mode!r}; choose one of {', '.join(REWEIGHT_MODES)}")
        if drw_epoch < 0:
            raise ValueError(f"drw_epoch must be >= 0, got {drw_epoch!r}")
        self.mode = mode
        self.drw_epoch = drw_epoch
        self._balanced = class_balanced_weights(class_counts, beta)

    def weights(self, epoch: int) -> torch.Tensor | None:
        """Class weights for the 0-based ``epoch`` as a fresh CPU tensor, or None for unweighted losses."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        if self.mode == "none" or (self.mode == "drw" and epoch < self.drw_epoch):
            return None
        return self._balanced.clone()
