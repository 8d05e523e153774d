"""A BatchNorm-free model registered for tests: DDP must equal a full-batch single process on it (up to rounding)."""
from __future__ import annotations

from torch import Tensor, nn

from models import MODELS, FeatureClassifier


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


if "tiny_mlp" not in MODELS:
    MODELS.register("tiny_mlp")(TinyMLP)
