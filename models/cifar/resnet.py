"""CIFAR ResNets of He et al. (2016, §4.2): 6n+2 layers of basic blocks in three stages (RepDistiller layout)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import (
    PreactStage,
    conv3x3,
    conv_bn_layers,
    global_avg_pool,
    init_weights_,
    make_blocks,
    run_stages,
)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU; returns (output, sum before the ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Projection shortcut (1×1 conv + BN) only where the shape changes, identity elsewhere.
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(*conv_bn_layers(in_channels, out_channels, 1, stride, relu=False))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(ReLU(residual + shortcut), residual + shortcut)."""
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.downsample(x)
        return F.relu(preact), preact


class CifarResNet(FeatureClassifier):
    """3×3 stem, three stages of (depth−2)/6 basic blocks at strides 1, 2, 2, global pooling, `fc`."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem_width, *stage_widths = widths
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_widths = (stem_width, *stage_widths[:-1])
        self.layer1, self.layer2, self.layer3 = (
            PreactStage(*make_blocks(BasicBlock, c_in, c_out, blocks_per_stage, stride))
            for c_in, c_out, stride in zip(in_widths, stage_widths, (1, 2, 2))
        )
        self.fc = nn.Linear(stage_widths[-1], num_classes)
        init_weights_(self)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))
        stages, x = run_stages((self.layer1, self.layer2, self.layer3), stem, preact)
        pooled = global_avg_pool(x)
        return [stem, *stages, pooled], self.fc(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `fc` layer."""
        return self.fc


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)  # the "x4" models: 4× wider stages, 2× wider stem


@MODELS.register()
def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 (one block per stage, widths 16/32/64)."""
    return CifarResNet(8, _NARROW, num_classes)


@MODELS.register()
def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14 (two blocks per stage, widths 16/32/64)."""
    return CifarResNet(14, _NARROW, num_classes)


@MODELS.register()
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 (three blocks per stage, widths 16/32/64)."""
    return CifarResNet(20, _NARROW, num_classes)


@MODELS.register()
def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 (five blocks per stage, widths 16/32/64)."""
    return CifarResNet(32, _NARROW, num_classes)


@MODELS.register()
def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44 (seven blocks per stage, widths 16/32/64)."""
    return CifarResNet(44, _NARROW, num_classes)


@MODELS.register()
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 (nine blocks per stage, widths 16/32/64)."""
    return CifarResNet(56, _NARROW, num_classes)


@MODELS.register()
def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110 (18 blocks per stage, widths 16/32/64)."""
    return CifarResNet(110, _NARROW, num_classes)


@MODELS.register()
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8×4 (one block per stage, widths 64/128/256, stem 32)."""
    return CifarResNet(8, _WIDE, num_classes)


@MODELS.register()
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32×4 (five blocks per stage, widths 64/128/256, stem 32)."""
    return CifarResNet(32, _WIDE, num_classes)
