"""CIFAR ResNets of He et al. (2016), identical to LDAM-DRW's ``resnet32`` so results stay comparable.

The shortcut is option A: parameter-free stride-2 subsampling with zero-padded extra channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from har.models.exits import Backbone, init_weights, make_classifier


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (batch norm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad the new channels, adding no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection and a final ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(Backbone):
    """CIFAR ResNet with three groups of ``blocks_per_group`` basic blocks (16, 32, 64 channels).

    ``blocks_per_group=5`` is ResNet-32 (6 * 5 + 2 layers).
    """

    def __init__(self, blocks_per_group: int, num_classes: int, classifier: str = "linear") -> None:
        super().__init__(num_classes, classifier)
        widths = (16, 32, 64)
        self.stem = nn.Sequential(conv3x3(3, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        groups = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(in_channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_group - 1)]
            groups.append(nn.Sequential(*blocks))
            in_channels = width
        self.groups = nn.ModuleList(groups)
        self.channels = (widths[0], *widths)
        self.reductions = (1, 1, 2, 4)
        self.classifier = make_classifier(classifier, widths[-1], num_classes)
        self.apply(init_weights)


def resnet32_cifar(num_classes: int, classifier: str = "linear") -> ResNetCifar:
    """ResNet-32 for 32x32 images: 464,154 parameters and 68.9M multiply-accumulates with 10 classes."""
    return ResNetCifar(5, num_classes, classifier)


def resnet8_cifar(num_classes: int, classifier: str = "linear") -> ResNetCifar:
    """ResNet-8, one block per group: ResNet-32's shape (groups, widths, exits) at about a sixth of its cost, for
    tests and smoke runs that exercise the machinery rather than the accuracy."""
    return ResNetCifar(1, num_classes, classifier)
