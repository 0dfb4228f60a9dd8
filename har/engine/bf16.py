"""bf16 convolutions in float32 arithmetic, for CPUs without bf16 hardware.

Under CPU autocast a convolution takes bf16 input and weight, sums their products in float32 and rounds its output
to bf16. A CPU with AVX512-BF16 or AMX does that in hardware (oneDNN's bf16 kernels). On one without them (an AVX2
AMD EPYC, Zen 3) oneDNN's fallback ran ResNet-32's 3x3 convolutions 10-17x slower than float32, and its weight
gradients landed 8x further from a float64 reference than a single rounding does (docs/method.md, "Precision").

`Bf16ConvolutionsInFloat32` gives such a CPU the hardware kernel's arithmetic at float32 speed: the operands rounded
to bf16 and widened back (products of bf16 numbers are exact in float32), the convolution in float32, the output
rounded to bf16. Gradients pass back through the same roundings, so the input and weight gradients come out in
bf16, rounded once, as autocast's own casts would give them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from har.run.machine import native_bf16

CONVOLUTIONS = (torch.conv1d, torch.conv2d, torch.conv3d)  # what autocast runs in bf16 in a CNN of this project


def _bf16_widened(value: Any) -> Any:
    return value.to(torch.bfloat16).float() if isinstance(value, Tensor) and value.is_floating_point() else value


class Bf16ConvolutionsInFloat32(TorchFunctionMode):
    """While CPU autocast is on, every convolution computes in float32 from bf16-rounded operands and returns bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        if func not in CONVOLUTIONS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = func(*[_bf16_widened(a) for a in args], **{k: _bf16_widened(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16)


def bf16_convolutions(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """Where a training step's autocast runs: `Bf16ConvolutionsInFloat32` under bf16 autocast on a CPU without bf16
    hardware, nothing else anywhere else (the hardware kernels, or float32 throughout)."""
    if amp and device.type == "cpu" and not native_bf16():
        return Bf16ConvolutionsInFloat32()
    return contextlib.nullcontext()
