"""Stand-alone evaluation of a saved model on the test split of a config's dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import models
from ctkd.build import build_split, build_split_loader, identify_architectures
from ctkd.checkpoint import load_weights_strict
from ctkd.config import Config
from ctkd.distributed import DistributedContext, resolve_device
from ctkd.engine import evaluate


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Load the config's student architecture from `checkpoint` (any supported layout) and evaluate it."""
    device = resolve_device(cfg.device)
    test_set = build_split(cfg, train=False)
    test_loader = build_split_loader(cfg, test_set, train=False, ctx=DistributedContext(device=device))
    model = models.build_model(cfg.student.name, num_classes=test_set.num_classes)
    load_weights_strict(
        model, checkpoint, arch=cfg.student.name,
        identify=lambda state: identify_architectures(state, test_set.num_classes),
    )
    metrics = evaluate(model.to(device), test_loader, device)
    return {"model": cfg.student.name, "dataset": cfg.data.name, "checkpoint": str(checkpoint), **metrics}
