"""torchvision's ImageNet ResNet-50 as a multi-exit backbone, with cheap depthwise-separable exit heads.

The backbone is torchvision's own module tree (same parameters, initialisation and forward pass), so
checkpoints and cost figures stay comparable with the reference: 25,557,032 parameters and 4.09 GMACs at
224 x 224 for 1000 classes.
"""

from __future__ import annotations

from torch import nn

from har.models.exits import Backbone, ExitHead, Linear, make_classifier


class SeparableExitHead(ExitHead):
    """Exit head for wide feature maps: two depthwise-separable blocks, global average pooling, dense layer.

    Each block is a 3x3 depthwise convolution with stride ``stride`` + BN + ReLU, then a 1x1 pointwise
    convolution to ``channels`` + BN + ReLU (MobileNet style). On ResNet-50's 256..1024-channel maps a plain 3x3
    convolution would cost as much as a backbone stage; the separable one costs about 9x less (the paper's
    Appendix B asks for cheap heads). With 256 channels and stride 2, the four heads of the default layout add
    about 3.4% to ResNet-50's MACs at 224 x 224.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, stride: int = 2,
                 classifier: str = "linear") -> None:
        super().__init__(in_channels, num_classes, channels, stride, classifier)

    @staticmethod
    def block(in_channels: int, channels: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class ResNet50(Backbone):
    """ResNet-50 split as stem (conv1, bn1, relu, maxpool) and groups layer1..layer4; classifier fc or cosine."""

    default_exit_channels = 256

    def __init__(self, num_classes: int, classifier: str = "linear") -> None:
        super().__init__(num_classes, classifier)
        from torchvision.models import resnet50  # deferred: importing torchvision.models takes seconds

        net = resnet50(weights=None, num_classes=num_classes)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.groups = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = (64, 256, 512, 1024, 2048)
        self.reductions = (4, 4, 8, 16, 32)
        self.classifier = (Linear.of(net.fc) if classifier == "linear"
                           else make_classifier(classifier, 2048, num_classes))

    def make_exit_head(self, position: int, channels: int, stride: int) -> nn.Module:
        """Depthwise-separable head: a plain 3x3 convolution on these wide maps would rival the backbone."""
        return SeparableExitHead(self.channels[position], self.num_classes, channels, stride, self.classifier_kind)
