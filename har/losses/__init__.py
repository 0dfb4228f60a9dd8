"""Losses for HAR training: per-exit losses, class re-weighting schedules and the HAR multi-exit loss."""

from har.losses.exit_losses import (
    EXIT_LOSS_NAMES,
    CrossEntropyLoss,
    ExitLoss,
    FocalLoss,
    LDAMLoss,
    build_exit_loss,
)
from har.losses.har import HARComponents, HARLoss, exit_statistics
from har.losses.weights import REWEIGHT_MODES, ReweightSchedule, class_balanced_weights

__all__ = [
    "EXIT_LOSS_NAMES",
    "REWEIGHT_MODES",
    "CrossEntropyLoss",
    "ExitLoss",
    "FocalLoss",
    "HARComponents",
    "HARLoss",
    "LDAMLoss",
    "ReweightSchedule",
    "build_exit_loss",
    "class_balanced_weights",
    "exit_statistics",
]
