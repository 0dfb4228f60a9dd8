"""The numerics a run trains in, set for the length of its training and restored after: exact fp32 convolutions
and matmuls on CUDA (no TF32), deterministic algorithms on the CPU when the config asks for them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def exact_fp32(device: torch.device, amp: bool) -> Iterator[None]:
    """While a run trains in fp32 on CUDA, convolutions and matmuls compute in fp32, not TF32 (10-bit mantissa),
    which cuDNN allows by default on Ampere and later: the paper's V100s had none. The settings are restored after,
    and `machine.jsonl` records whether TF32 was on."""
    if device.type != "cuda" or amp:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def deterministic_cpu(device: torch.device, on: bool) -> Iterator[None]:
    """While a CPU run trains with `train.deterministic`, torch uses only deterministic algorithms (warning where
    an operation has none); the global setting is restored after, so a run leaves the process as it found it."""
    if device.type == "cuda" or not on:
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
