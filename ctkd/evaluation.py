"""Evaluation on a test split: the loop the trainer runs every epoch (`evaluate`, top-k counts), and the stand-alone
evaluation of a saved model that eval.py runs."""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd import models
from ctkd.build import build_split, build_split_loader
from ctkd.checkpoint import CHECKPOINT_FORMAT
from ctkd.config import Config, config_from_dict
from ctkd.distributed import DistributedContext, all_reduce, resolve_device
from ctkd.integrity import CheckpointError, load_file
from ctkd.methods.base import NetworkRuntime
from ctkd.networks import identify_architectures
from ctkd.weights import extract_state_dict, load_weights_strict


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, for each k (clipped to the class count)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (B, max_k)
    hits = top.eq(targets[:, None])  # (B, max_k)
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: torch.device,
    runtime: NetworkRuntime | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy of `model` (in eval mode) over the whole test set.

    The forward runs as `runtime` says (autocast, channels_last images), like training's. Under DDP each rank
    evaluates its shard (no padding duplicates) and the sums are all-reduced.
    """
    runtime = runtime or NetworkRuntime()
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for images, targets, *_ in loader:
        images = images.to(device, non_blocking=True, memory_format=runtime.memory_format)
        targets = targets.to(device, non_blocking=True)
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        correct += topk_correct(logits, targets)
        count += targets.shape[0]
    model.train(was_training)
    totals = all_reduce(torch.cat([correct.double(), loss_sum[None], torch.tensor([float(count)], device=device,
                                                                                  dtype=torch.float64)]))
    n = max(totals[3].item(), 1.0)  # every test image counted once, whatever the number of ranks
    return {"acc1": 100.0 * totals[0].item() / n, "acc5": 100.0 * totals[1].item() / n, "loss": totals[2].item() / n}


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
