"""The model registry and the interface every model of the zoo implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor, nn

from ctkd.registry import Registry

MODELS = Registry("model", with_options=False)  # a model's options are its builder's keyword arguments


class FeatureClassifier(nn.Module, ABC):
    """A classifier that can also return its intermediate features (stem, each stage, pooled vector)."""

    # Whether `forward_with_features(x, preact=True)` is meaningful: every CIFAR model, no library model.
    supports_preact: ClassVar[bool] = True

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, num_classes)."""
        # One code path for both entry points, so the logits of the two can never disagree.
        return self._forward_features(x, preact=False)[1]

    def forward_with_features(self, x: Tensor, preact: bool = False) -> tuple[list[Tensor], Tensor]:
        """(features, logits): stem output, each stage output (before its final ReLU if `preact`), pooled vector."""
        if preact and not self.supports_preact:
            raise ValueError(
                f"{type(self).__name__} has no pre-activation features: call forward_with_features with "
                "preact=False, or pick a model of the CIFAR zoo (all of them have them)."
            )
        return self._forward_features(x, preact)

    @abstractmethod
    def _forward_features(self, x: Tensor, preact: bool) -> tuple[list[Tensor], Tensor]:
        """The forward pass proper; `preact` has already been validated."""

    @abstractmethod
    def get_classifier(self) -> nn.Linear:
        """The final linear layer, which maps `features[-1]` to the logits."""
