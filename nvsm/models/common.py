"""Pieces shared by every nvsm backbone: input normalisation, the projection head, the
aligned upsampling and the ``FeatureBackbone`` base class.

Feature-map convention (the one of ``nvsm.pose.camera.feature_intrinsics``)
--------------------------------------------------------------------------
A backbone maps images (B, 3, H, W) with H and W divisible by ``STRIDE`` (8) to unit-norm
features (B, D, H/8, W/8). Feature cell (row i, column j) covers crop pixels
[8j, 8j + 7] × [8i, 8i + 7] and its centre is the crop pixel (8j + 3.5, 8i + 3.5); in feature-map
pixel coordinates (OpenCV, integer pixel centres) it is simply (j, i). Each backbone keeps the
receptive-field centre of cell j within about half a crop pixel of 8j + 3.5 (the ResNet pads its
input; the EfficientNet-Lite weights are centred there already; see the backbone modules).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: Output stride of every nvsm backbone.
STRIDE = 8
#: ImageNet channel statistics (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise RGB images in [0, 1]: (x − mean) / std per channel.

    Args:
        images: (B, 3, H, W) or (3, H, W) float RGB in [0, 1].

    Returns:
        Tensor of the same shape, the input every nvsm backbone expects.
    """
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(
            f"normalize_images expects (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}"
        )
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean) / std


def denormalize_images(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize_images``: (B, 3, H, W) or (3, H, W) back to [0, 1] RGB."""
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(shape)
    return images * std + mean


def check_input_size(height: int, width: int, stride: int = STRIDE) -> tuple[int, int]:
    """Validate an input size and return the feature-map size (H / stride, W / stride).

    Raises:
        ValueError: when H or W is not a positive multiple of ``stride``.
    """
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ValueError(
            f"backbone input height and width must be positive multiples of {stride} (the "
            f"feature stride), got {height}x{width}; pad or crop the image, e.g. to "
            f"{max(stride, math.ceil(height / stride) * stride)}x"
            f"{max(stride, math.ceil(width / stride) * stride)}"
        )
    return height // stride, width // stride


def upsample_aligned(
    x: torch.Tensor, size: tuple[int, int], offset: tuple[float, float], factor: float = 2.0
) -> torch.Tensor:
    """Bilinearly upsample a coarse map onto a finer grid, with exact cell-centre alignment.

    The centre of coarse cell i lies at fine coordinate ``factor · i + offset`` (per axis, fine
    pixel units with integer pixel centres). Fine cell j therefore samples coarse coordinate
    (j − offset) / factor; outside the coarse map the border value is repeated.

    Args:
        x: (B, C, h, w) coarse features.
        size: (H, W) of the fine grid.
        offset: (offset_y, offset_x) of coarse cell 0's centre on the fine grid.
        factor: fine cells per coarse cell.

    Returns:
        (B, C, H, W) upsampled features.
    """
    b, _, h, w = x.shape
    big_h, big_w = size
    ys = (torch.arange(big_h, device=x.device, dtype=x.dtype) - offset[0]) / factor
    xs = (torch.arange(big_w, device=x.device, dtype=x.dtype) - offset[1]) / factor
    # Pixel coordinate -> normalised coordinate with align_corners=False: (2p + 1) / n − 1.
    gy = (2 * ys + 1) / h - 1
    gx = (2 * xs + 1) / w - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # (H, W, 2) as (x, y)
    grid = grid.unsqueeze(0).expand(b, big_h, big_w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ProjectionHead(nn.Module):
    """3×3 conv (bias) → ReLU → 1×1 conv (no bias) → L2 normalisation along channels.

    The same module runs at training and at test time (no train/test bias mismatch).

    Args:
        in_channels: channels of the stride-8 trunk features.
        feature_dim: D, channels of the output features.
        hidden_dim: channels after the 3×3 conv.
    """

    def __init__(self, in_channels: int, feature_dim: int = 128, hidden_dim: int = 256) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=3, padding=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(hidden_dim, feature_dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, D, h, w) unit-norm features."""
        return F.normalize(self.proj(self.act(self.conv(x))), dim=1, eps=1e-12)


class FeatureBackbone(nn.Module):
    """Base class: images (B, 3, H, W), ImageNet-normalised -> (B, D, H/8, W/8) unit features.

    Subclasses implement ``_features`` (the stride-8 map before cropping) and fill
    ``self.head`` and ``self.frozen`` (modules whose parameters never train). Every
    ``nn.BatchNorm*`` layer of the backbone is frozen: its parameters do not require gradients
    and it stays in eval mode (running statistics untouched) even after ``train()``.

    Attributes:
        name: registry name.
        stride: output stride (8).
        feature_dim: D.
    """

    stride: int = STRIDE
    name: str = "backbone"
    head: ProjectionHead
    #: Layout of the weights and of the activations inside ``forward`` (``set_memory_format``).
    memory_format: torch.memory_format = torch.contiguous_format

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)

    # -- freezing ---------------------------------------------------------------------------
    def _batchnorms(self) -> Iterator[nn.Module]:
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                yield m

    def _freeze(self, frozen: list[nn.Module]) -> None:
        """Freeze the parameters of ``frozen`` and of every BatchNorm layer; BN to eval mode."""
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        for bn in self._batchnorms():
            for p in bn.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> FeatureBackbone:
        """Set train/eval mode; BatchNorm layers always stay in eval mode (frozen statistics)."""
        super().train(mode)
        for bn in self._batchnorms():
            bn.eval()
        return self

    # -- parameters -------------------------------------------------------------------------
    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the projection head."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the projection head (backbone blocks, decoder)."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head]

    def param_groups(self, trunk_lr: float, head_lr: float) -> list[dict[str, object]]:
        """Optimizer parameter groups, e.g. ``torch.optim.Adam(bb.param_groups(1e-4, 1e-3))``."""
        return [
            {"params": self.trunk_parameters(), "lr": trunk_lr, "name": "trunk"},
            {"params": self.head_parameters(), "lr": head_lr, "name": "head"},
        ]

    def set_memory_format(self, channels_last: bool) -> FeatureBackbone:
        """Store the weights and run the convolutions in NHWC (``channels_last``) or NCHW.

        Why: oneDNN's NHWC convolutions are faster on the CPU; the
        training steps of the default recipe ran 1.13–1.21× faster in NHWC on two hosts
        (``benchmarks/bench_memory_format.py``). Results agree to float rounding, not bit for
        bit. ``forward`` takes and returns NCHW-contiguous tensors either way.
        """
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Module.to takes memory_format at run time; torch's type stubs leave it out.
        self.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        return self

    # -- forward ----------------------------------------------------------------------------
    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """(H/8, W/8) for a valid input size; raises ValueError otherwise."""
        return check_input_size(height, width, self.stride)

    def _features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense unit-norm features.

        Args:
            images: (B, 3, H, W) ImageNet-normalised (``normalize_images``), H and W divisible
                by 8.

        Returns:
            (B, D, H/8, W/8) features with unit L2 norm along D.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images (B, 3, H, W), got {tuple(images.shape)}")
        h8, w8 = self.feature_size(int(images.shape[2]), int(images.shape[3]))
        out = self._features(images.contiguous(memory_format=self.memory_format)).contiguous()
        if out.shape[-2:] != (h8, w8):  # pragma: no cover - guarded by the subclasses
            raise RuntimeError(f"{self.name}: feature map {tuple(out.shape)} != ({h8}, {w8})")
        return out
