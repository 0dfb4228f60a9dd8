"""Shared fixtures: small synthetic long-tailed data (seconds on a CPU) and the shared CIFAR-10 copy."""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from har.data.build import RunData, Split
from har.data.longtail import shot_groups
from har.run.machine import FORCE_ENV

REPO = Path(__file__).resolve().parents[1]
# Runs that leave train.amp unset train in fp32 on every machine, in this process and in the jobs it starts, so that no
# test depends on whether the CPU has native bf16 (tests/test_precision.py simulates both kinds).
os.environ[FORCE_ENV] = "0"


def synthetic_split(counts, seed):
    """Images whose colour depends on the class, so a few steps of training can learn them."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[labels % 4]
    noise = rng.integers(-40, 40, size=(len(labels), 32, 32, 3))
    images = np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return Split(images, labels)


def synthetic_data(counts=(40, 12, 4), per_class_eval=6) -> RunData:
    k = len(counts)
    return RunData(train=synthetic_split(counts, 0), val=synthetic_split([per_class_eval] * k, 1),
                   test=synthetic_split([per_class_eval] * k, 2), class_counts=list(counts),
                   groups=shot_groups(counts), classes=[f"c{i}" for i in range(k)])


@pytest.fixture
def tiny_data() -> RunData:
    return synthetic_data()


def shared_cifar_root() -> Path | None:
    """The CIFAR-10 copy beside the checkout (or under HAR_DATA), if present."""
    for candidate in (os.environ.get("HAR_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar-10-batches-py").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread: small workloads slow down badly when threads contend on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def feature_shapes(backbone: torch.nn.Module, side: int) -> list[torch.Size]:
    """Shapes of the feature map after the stem and after each block group, for a side x side image."""
    with torch.no_grad():
        x = backbone.stem(torch.zeros(1, 3, side, side))
        shapes = [x.shape]
        for group in backbone.groups:
            x = group(x)
            shapes.append(x.shape)
    return shapes


def thresholds_between(confidences: torch.Tensor, margin: float, quantiles: list[float]) -> list[float]:
    """Thresholds midway between neighbouring distinct confidences at least 2 * margin apart, at these quantiles
    of the gaps: no confidence lies within `margin` of one, so the float rounding by which a sub-batch forward
    differs from the full batch cannot move an example across it."""
    ordered = confidences.flatten().double().unique().sort().values
    wide = (ordered[1:] - ordered[:-1]) > 2 * margin
    midpoints = ((ordered[1:] + ordered[:-1]) / 2)[wide]
    return [float(midpoints[int(q * (len(midpoints) - 1))]) for q in quantiles]
