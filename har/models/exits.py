"""Early-exit branches on a CNN backbone, as used by Hardness Aware Reweighting (HAR).

A multi-exit network is described by a layout string in the notation of Table V of the paper: 'C' is the stem
convolution, 'B' a block group and 'E' an exit. 'CEBEBEBE' on a three-group ResNet-32 puts an exit after the
stem and after the first two groups; the trailing 'E' is always the backbone's own classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from har.facts import parse_layout

CLASSIFIERS = ("linear", "cosine")


def at_least_float32(x: Tensor) -> Tensor:
    """`x` widened to float32 when it is a half type (bf16, fp16); float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class Linear(nn.Linear):
    """A dense classifier that computes in float32 (at least) under autocast, with nn.Linear's parameters.

    Exit logits feed the loss and the exit rule directly; in bf16 they would carry only 8 bits of mantissa, so the
    classifier layers stay in full precision while autocast speeds up the convolutions (docs/method.md).
    """

    @classmethod
    def of(cls, layer: nn.Linear) -> Linear:
        """`layer`'s own parameters in this class (for torchvision's classifiers: no new init, no random draw)."""
        new = nn.utils.skip_init(cls, layer.in_features, layer.out_features, bias=layer.bias is not None)
        new.weight, new.bias = layer.weight, layer.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(at_least_float32(x), self.weight, self.bias)


