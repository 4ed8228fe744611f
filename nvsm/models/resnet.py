"""ResNet-50 + U-Net-style decoder to stride 8 (NeMo's ``resnetext`` backbone, reference memo §4).

Trunk: torchvision ResNet-50 built with ``weights=None``; ImageNet weights come only from a
local torchvision state-dict file passed as ``weights=PATH`` (nothing is downloaded). Without it
the trunk is randomly initialised and a warning says so.

    conv1 … layer1 (stride 4)  frozen
    layer2 → x1 (512, stride 8), layer3 → x2 (1024, stride 16), layer4 → x3 (2048, stride 32)
    decoder: DoubleConv(2048 → 1024) at stride 32
             up ×2, concat x2 → DoubleConv(2048 → 1024 → 512) at stride 16
             up ×2, concat x1 → DoubleConv(1024 → 512 → 256) at stride 8
    ProjectionHead(256 → D), L2-normalised.

Differences from the reference, on purpose:

* every BatchNorm of the trunk is frozen (eval mode, no gradients) and the decoder's DoubleConv
  uses GroupNorm instead of BatchNorm, so nothing depends on the batch size and train and test
  features agree;
* upsampling places each coarse cell exactly at its receptive-field centre on the finer grid
  (``upsample_aligned``) instead of align_corners upsampling plus padding;
* the same bias-free head on both paths.

Alignment: torchvision's symmetric padding centres stride-8 cell j at crop pixel 8j. The input
is zero-padded by 4 pixels on every side and the first row/column of cells is dropped, which
centres cell j at 8j + 4 (within half a pixel of the nvsm convention 8j + 3.5).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nvsm.models.checkpoint import load_pretrained_weights
from nvsm.models.common import FeatureBackbone, ProjectionHead, upsample_aligned

_ALIGN_PAD = 4


class DoubleConv(nn.Module):
    """(3×3 conv → GroupNorm → ReLU) × 2: (B, in, h, w) -> (B, out, h, w)."""

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None
    ) -> None:
        super().__init__()
        mid = mid_channels or out_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.GroupNorm(32, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(32, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNet50UNetBackbone(FeatureBackbone):
    """NeMo-style ResNet-50 + upsampling decoder, stride 8, with the nvsm projection head.

    Args:
        feature_dim: D, output channels.
        weights: local torchvision ResNet-50 state dict (e.g. ``resnet50-0676ba61.pth``); the
            ``fc.*`` entries are ignored.
        pretrained: when True and ``weights`` is None, warn that the trunk is random.
        hidden_dim: channels of the head's 3×3 conv.
    """

    name = "resnet50-unet"

    def __init__(
        self,
        feature_dim: int = 128,
        weights: Path | str | None = None,
        pretrained: bool = True,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__(feature_dim)
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.weights_path: Path | None = None
        if weights is not None:
            load_pretrained_weights(net, Path(weights), "a torchvision ResNet-50",
                                    skip=("fc.",))
            self.weights_path = Path(weights)
        elif pretrained:
            warnings.warn(
                "resnet50-unet: no ImageNet weights given (nothing is downloaded); the trunk is "
                "randomly initialised. Pass weights=PATH to a torchvision resnet50 state dict.",
                UserWarning,
                stacklevel=2,
            )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.bottom = DoubleConv(2048, 1024)
        self.up16 = DoubleConv(2048, 512, mid_channels=1024)
        self.up8 = DoubleConv(1024, 256, mid_channels=512)
        self.head = ProjectionHead(256, feature_dim, hidden_dim)
        self._freeze([self.stem])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        p = _ALIGN_PAD
        x = F.pad(images, (p, p, p, p))
        x1 = self.layer2(self.stem(x))
        x2 = self.layer3(x1)
        x3 = self.bottom(self.layer4(x2))
        # torchvision convs pad symmetrically: coarse cell i sits at fine coordinate 2i.
        y = self.up16(torch.cat([x2, upsample_aligned(x3, tuple(x2.shape[-2:]), (0.0, 0.0))], 1))
        y = self.up8(torch.cat([x1, upsample_aligned(y, tuple(x1.shape[-2:]), (0.0, 0.0))], 1))
        out = self.head(y)
        # Padded cell 0 is centred on crop pixel −4: drop it.
        return out[..., 1:, 1:]
