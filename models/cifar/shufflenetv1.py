"""ShuffleNet V1 of Zhang et al. (2018) for CIFAR (RepDistiller layout: 1×1 stem, no max-pool, 3 groups)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import (
    PreactStage,
    channel_shuffle,
    conv1x1,
    conv3x3,
    global_avg_pool,
    make_blocks,
    run_stages,
)

_STEM_CHANNELS = 24


class ShuffleV1Unit(nn.Module):
    """Grouped 1×1, shuffle, depthwise 3×3, grouped 1×1; added to the input, or concatenated with its 3×3
    average pool when strided. Returns (output, value before the final ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        # A strided unit concatenates its pooled input, so its branch only makes the remaining channels.
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        mid_channels = branch_channels // 4
        # The unit reading the 24-channel stem has a dense first 1×1: too few input channels to split into groups
        # (as in the paper). The authors key this on the width being 24.
        self.entry_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.conv1 = conv1x1(in_channels, mid_channels, groups=self.entry_groups)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = conv3x3(mid_channels, mid_channels, stride, groups=mid_channels)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = conv1x1(mid_channels, branch_channels, groups=groups)
        self.bn3 = nn.BatchNorm2d(branch_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ReLU(merge), merge) where merge is branch + x, or [branch, avgpool(x)] when strided."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.entry_groups)
        # The authors apply a ReLU after the depthwise conv, which the paper leaves linear.
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(FeatureClassifier):
    """1×1 stem (24 channels, stride 1), three stages that each halve the resolution, global pooling, `linear`."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int],
        stage_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(3, _STEM_CHANNELS)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)

        def unit(in_channels: int, out_channels: int, stride: int) -> ShuffleV1Unit:
            return ShuffleV1Unit(in_channels, out_channels, stride, groups)

        in_channels = (_STEM_CHANNELS, *stage_channels[:-1])
        self.layer1, self.layer2, self.layer3 = (
            PreactStage(*make_blocks(unit, c_in, c_out, num_blocks, 2))
            for c_in, c_out, num_blocks in zip(in_channels, stage_channels, stage_blocks)
        )
        self.linear = nn.Linear(stage_channels[-1], num_classes)
        # No custom initialisation: the authors keep PyTorch's defaults for the ShuffleNets.

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))
        stages, x = run_stages((self.layer1, self.layer2, self.layer3), stem, preact)
        pooled = global_avg_pool(x)
        return [stem, *stages, pooled], self.linear(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `linear` layer."""
        return self.linear


@MODELS.register()
def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet V1 with 3 groups: stages of 240/480/960 channels and 4/8/4 units."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
