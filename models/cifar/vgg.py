"""CIFAR VGGs with BatchNorm (RepDistiller layout): five conv stages, global pooling, one linear classifier."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import MODELS, FeatureClassifier
from .layers import conv_bn_layers, global_avg_pool, init_weights_

# Conv widths of the five stages.
StageWidths = tuple[tuple[int, ...], ...]


def _vgg_stage(in_channels: int, widths: tuple[int, ...]) -> nn.Sequential:
    """[conv(bias)-BN-ReLU]×len(widths) without the last ReLU, which the model applies (preact features)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += conv_bn_layers(in_channels, width, 3, bias=True)
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(FeatureClassifier):
    """Five stages `block0`..`block4` separated by 2×2 max-pools, global pooling, `classifier`.

    Reproduced quirk: the pool between block3 and block4 runs only for 64-pixel-high inputs, so at 32×32 the last two
    stages both work at 4×4.
    """

    def __init__(self, stage_widths: StageWidths, num_classes: int = 100) -> None:
        super().__init__()
        in_channels = (3, *(widths[-1] for widths in stage_widths[:-1]))
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _vgg_stage(c_in, widths) for c_in, widths in zip(in_channels, stage_widths)
        )
        self.classifier = nn.Linear(stage_widths[-1][-1], num_classes)
        init_weights_(self, linear_std=0.01)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        pool_before_last = x.shape[2] == 64
        x = F.relu(self.block0(x))
        features = [x]  # the stem feature is post-ReLU in both modes
        for index, stage in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
            if index < 4 or pool_before_last:
                x = F.max_pool2d(x, 2)
            stage_preact = stage(x)
            x = F.relu(stage_preact)
            features.append(stage_preact if preact else x)
        pooled = global_avg_pool(x, adaptive=True)
        return [*features, pooled], self.classifier(pooled)

    def get_classifier(self) -> nn.Linear:
        """The final `classifier` layer."""
        return self.classifier


@MODELS.register()
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BN: one conv per stage."""
    return VGG(((64,), (128,), (256,), (512,), (512,)), num_classes)


@MODELS.register()
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BN (configuration A)."""
    return VGG(((64,), (128,), (256, 256), (512, 512), (512, 512)), num_classes)


@MODELS.register()
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (configuration B)."""
    return VGG(((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)), num_classes)


@MODELS.register()
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BN (configuration D)."""
    return VGG(((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3), num_classes)


@MODELS.register()
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BN (configuration E)."""
    return VGG(((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4), num_classes)
