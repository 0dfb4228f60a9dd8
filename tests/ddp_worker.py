"""A training process for tests/test_distributed.py, started by torchrun (or imported for the one-process run).

It trains a small batch-norm-free network on the synthetic data of conftest: batch norm normalises each
process's share with that share's statistics, so only a network without it can give exactly the one-process
result of the same global batch (the trainer's loss and gradient reduction are what the test checks).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from torch import nn

from har.models.exits import Backbone, make_classifier
from har.models.registry import list_models, register_model

STOP_AT_CALL = "HAR_TEST_SIGNAL_AT_STEP"  # environment variable: send SIGUSR1 to self at this global step


class PlainConvNet(Backbone):
    """Three conv-ReLU groups without normalisation; exit heads pool and classify."""

    default_exit_channels = 8

    def __init__(self, num_classes: int, classifier: str) -> None:
        super().__init__(num_classes, classifier)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.groups = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
                                    for _ in range(3))
        self.channels = (8, 8, 8, 8)
        self.reductions = (1, 2, 4, 8)
        self.classifier = make_classifier(classifier, 8, num_classes)

    def make_exit_head(self, position: int, channels: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), make_classifier(self.classifier_kind, 8,
                                                                                     self.num_classes))


if "plain_convnet" not in list_models():
    @register_model(default_layout="CEBEBBE")
    def plain_convnet(num_classes: int, classifier: str) -> Backbone:
        return PlainConvNet(num_classes, classifier)


def main() -> None:
    from conftest import synthetic_data

    from har.config import from_dict
    from har.data import loader
    from har.engine.signals import EXIT_TEMPFAIL, TrainingInterrupted
    from har.engine.trainer import train

    out, values = sys.argv[1], json.loads(sys.argv[2])
    stop_at = int(os.environ.get(STOP_AT_CALL, "-1"))
    if stop_at >= 0:  # every process asks to stop at the same step, as SLURM signals every task
        real_epoch = loader.TensorBatches.epoch
        calls = iter(range(10**6))

        def epoch(self, *args, **kwargs):
            for batch in real_epoch(self, *args, **kwargs):
                if next(calls) == stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                yield batch

        loader.TensorBatches.epoch = epoch
    try:
        train(from_dict(values), out, data=synthetic_data())
    except TrainingInterrupted:
        sys.exit(EXIT_TEMPFAIL)


if __name__ == "__main__":
    main()
