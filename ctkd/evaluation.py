"""Stand-alone evaluation of a saved model on the test split of a config's dataset."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctkd import models
from ctkd.build import build_split, build_split_loader, identify_architectures
from ctkd.checkpoint import CHECKPOINT_FORMAT, CheckpointError, extract_state_dict, load_file, load_weights_strict
from ctkd.config import Config, config_from_dict
from ctkd.distributed import DistributedContext, resolve_device
from ctkd.engine import evaluate
from ctkd.methods.base import NetworkRuntime


def config_of_checkpoint(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config stored in one of our run checkpoints, with `KEY=VALUE` overrides applied.

    Any other file (a teacher in a published layout) carries no config: the error says which keys to give.
    """
    state = load_file(checkpoint, extra_safe_globals=(argparse.Namespace,))
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return config_from_dict(state["config"], source=f"{checkpoint} (saved config)", overrides=overrides)
    matches = identify_architectures(extract_state_dict(state, checkpoint), num_classes=100)
    arch = matches[0] if matches else "ARCH"
    found = f" (its weights match: {', '.join(matches)})" if matches else ""
    example = suggested_config(arch)
    raise CheckpointError(
        f"{checkpoint} is not a ctkd run checkpoint and carries no config{found}: pass --config FILE for the dataset "
        f"and student.name={arch}, e.g. eval.py --config {example} --checkpoint {checkpoint} student.name={arch}"
    )


def suggested_config(arch: str) -> str:
    """A config file to evaluate architecture `arch` with that exists: its CIFAR-100 teacher config, else the CIFAR-100
    protocol every config there builds on, else the placeholder FILE."""
    shipped = (Path("configs/cifar100/teachers") / f"{arch}.yaml", Path("configs/cifar100/_base_/cifar100.yaml"))
    for candidate in shipped:
        if candidate.is_file():
            return str(candidate)
    return "FILE"


def evaluate_checkpoint(cfg: Config, checkpoint: str | Path) -> dict[str, Any]:
    """Load the config's student architecture from `checkpoint` (any supported layout) and evaluate it."""
    device = resolve_device(cfg.device)
    test_set = build_split(cfg, train=False)
    test_loader = build_split_loader(cfg, test_set, train=False, ctx=DistributedContext(device=device))
    # the architecture with its kwargs, but not its pretrained weights: the checkpoint replaces every weight
    model = models.build_model(cfg.student.name, num_classes=test_set.num_classes, **cfg.student.kwargs)
    load_weights_strict(
        model, checkpoint, arch=cfg.student.name, key="student.name",
        identify=lambda state: identify_architectures(state, test_set.num_classes, like=cfg.student.name),
    )
    runtime = NetworkRuntime.from_config(device.type, cfg.runtime.amp, cfg.runtime.channels_last)
    model = model.to(device, memory_format=runtime.memory_format)
    metrics = evaluate(model, test_loader, device, runtime)
    return {"model": cfg.student.name, "dataset": cfg.data.name, "checkpoint": str(checkpoint), **metrics}
