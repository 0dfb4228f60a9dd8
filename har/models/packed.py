"""K networks of one structure computed as one K-wide network, so a pack of small runs fills a GPU.

Member k's channels are the k-th block of every feature map: an image batch of K members is laid out
B x (K * 3) x H x W, every convolution becomes a grouped convolution over K x C channels (K times the groups),
every batch norm one batch norm over K x C channels, every dense layer K dense layers applied at once. Nothing
mixes channels of two members, so each member computes what it computes alone (up to the rounding of another
kernel) and a non-finite value of one member never reaches another.

Every fused tensor is the members' tensors concatenated along dimension 0 in member order, under the member's
own parameter name: member k's part of any parameter, buffer or optimiser state is `t.unflatten(0, (K, -1))[k]`
(a view in any memory format, channels-last included). That one rule moves state between the members' own
modules (which keep the single-run checkpoint format) and the pack.
Supported leaves are those of the CIFAR ResNets with their exits (convolution, batch norm, linear and cosine
classifiers, the option-A shortcut, parameter-free layers); anything else is refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from har.errors import PackError
from har.models.exits import Linear, NormedLinear, at_least_float32
from har.models.resnet_cifar import ZeroPadShortcut


def _cat(members: Sequence[Tensor]) -> Tensor:
    return torch.cat([m.detach() for m in members], dim=0).clone()


class PackedConv2d(nn.Conv2d):
    """K convolutions as one with K times the groups; weight (K * out) x (in / groups) x kh x kw."""

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        c, k = convs[0], len(convs)
        super().__init__(c.in_channels * k, c.out_channels * k, c.kernel_size, c.stride, c.padding, c.dilation,
                         c.groups * k, c.bias is not None, c.padding_mode, device=c.weight.device,
                         dtype=c.weight.dtype)
        self.weight = nn.Parameter(_cat([m.weight for m in convs]), c.weight.requires_grad)
        if c.bias is not None:
            self.bias = nn.Parameter(_cat([m.bias for m in convs]), c.bias.requires_grad)


class PackedBatchNorm2d(nn.BatchNorm2d):
    """K batch norms as one over K x C channels (statistics are per channel, so per member)."""

    def __init__(self, norms: Sequence[nn.BatchNorm2d]) -> None:
        n, k = norms[0], len(norms)
        super().__init__(n.num_features * k, n.eps, n.momentum, n.affine, n.track_running_stats,
                         device=_device(n), dtype=_dtype(n))
        for name, value in n.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(_cat([getattr(m, name) for m in norms]), value.requires_grad))
        if n.track_running_stats:
            self.running_mean.copy_(_cat([m.running_mean for m in norms]))
            self.running_var.copy_(_cat([m.running_var for m in norms]))
            # one step counter for all: members of a pack have taken the same steps
            self.num_batches_tracked.copy_(_shared([m.num_batches_tracked for m in norms], "num_batches_tracked"))


class PackedLinear(nn.Module):
    """K dense layers: (B, K * in) -> (B, K * out); weight K x out x in, bias K x out."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.k = len(linears)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]).clone(),
                                   linears[0].weight.requires_grad)
        self.bias = None if linears[0].bias is None else nn.Parameter(
            torch.stack([m.bias.detach() for m in linears]).clone(), linears[0].bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # in float32 as `Linear`
            out = torch.einsum("bki,koi->bko", at_least_float32(x).view(x.shape[0], self.k, -1), self.weight)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(x.shape[0], -1)


class PackedNormedLinear(nn.Module):
    """K cosine classifiers (`NormedLinear`): (B, K * in) -> (B, K * out); weight K x in x out."""

    def __init__(self, layers: Sequence[NormedLinear]) -> None:
        super().__init__()
        self.k = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone(),
                                   layers[0].weight.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # in float32 as `NormedLinear`
            features = F.normalize(at_least_float32(x).view(x.shape[0], self.k, -1), dim=2)
            out = torch.einsum("bki,kio->bko", features, F.normalize(self.weight, dim=1))
            return out.reshape(x.shape[0], -1)


class PackedZeroPadShortcut(nn.Module):
    """The option-A shortcut per member: subsample, then zero-pad each member's own channel block."""

    def __init__(self, shortcuts: Sequence[ZeroPadShortcut]) -> None:
        super().__init__()
        s = shortcuts[0]
        self.k, self.stride, self.pad_front, self.pad_back = len(shortcuts), s.stride, s.pad_front, s.pad_back

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        b, _, h, w = x.shape
        x = F.pad(x.reshape(b, self.k, -1, h, w), (0, 0, 0, 0, self.pad_front, self.pad_back))
        return x.reshape(b, -1, h, w)


def _device(module: nn.Module) -> torch.device:
    return next(t for t in [*module.parameters(), *module.buffers()]).device


def _dtype(module: nn.Module) -> torch.dtype:
    return next(t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()).dtype


def _shared(values: Sequence[Tensor], what: str) -> Tensor:
    if any(not torch.equal(values[0], v) for v in values[1:]):
        raise PackError(f"the members' {what} differ ({[v.tolist() for v in values]}); members of a pack must have "
                        f"trained the same number of steps")
    return values[0].detach().clone()


FUSED: dict[type, Callable[[Sequence], nn.Module]] = {
    nn.Conv2d: PackedConv2d, nn.BatchNorm2d: PackedBatchNorm2d, nn.Linear: PackedLinear, Linear: PackedLinear,
    NormedLinear: PackedNormedLinear, ZeroPadShortcut: PackedZeroPadShortcut,
}
# Layers without state that compute the same on the K-wide layout as on one member's.
STATELESS = (nn.ReLU, nn.Identity, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Sequential, nn.ModuleList)


def _fuse(members: Sequence[nn.Module], path: str) -> nn.Module:
    first = members[0]
    kind = type(first)
    where = path or "the model"
    if any(type(m) is not kind for m in members):
        raise PackError(f"{where}: the members' layers differ ({sorted({type(m).__name__ for m in members})})")
    if any(m.extra_repr() != first.extra_repr() for m in members):
        raise PackError(f"{where}: the members' {kind.__name__} layers differ "
                        f"({sorted({m.extra_repr() for m in members})})")
    if kind in FUSED:
        return FUSED[kind](members)
    own = [*first.named_parameters(recurse=False), *first.named_buffers(recurse=False)]
    if own:
        raise PackError(f"{where}: a {kind.__name__} holds its own tensors ({[n for n, _ in own]}) and has no "
                        f"packed form; supported: {sorted(t.__name__ for t in FUSED)}")
    names = list(first._modules)
    if any(list(m._modules) != names for m in members):
        raise PackError(f"{where}: the members' sub-layers differ")
    if not names and not isinstance(first, STATELESS):
        raise PackError(f"{where}: {kind.__name__} has no packed form; supported: "
                        f"{sorted(t.__name__ for t in FUSED)} and parameter-free {[t.__name__ for t in STATELESS]}")
    fused = copy.copy(first)  # the container's own attributes (layout, exit positions) and forward
    fused._modules = {name: _fuse([m._modules[name] for m in members], f"{path}.{name}".lstrip("."))
                      for name in names}
    fused._parameters, fused._buffers = {}, {}
    return fused


class PackedNet(nn.Module):
    """K multi-exit networks of one structure as one K-wide network.

    `forward` takes the members' batches stacked as K x B x C x H x W and returns, for every exit, the members'
    logits K x B x classes. `load_members` and `store_members` copy each member's tensors into the pack and back,
    in place, so a compiled pack keeps its tensors from epoch to epoch.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise PackError("a pack needs at least one member")
        self.k = len(members)
        self.net = _fuse(members, "")
        self.num_exits = getattr(members[0], "num_exits", 1)
        member_names = [n for n, _ in members[0].named_parameters()]
        if [n.removeprefix("net.") for n, _ in self.named_parameters()] != member_names:
            raise PackError("the packed network's parameters do not match the members' (an unsupported layer)")

    def _split(self, x: Tensor) -> Tensor:
        """A K-wide output B x (K * n) as K x B x n."""
        return x.view(x.shape[0], self.k, -1).transpose(0, 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        k, b = images.shape[:2]
        if k != self.k:
            raise ValueError(f"the pack has {self.k} members, got batches of {k}")
        x = images.transpose(0, 1).reshape(b, k * images.shape[2], *images.shape[3:])
        return [self._split(out) for out in self.net(x)]

    def forward_static(self, images: Tensor) -> Tensor:
        """Every member's backbone logits (K x B x classes) on the same images (B x C x H x W)."""
        return self._split(self.net.forward_static(images.repeat(1, self.k, 1, 1)))

    def member_tensors(self) -> dict[str, Tensor]:
        """Every fused parameter and buffer under the member's name."""
        return {name.removeprefix("net."): t for name, t in [*self.named_parameters(), *self.named_buffers()]}

    def member_view(self, fused: Tensor, index: int, like: Tensor) -> Tensor:
        """Member `index`'s part of a fused tensor (or of its optimiser state), shaped like the member's `like`."""
        if fused.numel() == like.numel():  # shared by all members (batch norm's step counter)
            return fused.view_as(like)
        return fused.unflatten(0, (self.k, -1))[index].reshape(like.shape)

    @torch.no_grad()
    def load_members(self, members: Sequence[nn.Module]) -> None:
        """Copy the members' parameters and buffers into the pack (in place)."""
        self._check(members)
        states = [dict(m.state_dict(keep_vars=True)) for m in members]
        for name, fused in self.member_tensors().items():
            parts = [s[name].detach() for s in states]
            if fused.numel() == parts[0].numel():
                fused.copy_(_shared(parts, name))
            else:
                for block, part in zip(fused.unflatten(0, (self.k, -1)), parts, strict=True):
                    block.copy_(part.reshape(block.shape))

    @torch.no_grad()
    def store_members(self, members: Sequence[nn.Module]) -> None:
        """Copy the pack's parameters and buffers back into the members' own modules (in place)."""
        self._check(members)
        fused = self.member_tensors()
        for index, member in enumerate(members):
            for name, tensor in member.state_dict(keep_vars=True).items():
                tensor.detach().copy_(self.member_view(fused[name], index, tensor))

    def _check(self, members: Sequence[nn.Module]) -> None:
        if len(members) != self.k:
            raise ValueError(f"the pack has {self.k} members, got {len(members)}")
