"""torchvision's ImageNet DenseNet-169 as a multi-exit backbone.

The backbone is torchvision's own module tree (14,149,480 parameters and 3.36 GMACs at 224 x 224 for 1000
classes). Its feature maps are narrow (64..640 channels where exits go), so the plain two-convolution
:class:`~har.models.exits.ExitHead` stays cheap: with 128 kernels and stride 2 the four heads of the default
layout add about 4.5% to the backbone's MACs.
"""

from __future__ import annotations

from torch import nn

from har.models.exits import Backbone, Linear, make_classifier


class DenseNet169(Backbone):
    """DenseNet-169 split as stem (conv0, norm0, relu0, pool0) and four groups of a dense block + transition.

    The last group has no transition but ends with norm5 + ReLU, which torchvision's forward pass applies.
    """

    default_exit_channels = 128

    def __init__(self, num_classes: int, classifier: str = "linear") -> None:
        super().__init__(num_classes, classifier)
        from torchvision.models import densenet169  # deferred: importing torchvision.models takes seconds

        net = densenet169(weights=None, num_classes=num_classes)
        features = net.features
        self.stem = nn.Sequential(features.conv0, features.norm0, features.relu0, features.pool0)
        self.groups = nn.ModuleList(
            [
                nn.Sequential(features.denseblock1, features.transition1),
                nn.Sequential(features.denseblock2, features.transition2),
                nn.Sequential(features.denseblock3, features.transition3),
                nn.Sequential(features.denseblock4, features.norm5, nn.ReLU(inplace=True)),
            ]
        )
        self.channels = (64, 128, 256, 640, 1664)
        self.reductions = (4, 8, 16, 32, 32)
        self.classifier = (
            Linear.of(net.classifier) if classifier == "linear" else make_classifier(classifier, 1664, num_classes)
        )
