"""Name -> backbone registry: configs pick models by name; a new backbone only adds a decorated builder."""

from __future__ import annotations

from collections.abc import Callable

from har import facts
from har.models.densenet import DenseNet169
from har.models.exits import Backbone, MultiExitNet
from har.models.resnet import ResNet50
from har.models.resnet_cifar import resnet8_cifar, resnet32_cifar

BackboneBuilder = Callable[[int, str], Backbone]


# Builders by name; each one's default layout lives in `har.facts.BACKBONE_LAYOUTS`, the one place for it.
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_model(default_layout: str | None = None) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register a builder ``fn(num_classes, classifier) -> Backbone`` under its function name.

    Args:
        default_layout: layout used when :func:`create_model` gets ``layout=None``; None: the one
            ``har.facts.BACKBONE_LAYOUTS`` lists (the built-in backbones). A new backbone's is added there, so that
            config validation, which reads the facts and not this registry, knows it.
    """

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"Model {name!r} is already registered.")
        facts.BACKBONE_LAYOUTS[name] = facts.default_layout(name) if default_layout is None else default_layout
        _REGISTRY[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def _builder(name: str) -> BackboneBuilder:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose one of {list_models()}.")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int,
    layout: str | None = None,
    classifier: str = "linear",
    exit_channels: int | None = None,
    exit_stride: int = 2,
) -> MultiExitNet:
    """Build a registered backbone with exit heads.

    Args:
        name: registered model name, see :func:`list_models`.
        num_classes: number of classes of every exit.
        layout: exit layout such as 'CEBEBEBE'; None keeps the model's default.
        classifier: 'linear' or 'cosine' (LDAM's normalised classifier), used by every exit.
        exit_channels: kernels of each exit-head convolution; None keeps the backbone's default (64 for
            resnet32 and resnet8, 256 for resnet50, 128 for densenet169).
        exit_stride: stride of each exit-head convolution.

    Raises:
        ValueError: for an unknown name or invalid arguments.
    """
    backbone = _builder(name)(num_classes, classifier)
    layout = facts.default_layout(name) if layout is None else layout
    return MultiExitNet(backbone, layout, exit_channels, exit_stride)


@register_model()
def resnet32(num_classes: int, classifier: str) -> Backbone:
    """LDAM-DRW's CIFAR ResNet-32; by default an exit before each block group (Appendix B of the paper)."""
    return resnet32_cifar(num_classes, classifier)


@register_model()
def resnet8(num_classes: int, classifier: str) -> Backbone:
    """ResNet-32's CIFAR shape with one block per group, exits as resnet32's: a cheap stand-in for tests."""
    return resnet8_cifar(num_classes, classifier)


@register_model()
def resnet50(num_classes: int, classifier: str) -> Backbone:
    """torchvision's ImageNet ResNet-50 with depthwise-separable exit heads; an exit before each block group."""
    return ResNet50(num_classes, classifier)


@register_model()
def densenet169(num_classes: int, classifier: str) -> Backbone:
    """torchvision's ImageNet DenseNet-169 with two-convolution exit heads; an exit before each block group."""
    return DenseNet169(num_classes, classifier)
