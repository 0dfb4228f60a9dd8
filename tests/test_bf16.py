"""bf16 convolutions computed in float32 (har.engine.bf16): the arithmetic of a bf16 hardware kernel."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from har.engine import bf16


def _rounded_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The convolution of the bf16-rounded operands in float64: a bf16 kernel's result before its output rounding."""
    return F.conv2d(x.to(torch.bfloat16).double(), w.to(torch.bfloat16).double(), padding=1)


def test_convolution_is_one_bf16_rounding_of_the_exact_result() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    w = (0.2 * torch.randn(16, 8, 3, 3)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16.Bf16ConvolutionsInFloat32():
        y = F.conv2d(x, w, padding=1)
    assert y.dtype == torch.bfloat16
    reference = _rounded_reference(x.detach(), w.detach())
    # float32 sums of 72 exact products, then one rounding to bf16 (8 significant bits): within 2^-8 relative
    assert torch.all((y.double() - reference).abs() <= 2.0**-8 * reference.abs() + 1e-6)
    g = torch.randn_like(y, dtype=torch.float32)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert gx.dtype == gw.dtype == torch.float32  # the leaves' own dtype, as autocast's casts give back
    xd = x.detach().to(torch.bfloat16).double().requires_grad_()
    wd = w.detach().to(torch.bfloat16).double().requires_grad_()
    rx, rw = torch.autograd.grad(F.conv2d(xd, wd, padding=1), (xd, wd), g.to(torch.bfloat16).double())
    for got, ref in ((gx, rx), (gw, rw)):
        assert torch.equal(got, got.to(torch.bfloat16).float())  # rounded to bf16 on the way back
        assert torch.all((got.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-5)


def test_module_convolutions_are_taken_and_other_ops_left_alone() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16.Bf16ConvolutionsInFloat32():
        conv = net[0](x)
        out = net(x)
    with torch.autocast("cpu", enabled=False):
        expected = F.conv2d(x.to(torch.bfloat16).float(), net[0].weight.to(torch.bfloat16).float(),
                            net[0].bias.to(torch.bfloat16).float(), padding=1).to(torch.bfloat16)
    assert torch.equal(conv, expected)  # the same float32 kernel on the same operands
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert out.dtype == net(x).dtype  # the linear layer still goes through autocast as before


def test_without_autocast_convolutions_stay_float32() -> None:
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with bf16.Bf16ConvolutionsInFloat32():
        y = F.conv2d(x, w)
    assert y.dtype == torch.float32 and torch.equal(y, F.conv2d(x, w))


@pytest.mark.parametrize(("device", "amp", "native", "taken"), [
    ("cpu", True, False, True), ("cpu", True, True, False), ("cpu", False, False, False),
    ("meta", True, False, False)])
def test_taken_only_for_autocast_on_a_cpu_without_bf16_hardware(monkeypatch: pytest.MonkeyPatch, device: str,
                                                                 amp: bool, native: bool, taken: bool) -> None:
    monkeypatch.setattr(bf16, "native_bf16", lambda: native)
    context = bf16.bf16_convolutions(torch.device(device), amp)
    assert isinstance(context, bf16.Bf16ConvolutionsInFloat32) == taken
    assert isinstance(context, contextlib.nullcontext) != taken


def test_a_compiled_step_takes_it_in_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train.compile` on such a CPU: the mode is traced with the network (no graph break), with the eager result."""
    monkeypatch.setattr(bf16, "native_bf16", lambda: False)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16), bf16.bf16_convolutions(x.device, True):
            return net(x).float().sum()

    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(torch.compile(step, backend="aot_eager", fullgraph=True)(x), step(x))
