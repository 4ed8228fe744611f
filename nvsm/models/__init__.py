"""Backbones producing unit-norm stride-8 feature maps, and safe checkpoint IO.

``build_backbone(name)`` returns a ``FeatureBackbone``: images (B, 3, H, W), ImageNet-normalised
with ``normalize_images`` and H, W divisible by 8 -> unit-norm features (B, D, H/8, W/8).
"""

from nvsm.models.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_module_state,
    save_checkpoint,
)
from nvsm.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRIDE,
    FeatureBackbone,
    ProjectionHead,
    check_input_size,
    denormalize_images,
    normalize_images,
    upsample_aligned,
)
from nvsm.models.efficientnet import EfficientNetLiteBackbone, packaged_weights_path
from nvsm.models.registry import (
    DEFAULT_BACKBONE,
    available_backbones,
    build_backbone,
    register_backbone,
)
from nvsm.models.resnet import ResNet50UNetBackbone

__all__ = [
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STRIDE",
    "Checkpoint",
    "CheckpointError",
    "EfficientNetLiteBackbone",
    "FeatureBackbone",
    "ProjectionHead",
    "ResNet50UNetBackbone",
    "available_backbones",
    "build_backbone",
    "check_input_size",
    "denormalize_images",
    "load_checkpoint",
    "load_module_state",
    "normalize_images",
    "packaged_weights_path",
    "register_backbone",
    "save_checkpoint",
    "upsample_aligned",
]
