"""Small models registered for tests.

`tiny_mlp` is BatchNorm-free: DDP must equal a full-batch single process on it (up to rounding). `tiny_dropout_mlp`
has dropout, so a resumed run matches an uninterrupted one only if the torch RNG is restored exactly; it is a few
thousand parameters, so its checkpoints are a few KB (tests/data/v2_last.pth).
"""
from __future__ import annotations

from torch import Tensor, nn

from ctkd.models import MODELS, FeatureClassifier


class TinyMLP(FeatureClassifier):
    """Flatten → Linear → ReLU → Linear; no BatchNorm, so the per-rank batch split does not change the function."""

    supports_preact = False

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(3 * 32 * 32, 32)
        self.fc = nn.Linear(32, num_classes)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        pooled = self.hidden(x.flatten(1)).relu()
        # the same values as an (8, 2, 2) "map" too, so methods on feature maps (SP) have a feat[-2] to use
        return [pooled.view(-1, 8, 2, 2), pooled], self.fc(pooled)

    def get_classifier(self) -> nn.Linear:
        return self.fc


class TinyDropoutMLP(FeatureClassifier):
    """4×4 average pool → Linear → ReLU → Dropout(0.5) → Linear: its training steps draw from the torch RNG."""

    supports_preact = False

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.hidden = nn.Linear(3 * 4 * 4, 16)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        pooled = self.dropout(self.hidden(self.pool(x).flatten(1)).relu())
        return [pooled.view(-1, 4, 2, 2), pooled], self.fc(pooled)

    def get_classifier(self) -> nn.Linear:
        return self.fc


for _name, _cls in (("tiny_mlp", TinyMLP), ("tiny_dropout_mlp", TinyDropoutMLP)):
    if _name not in MODELS:
        MODELS.register(_name)(_cls)
