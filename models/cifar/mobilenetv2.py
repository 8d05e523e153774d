"""MobileNetV2 of Sandler et al. (2018) adapted to CIFAR by RepDistiller ("mobile_half": width 0.5, expansion 6)."""
from __future__ import annotations

from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import conv_bn_layers, global_avg_pool, init_weights_

# (expansion, base width, blocks, first stride) per group; expansion None means the model's expansion factor.
_GROUPS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# Block groups after which the authors take a stage feature (16², 8², 4², 2² at 32×32 input).
_FEATURE_GROUPS = frozenset({1, 2, 4, 6})
_LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1×1 expand-BN-ReLU, 3×3 depthwise-BN-ReLU, 1×1 project-BN (linear bottleneck), residual if shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        # Unlike torchvision, the expansion conv is kept even when expansion == 1 (checkpoint layout).
        self.conv = nn.Sequential(
            *conv_bn_layers(in_channels, hidden, 1),
            *conv_bn_layers(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn_layers(hidden, out_channels, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x + block(x) when the shapes match, else block(x)."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(FeatureClassifier):
    """Stride-2 3×3 stem (`conv1`), seven inverted-residual groups (`blocks`), 1×1 conv to 1280, `classifier`.

    Every stage feature is a linear-bottleneck output (it ends in BN, no ReLU), so the pre-activation features
    are the plain ones and `preact` changes nothing, as in the authors' code.
    """

    def __init__(self, num_classes: int = 100, width_mult: float = 0.5, expansion: int = 6) -> None:
        super().__init__()
        in_channels = int(32 * width_mult)
        self.conv1 = nn.Sequential(*conv_bn_layers(3, in_channels, 3, stride=2))
        groups: list[nn.Module] = []
        for group_expansion, base_width, num_blocks, first_stride in _GROUPS:
            out_channels = int(base_width * width_mult)
            blocks = []
            for stride in (first_stride,) + (1,) * (num_blocks - 1):
                blocks.append(InvertedResidual(in_channels, out_channels, stride, group_expansion or expansion))
                in_channels = out_channels
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        # The authors keep 1280 channels for width_mult <= 1 (they only widen it above 1).
        self.conv2 = nn.Sequential(*conv_bn_layers(in_channels, _LAST_CHANNELS, 1))
        self.classifier = nn.Sequential(nn.Linear(_LAST_CHANNELS, num_classes))
        init_weights_(self, linear_std=0.01)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        x = self.conv1(x)
        features = [x]
        for index, group in enumerate(self.blocks):
            x = group(x)
            if index in _FEATURE_GROUPS:
                features.append(x)
        pooled = global_avg_pool(self.conv2(x))
        return [*features, pooled], self.classifier(pooled)

    def get_classifier(self) -> nn.Linear:
        """The linear layer inside `classifier` (an nn.Sequential in the checkpoints)."""
        return self.classifier[0]


@MODELS.register()
def MobileNetV2(num_classes: int = 100) -> CifarMobileNetV2:
    """The CIFAR "mobile_half" MobileNetV2: width 0.5, expansion 6."""
    return CifarMobileNetV2(num_classes, width_mult=0.5, expansion=6)