class NormedLinear(nn.Module):
    """Bias-free cosine classifier as in LDAM-DRW: outputs cos(feature, class weight) in [-1, 1].

    LDAM scales these values inside the loss, so the module itself returns raw cosines, computed in float32 (at
    least) under autocast: bf16 would round them to 2^-8, which LDAM's scale of 30 turns into steps of 0.12.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        # LDAM-DRW's initialisation: unit-norm-ish columns with random directions.
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(at_least_float32(x), dim=1).mm(F.normalize(self.weight, dim=0))


def make_classifier(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """Build the dense layer of an exit or of a backbone, so every exit of a model uses the same kind."""
    if kind == "linear":
        return Linear(in_features, num_classes)
    if kind == "cosine":
        return NormedLinear(in_features, num_classes)
    raise ValueError(f"Unknown classifier {kind!r}; choose one of {CLASSIFIERS}.")


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal init of conv and linear weights, as LDAM-DRW does for its CIFAR ResNets."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class Backbone(nn.Module):
    """A CNN split into pieces between which exit heads can be attached.

    Subclasses build ``stem`` (image -> first feature map), ``groups`` (the block groups, run in order),
    ``channels`` and ``reductions`` (feature channels and spatial down-sampling factor at each position:
    index 0 after the stem, index i after group i) and ``classifier`` (via :func:`make_classifier` on
    ``channels[-1]``). Global average pooling is shared by all backbones.

    Exit heads come from :meth:`make_exit_head` (two-convolution :class:`ExitHead` unless a subclass needs a
    cheaper design for its wide feature maps) with ``default_exit_channels`` kernels unless the caller says.
    """

    stem: nn.Module
    groups: nn.ModuleList
    classifier: nn.Module
    channels: tuple[int, ...]
    reductions: tuple[int, ...]
    default_exit_channels: int = 64

    def __init__(self, num_classes: int, classifier: str) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"Unknown classifier {classifier!r}; choose one of {CLASSIFIERS}.")
        self.num_classes = num_classes
        self.classifier_kind = classifier
        self.pool_features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for group in self.groups:
            x = group(x)
        return self.classifier(self.pool_features(x))

    def make_exit_head(self, position: int, channels: int, stride: int) -> nn.Module:
        """Exit head reading the feature map at ``position`` (0: after the stem, i: after group i)."""
        return ExitHead(self.channels[position], self.num_classes, channels, stride, self.classifier_kind)


def check_head_args(channels: int, stride: int) -> None:
    """Reject head sizes that would fail deep inside a convolution with an obscure message."""
    for name, value in (("channels", channels), ("stride", stride)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Exit head {name} must be a positive integer, got {value!r}.")


class ExitHead(nn.Module):
    """Intermediate classifier: two 3x3 conv-BN-ReLU layers, global average pooling and a dense layer.

    The paper gives the number of kernels (64) but no strides. With stride 1 the heads of ResNet-32 would cost
    more than the backbone itself, so both convolutions use stride 2 by default.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 64,
        stride: int = 2,
        classifier: str = "linear",
    ) -> None:
        super().__init__()
        check_head_args(channels, stride)
        layers = [*self.block(in_channels, channels, stride), *self.block(channels, channels, stride)]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = make_classifier(classifier, channels, num_classes)

    @staticmethod
    def block(in_channels: int, channels: int, stride: int) -> list[nn.Module]:
        """One of the head's two blocks: a 3x3 convolution + BN + ReLU (subclasses swap in cheaper ones)."""
        return [nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True)]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def exit_confidence(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability and predicted class: the one place the exit rule reads logits."""
    return logits.softmax(dim=1).max(dim=1)


def exit_by_threshold(logits: Sequence[Tensor], exit_threshold: float) -> tuple[Tensor, Tensor]:
    """Apply the early-exit rule to the outputs of every exit (masked evaluation).

    An example leaves at the first exit whose max softmax probability is strictly greater than
    ``exit_threshold``, otherwise at the last exit.

    Returns:
        Predictions [N] and 0-based exit indices [N], both long.
    """
    conf, pred = zip(*(exit_confidence(out) for out in logits), strict=True)
    exits_here = torch.stack(conf) > exit_threshold
    exits_here[-1] = True
    exit_index = exits_here.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum
    predictions = torch.stack(pred).gather(0, exit_index.unsqueeze(0)).squeeze(0)
    return predictions, exit_index.long()


@torch.no_grad()
def batch_norm_from(model: nn.Module, images: Tensor) -> nn.Module:
    """Set every batch norm's running statistics to exactly those of `images`, and return the model in eval mode.

    An untrained model with its initial statistics gives near-uniform softmaxes, so no exit would ever fire;
    the early-exit benchmark and the tests time and check exits on such models after this.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: after one pass, exactly this batch's statistics
    model.train()(images)
    return model.eval()


@dataclass(frozen=True)
class Segment:
    """One piece of a multi-exit network's computation, in execution order (used for cost accounting).

    Attributes:
        kind: 'stem' and 'group' map the running feature map to the next one; 'head' reads it and produces the
            logits of an intermediate exit; 'classifier' (pooling + dense layer) gives the last exit's logits.
        name: human readable, e.g. 'group 2' or 'exit 1 head (after group 1)'.
        module: the piece itself, to be called on the running feature map.
        position: number of block groups computed before this piece.
        exit_index: index of the exit the piece produces, None for stem and groups.
    """

    kind: Literal["stem", "group", "head", "classifier"]
    name: str
    module: nn.Module
    position: int
    exit_index: int | None = None


def position_name(position: int) -> str:
    """Human text for a position: 'after stem' or 'after group i'."""
    return "after stem" if position == 0 else f"after group {position}"


class MultiExitNet(nn.Module):
    """A backbone plus exit heads placed according to a layout string.

    Attributes:
        backbone: the wrapped :class:`Backbone`; its classifier is the last exit.
        heads: the intermediate exit heads, in order, built by the backbone's ``make_exit_head`` with
            ``exit_channels`` kernels (None: the backbone's ``default_exit_channels``) and ``exit_stride``.
        layout: the layout string.
        exit_positions: number of block groups computed before each intermediate exit.
        num_exits: intermediate exits + 1.
        num_classes: number of classes.
    """

    def __init__(
        self, backbone: Backbone, layout: str, exit_channels: int | None = None, exit_stride: int = 2
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layout = layout
        self.exit_positions = parse_layout(layout, len(backbone.groups))
        self.num_exits = len(self.exit_positions) + 1
        self.num_classes = backbone.num_classes
        self._exit_at_group = {position: index for index, position in enumerate(self.exit_positions)}
        channels = backbone.default_exit_channels if exit_channels is None else exit_channels
        self.heads = nn.ModuleList(backbone.make_exit_head(p, channels, exit_stride) for p in self.exit_positions)
        self.heads.apply(init_weights)

    def forward(self, x: Tensor, mix: Callable[[Tensor], Tensor] | None = None, mix_at: int = 0) -> list[Tensor]:
        """Logits of every exit in order; the last entry comes from the backbone's classifier.

        ``mix`` (Manifold Mixup) maps the running feature map after ``mix_at`` block groups (0: the images).
        Exit heads reading an earlier position see unmixed features.
        """
        if mix is not None and not 0 <= mix_at <= len(self.backbone.groups):
            raise ValueError(f"mix_at must be in [0, {len(self.backbone.groups)}] (block groups before the mix), "
                             f"got {mix_at!r}")
        outputs = []
        x = self.backbone.stem(x if mix is None or mix_at != 0 else mix(x))
        for group_index, group in enumerate(self.backbone.groups):
            if group_index in self._exit_at_group:
                outputs.append(self.heads[self._exit_at_group[group_index]](x))
            x = group(x)
            if mix is not None and mix_at == group_index + 1:
                x = mix(x)
        outputs.append(self.backbone.classifier(self.backbone.pool_features(x)))
        return outputs

    def pooled_features(self, x: Tensor) -> Tensor:
        """The backbone's pooled features, the input of its classifier (no exit head is computed)."""
        x = self.backbone.stem(x)
        for group in self.backbone.groups:
            x = group(x)
        return self.backbone.pool_features(x)

    def forward_static(self, x: Tensor) -> Tensor:
        """Final logits of the bare backbone, without computing any exit head."""
        return self.backbone(x)

    @torch.no_grad()
    def forward_early_exit(self, x: Tensor, exit_threshold: float) -> tuple[Tensor, Tensor]:
        """Real early-exit inference: examples that exit are dropped from the batch before the next stage.

        Gives the same result as :func:`exit_by_threshold` on :meth:`forward`'s outputs. Use it in eval mode:
        in train mode batch norm would see a different batch at every stage.

        Returns:
            Predictions [N] and 0-based exit indices [N] (long), in the order of ``x``.
        """
        predictions = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        exit_index = torch.empty_like(predictions)
        remaining = torch.arange(x.shape[0], device=x.device)
        x = self.backbone.stem(x)
        for group_index, group in enumerate(self.backbone.groups):
            if group_index in self._exit_at_group:
                exit_idx = self._exit_at_group[group_index]
                conf, pred = exit_confidence(self.heads[exit_idx](x))
                leaves = conf > exit_threshold
                predictions[remaining[leaves]] = pred[leaves]
                exit_index[remaining[leaves]] = exit_idx
                remaining, x = remaining[~leaves], x[~leaves]
                if remaining.numel() == 0:
                    return predictions, exit_index
            x = group(x)
        _, pred = exit_confidence(self.backbone.classifier(self.backbone.pool_features(x)))
        predictions[remaining] = pred
        exit_index[remaining] = self.num_exits - 1
        return predictions, exit_index

    def segments(self) -> list[Segment]:
        """The computation in order: stem, groups, heads where they are evaluated, final classifier."""
        pieces = [Segment("stem", "stem", self.backbone.stem, 0)]
        for group_index, group in enumerate(self.backbone.groups):
            if group_index in self._exit_at_group:
                exit_idx = self._exit_at_group[group_index]
                name = f"exit {exit_idx} head ({position_name(group_index)})"
                pieces.append(Segment("head", name, self.heads[exit_idx], group_index, exit_idx))
            pieces.append(Segment("group", f"group {group_index + 1}", group, group_index))
        final = nn.Sequential(self.backbone.pool_features, self.backbone.classifier)
        num_groups = len(self.backbone.groups)
        pieces.append(Segment("classifier", "final classifier", final, num_groups, self.num_exits - 1))
        return pieces
