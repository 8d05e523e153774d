"""Variant a: the authors'-style KD+CTKD training loop (PIL loader, fp32, torch SGD, a loss.item() every step)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.data import NUM_CLASSES, Data, EpochFeed
from benchmarks.device import synchronize
from benchmarks.memory import PeakMemory
from benchmarks.pipeline import reference_loader
from benchmarks.results import Timing
from ctkd import models
from ctkd.losses import kd_loss
from ctkd.temperatures import GlobalTemperature

CE_WEIGHT, KD_WEIGHT = 0.1, 0.9  # the KD+CTKD config's loss weights (configs/cifar100/_base_/ctkd.yaml)
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # the CIFAR-100 protocol's SGD

Nets = tuple[nn.Module, nn.Module, nn.Module]  # student, teacher, temperature


def accuracy(logits: Tensor, targets: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """The authors' top-k accuracy (%), left on the device as their AverageMeter receives it."""
    top = logits.topk(max(topk), dim=1).indices.t()
    correct = top.eq(targets.view(1, -1).expand_as(top))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / targets.shape[0]) for k in topk]


def reference_step(
    nets: Nets, optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor, grl_lambda: float,
    device: torch.device, losses: list[float],
) -> None:
    """One step of the authors' loop: teacher then student forward, 0.1·CE + 0.9·KD(τ), .item(), SGD step."""
    student, teacher, temperature = nets
    images, targets = images.float().to(device), targets.to(device)
    with torch.no_grad():
        logit_t = teacher(images)
    logit_s = student(images)
    tau = temperature(logit_s, logit_t, grl_lambda)
    loss = CE_WEIGHT * F.cross_entropy(logit_s, targets) + KD_WEIGHT * kd_loss(logit_s, logit_t, tau)
    accuracy(logit_s, targets)
    losses.append(loss.item())  # the authors' AverageMeter.update(loss.item(), n): a host sync every step
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def reference_nets(
    teacher_name: str, student_name: str, teacher_file: Path, device: torch.device,
) -> tuple[Nets, torch.optim.Optimizer]:
    """The student, the loaded teacher and a global τ as the authors build them, and their plain SGD."""
    torch.manual_seed(0)
    student = models.build_model(student_name, num_classes=NUM_CLASSES).to(device).train()
    teacher = models.build_model(teacher_name, num_classes=NUM_CLASSES)
    teacher.load_state_dict(torch.load(teacher_file, map_location="cpu", weights_only=True))
    teacher = teacher.to(device).eval()
    temperature = GlobalTemperature().to(device)
    trainable = nn.ModuleList([student, temperature])
    optimizer = torch.optim.SGD(trainable.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return (student, teacher, temperature), optimizer


def run_reference(
    teacher_name: str, student_name: str, data: Data, teacher_file: Path, args: argparse.Namespace,
    device: torch.device,
) -> Timing:
    """Variant a: the authors'-style loop over a per-image PIL DataLoader."""
    with PeakMemory(device) as memory:
        nets, optimizer = reference_nets(teacher_name, student_name, teacher_file, device)
        feed = EpochFeed(reference_loader(data, args.batch_size, args.workers))
        losses: list[float] = []
        for images, targets in feed.take(args.warmup):
            reference_step(nets, optimizer, images, targets, 1.0, device, losses)
        synchronize(device)
        start_images, start = feed.images, time.perf_counter()
        for images, targets in feed.take(args.steps):
            reference_step(nets, optimizer, images, targets, 1.0, device, losses)
        synchronize(device)
        seconds = time.perf_counter() - start
    return Timing(args.steps, feed.images - start_images, seconds, memory.bytes,
                  {"reserved": memory.reserved(), "final_loss": losses[-1] if losses else None})
