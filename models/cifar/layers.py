"""Building blocks shared by the CIFAR architectures: conv factories, stages, channel shuffle, pooling, init."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.nn.functional as F
from torch import Tensor, nn

# A block factory: (in_channels, out_channels, stride) -> block.
BlockFactory = Callable[[int, int, int], nn.Module]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution with 'same' padding and no bias (a BN follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """1×1 convolution without bias (a BN follows)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, groups=groups, bias=False)


def conv_bn_layers(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
    relu: bool = True,
) -> list[nn.Module]:
    """[conv, BN(, ReLU)] as a flat list, so callers can splice several into one nn.Sequential (checkpoint keys)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=bias
    )
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def make_blocks(
    block: BlockFactory, in_channels: int, out_channels: int, num_blocks: int, stride: int
) -> list[nn.Module]:
    """`num_blocks` blocks of one stage: the first changes width and resolution, the others keep them."""
    return [block(in_channels, out_channels, stride)] + [
        block(out_channels, out_channels, 1) for _ in range(num_blocks - 1)
    ]


def run_preact_blocks(blocks: Iterable[nn.Module], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run blocks that each return (output, pre-activation) and return the last block's pair."""
    preact = x
    for block in blocks:
        x, preact = block(x)
    return x, preact


class PreactStage(nn.Sequential):
    """A stage of blocks that each return (output, pre-activation); returns the last block's pair."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(stage output, the last block's output before its final ReLU)."""
        return run_preact_blocks(self, x)


def run_stages(stages: Iterable[nn.Module], x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
    """Run PreactStages in order: ([each stage's output, or its pre-activation if `preact`], last output)."""
    features = []
    for stage in stages:
        x, stage_preact = stage(x)
        features.append(stage_preact if preact else x)
    return features, x


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: view the channels as (groups, C/groups), transpose, flatten back."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def global_avg_pool(x: Tensor, adaptive: bool = False) -> Tensor:
    """(B, C, H, W) -> (B, C) spatial mean, computed with the pooling op the authors use for the family.

    Their fixed-size pools (AvgPool2d(8) for ResNets, avg_pool2d(·, 8) for WRNs, 4 for ShuffleNets, 2 for
    MobileNetV2) cover the whole final map at 32×32 input: avg_pool2d with the map's own size is exactly that op
    there and a global mean at any input size. VGG and ResNet50 use adaptive pooling (`adaptive=True`). The op
    matters: the two round differently, and eval-mode logits of deep ResNets on the golden weights reach ~1e6.
    """
    pooled = F.adaptive_avg_pool2d(x, 1) if adaptive else F.avg_pool2d(x, x.shape[-2:])
    return pooled.flatten(1)


def init_weights_(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """The authors' initialisation: He-normal (fan-out) convs with zero bias, BN γ=1 β=0, Linear as asked.

    `linear_std` draws Linear weights from N(0, linear_std²) (and zeroes their bias); otherwise PyTorch's default
    Linear init is kept, with the bias zeroed only if `zero_linear_bias`.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            # N(0, 2 / (k·k·out_channels)): what RepDistiller writes by hand for VGG/WRN/MobileNetV2 and via
            # kaiming_normal_(mode="fan_out") for the ResNets.
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)

