"""The CIFAR ResNet-50 (RepDistiller's resnetv2): bottleneck ResNet with a 3×3 stride-1 stem and no max-pool."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import (
    PreactStage,
    conv1x1,
    conv3x3,
    conv_bn_layers,
    global_avg_pool,
    init_weights_,
    make_blocks,
    run_stages,
)


class Bottleneck(nn.Module):
    """1×1 reduce-BN-ReLU, 3×3 (strided)-BN-ReLU, 1×1 expand-BN, plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        mid = out_channels // 4
        self.conv1 = conv1x1(in_channels, mid)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # Projection (1×1 conv + BN) where the shape changes; an empty Sequential (identity, no keys) elsewhere.
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(*conv_bn_layers(in_channels, out_channels, 1, stride, relu=False))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ReLU(residual(x) + shortcut(x)), residual(x) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


class CifarBottleneckResNet(FeatureClassifier):
    """3×3 stem (64 channels, stride 1), four bottleneck stages at strides 1, 2, 2, 2, global pooling, `linear`;
    pre-activation features are each stage's last block before its final ReLU (RepDistiller's `preact`)."""

    def __init__(self, stage_blocks: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        stem_width, stage_widths = 64, (256, 512, 1024, 2048)
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_widths = (stem_width, *stage_widths[:-1])
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            PreactStage(*make_blocks(Bottleneck, c_in, c_out, num_blocks, stride))
            for c_in, c_out, num_blocks, stride in zip(in_widths, stage_widths, stage_blocks, (1, 2, 2, 2))
        )
        self.linear = nn.Linear(stage_widths[-1], num_classes)
        init_weights_(self)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))
        stages, x = run_stages((self.layer1, self.layer2, self.layer3, self.layer4), stem, preact)
        pooled = global_avg_pool(x, adaptive=True)
        return [stem, *stages, pooled], self.linear(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `linear` layer."""
        return self.linear


@MODELS.register()
def ResNet50(num_classes: int = 100) -> CifarBottleneckResNet:
    """CIFAR ResNet-50: 3/4/6/3 bottleneck blocks, stage widths 256/512/1024/2048."""
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
