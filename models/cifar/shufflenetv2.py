"""ShuffleNet V2 of Ma et al. (2018) for CIFAR (RepDistiller layout: 1×1 stem, no max-pool)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import channel_shuffle, conv1x1, conv3x3, global_avg_pool, run_preact_blocks, run_stages

_STEM_CHANNELS = 24


class ShuffleV2Unit(nn.Module):
    """Channel split; one half passes, the other goes 1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU; concat, shuffle.

    Returns (output, pre-activation). The authors' pre-activation is the concatenation before the shuffle, so its
    channel order differs from the output's; reproduced as is.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = conv1x1(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv3x3(half, half, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv1x1(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(shuffle([x1, ReLU(branch(x2))]), [x1, branch(x2)])."""
        half = x.shape[1] // 2
        passthrough, branch_in = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch_in)))
        out = self.bn2(self.conv2(out))
        branch = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([passthrough, F.relu(branch)], dim=1), 2)
        return out, torch.cat([passthrough, branch], dim=1)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input (left: dw 3×3-BN, 1×1-BN-ReLU; right: 1×1-BN-ReLU,
    dw 3×3-BN, 1×1-BN-ReLU); concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = conv3x3(in_channels, in_channels, 2, groups=in_channels)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = conv1x1(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = conv3x3(mid, mid, 2, groups=mid)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = conv1x1(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        """shuffle([left(x), right(x)]) at half the resolution."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], dim=1), 2)


class ShuffleV2Stage(nn.Sequential):
    """A down unit followed by basic units; returns (output, pre-activation of the last unit)."""

    def __init__(self, in_channels: int, out_channels: int, num_units: int) -> None:
        units = (ShuffleV2Unit(out_channels) for _ in range(num_units))
        super().__init__(ShuffleV2DownUnit(in_channels, out_channels), *units)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(stage output, the last basic unit's pre-activation)."""
        down, *units = self
        return run_preact_blocks(units, down(x))


class ShuffleNetV2(FeatureClassifier):
    """1×1 stem (24 channels, stride 1), three stages that each halve the resolution, 1×1 conv head (`conv2`),
    global pooling, `linear`. The stage features are the stage outputs, before the head."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int],
        stage_units: tuple[int, int, int],
        head_channels: int,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(3, _STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = (_STEM_CHANNELS, *stage_channels[:-1])
        self.layer1, self.layer2, self.layer3 = (
            ShuffleV2Stage(c_in, c_out, units) for c_in, c_out, units in zip(in_channels, stage_channels, stage_units)
        )
        self.conv2 = conv1x1(stage_channels[-1], head_channels)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.linear = nn.Linear(head_channels, num_classes)
        # No custom initialisation: the authors keep PyTorch's defaults for the ShuffleNets.

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))
        stages, x = run_stages((self.layer1, self.layer2, self.layer3), stem, preact)
        pooled = global_avg_pool(F.relu(self.bn2(self.conv2(x))))
        return [stem, *stages, pooled], self.linear(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `linear` layer."""
        return self.linear


@MODELS.register()
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet V2 1×: stages of 116/232/464 channels with 3/7/3 basic units, 1024-channel head."""
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), head_channels=1024, num_classes=num_classes)
