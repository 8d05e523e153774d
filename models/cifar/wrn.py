"""Wide ResNets of Zagoruyko & Komodakis (2016): pre-activation blocks, depth 6n+4, widths 16k/32k/64k."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import conv1x1, conv3x3, global_avg_pool, init_weights_, make_blocks


class WideBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut; returns (output, its entry BN output)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        # Attribute name fixed by the checkpoints in circulation.
        self.convShortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = conv1x1(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(block output, bn1(x)); the latter is the authors' pre-activation feature of the previous stage."""
        entry = self.bn1(x)
        activated = F.relu(entry)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # The projection shortcut reads the BN-ReLU'd input, the identity shortcut the raw input (original WRN code).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out, entry


class WideStage(nn.Module):
    """A stage of wide blocks; returns (output, the entry BN output of its first block)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*make_blocks(WideBlock, in_channels, out_channels, num_blocks, stride))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(stage output, bn1 of the first block applied to the stage input)."""
        first, *rest = self.layer
        x, entry = first(x)
        for block in rest:
            x, _ = block(x)
        return x, entry


class WideResNet(FeatureClassifier):
    """WRN-depth-k: 3×3 stem, three wide stages at strides 1, 2, 2, final BN-ReLU, global pooling, `fc`.

    Pre-activation features (authors' definition): each stage output passed through the *next* BN without ReLU,
    i.e. block2's first bn1, block3's first bn1 and the final bn1. Those BNs already run in the forward pass, so
    their outputs are reused rather than recomputed: in train mode every BN updates its running statistics once
    per forward, with or without preact (the authors re-apply the three BNs when preact=True).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(3, widths[0])
        self.block1, self.block2, self.block3 = (
            WideStage(c_in, c_out, blocks_per_stage, stride)
            for c_in, c_out, stride in zip(widths[:-1], widths[1:], (1, 2, 2))
        )
        self.bn1 = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights_(self, zero_linear_bias=True)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        stem = self.conv1(x)  # no BN/ReLU here: the first block starts with them
        out1, _ = self.block1(stem)
        out2, preact1 = self.block2(out1)
        out3, preact2 = self.block3(out2)
        preact3 = self.bn1(out3)
        pooled = global_avg_pool(F.relu(preact3))
        stages = [preact1, preact2, preact3] if preact else [out1, out2, out3]
        return [stem, *stages, pooled], self.fc(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `fc` layer."""
        return self.fc


@MODELS.register()
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1 (two blocks per stage, widths 16/32/64)."""
    return WideResNet(16, 1, num_classes)


@MODELS.register()
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2 (two blocks per stage, widths 32/64/128)."""
    return WideResNet(16, 2, num_classes)


@MODELS.register()
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1 (six blocks per stage, widths 16/32/64)."""
    return WideResNet(40, 1, num_classes)


@MODELS.register()
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2 (six blocks per stage, widths 32/64/128)."""
    return WideResNet(40, 2, num_classes)
