"""bf16 convolutions on this CPU: oneDNN's own kernel against `har.engine.bf16` (float32 from bf16 operands).

For each of ResNet-32's convolution shapes (batch 128, channels-last), it times the forward of a float32
convolution, of autocast's bf16 convolution (oneDNN: hardware kernels on a CPU with AVX512-BF16 or AMX, a fallback
elsewhere) and of the same under `Bf16ConvolutionsInFloat32`, and measures how far each one's output and input and
weight gradients land from a float64 convolution of the same bf16-rounded operands (mean absolute error over mean
absolute value; one rounding to bf16 gives about 1.4e-3). It prints figures; it is not a timed test.

    python benchmarks/bf16_convolutions.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from har.engine.bf16 import Bf16ConvolutionsInFloat32
from har.run.machine import cpu_flags, cpu_model, native_bf16

SHAPES = ((16, 16, 32), (32, 32, 16), (64, 64, 8))  # (in, out, side) of ResNet-32's three stages' 3x3 convolutions


def _timed(fn: Callable[[], Tensor], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def errors(x: Tensor, w: Tensor, grad: Tensor, emulated: bool) -> tuple[float, float, float]:
    """Relative mean errors of output, input gradient and weight gradient of the autocast convolution."""
    xb, wb = x.detach().requires_grad_(), w.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if emulated:
            with Bf16ConvolutionsInFloat32():
                y = F.conv2d(xb, wb, padding=1)
        else:
            y = F.conv2d(xb, wb, padding=1)
    gx, gw = torch.autograd.grad(y, (xb, wb), grad)
    xd = x.detach().to(torch.bfloat16).double().requires_grad_()
    wd = w.detach().to(torch.bfloat16).double().requires_grad_()
    yd = F.conv2d(xd, wd, padding=1)
    rx, rw = torch.autograd.grad(yd, (xd, wd), grad.double())

    def rel(got: Tensor, ref: Tensor) -> float:
        return ((got.double() - ref).abs().mean() / ref.abs().mean()).item()
    return rel(y, yd), rel(gx, rx), rel(gw, rw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default: 1)")
    parser.add_argument("--batch", type=int, default=128, help="images per convolution (default: 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per row (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx2", "avx512f", "avx512_bf16", "amx")))
    print(f"CPU: {cpu_model()} ({', '.join(flags) or 'no AVX2/AVX-512/AMX flags'}); bf16 hardware: {native_bf16()}; "
          f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, channels-last\n")
    print("| in, out, side | fp32 ms | bf16 oneDNN ms | bf16 float32-path ms | oneDNN error (out / dx / dw) "
          "| float32-path error (out / dx / dw) |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for c_in, c_out, side in SHAPES:
        x = torch.randn(args.batch, c_in, side, side).to(memory_format=torch.channels_last)
        w = (torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5).to(memory_format=torch.channels_last)
        grad = torch.randn(args.batch, c_out, side, side).to(torch.bfloat16)
        fp32 = _timed(lambda: F.conv2d(x, w, padding=1), args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            onednn = _timed(lambda: F.conv2d(x, w, padding=1), args.repeats)
            with Bf16ConvolutionsInFloat32():
                path = _timed(lambda: F.conv2d(x, w, padding=1), args.repeats)
        e_native = " / ".join(f"{e:.2e}" for e in errors(x, w, grad, emulated=False))
        e_path = " / ".join(f"{e:.2e}" for e in errors(x, w, grad, emulated=True))
        print(f"| {c_in}, {c_out}, {side} | {fp32:.1f} | {onednn:.1f} | {path:.1f} | {e_native} | {e_path} |")


if __name__ == "__main__":
    main()
