"""One training step of every distillation method against plain KD, on the CPU (or --device), at one batch size.

    python -m benchmarks.method_steps                          # resnet56 → resnet20, batch 64, τ = 4
    python -m benchmarks.method_steps --pair resnet32x4:resnet8x4 --steps 20 --append docs/benchmarks.md

Each method is built as a run builds it (measured feature shapes, its heads, its state), with random teacher weights
and random CIFAR-shaped batches: only the cost of the step is measured. A step is the distiller's forward (teacher
without gradient, student, τ, every loss term), backward and one SGD update, timed over --steps steps after
--warmup, repeated --rounds times with the median kept. Beside the time, the FLOPs of one step (FlopCounterMode) and
the method's trainable head parameters: a method costs more than KD by about what its heads' arithmetic explains
when its time ratio tracks its FLOP ratio. Methods with an initialisation stage are timed in their distillation step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.report import publish
from ctkd import models
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller, build_distiller, measure_setup
from ctkd.methods import METHODS, StepContext
from ctkd.optim import build_sgd
from ctkd.options import LossConfig
from ctkd.temperatures import FixedTemperature

NUM_CLASSES = 100


@dataclass(frozen=True)
class MethodCost:
    """What one method's step costs."""

    method: str
    ms_per_step: float
    gflops_per_step: float
    head_params: int


def build(method: str, teacher_name: str, student_name: str, batch_size: int, device: torch.device) -> Distiller:
    """The method's distiller around fresh networks, as a run assembles it (γ = 1, α = 1: every term computed)."""
    torch.manual_seed(0)
    student = models.build_model(student_name, num_classes=NUM_CLASSES)
    teacher = models.build_model(teacher_name, num_classes=NUM_CLASSES).eval()
    method_cls = METHODS.get(method)
    targets = torch.randint(0, NUM_CLASSES, (batch_size * 4,))
    setup = measure_setup(student, teacher, image_shape=(3, 32, 32), num_classes=NUM_CLASSES, train_targets=targets,
                          seed=0, features=method_cls.features, preact=method_cls.preact)
    loss = LossConfig(ce_weight=1.0, kd_weight=1.0)
    distiller = build_distiller(method_cls.Options(), student=student, teacher=teacher,
                                temperature=FixedTemperature(4.0), loss=loss, setup=setup)
    return distiller.to(device)


def batches(batch_size: int, device: torch.device, count: int) -> list[Batch]:
    """`count` random CIFAR-shaped batches on `device` (indices into a training set of 4 batches)."""
    gen = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(batch_size, 3, 32, 32, generator=gen).to(device),
                  torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen).to(device),
                  torch.randperm(batch_size * 4, generator=gen)[:batch_size].to(device), batch_size)
            for _ in range(count)]


def time_method(method: str, pair: tuple[str, str], args: argparse.Namespace, device: torch.device) -> MethodCost:
    """Median milliseconds per step over the rounds, the FLOPs of one step and the head parameter count."""
    distiller = build(method, *pair, args.batch_size, device).train()
    optimizer = build_sgd(distiller.unwrapped, lr=0.01, momentum=0.9, weight_decay=5e-4)
    data = batches(args.batch_size, device, 4)
    ctx = StepContext(epoch=1, step=0, grl_lambda=torch.tensor(1.0, device=device))

    def step(batch: Batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        sum(distiller(batch, ctx).losses.values()).backward()
        optimizer.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step(data[0])
    rounds = []
    for _ in range(args.rounds):
        for i in range(args.warmup):
            step(data[i % len(data)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(args.steps):
            step(data[i % len(data)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rounds.append((time.perf_counter() - start) / args.steps * 1e3)
    method_module = distiller.unwrapped
    heads = sum(p.numel() for name, p in method_module.named_parameters()
                if not name.startswith(("student.", "temperature.")))
    return MethodCost(method, statistics.median(rounds), counter.get_total_flops() / 1e9, heads)


def markdown(costs: list[MethodCost], pair: tuple[str, str], args: argparse.Namespace) -> str:
    """The table of costs, KD first, with each method's time and FLOP ratios to KD."""
    kd = next(c for c in costs if c.method == "kd")
    lines = [f"Method steps, {pair[0]} → {pair[1]}, batch {args.batch_size}, {args.device}, "
             f"{torch.get_num_threads()} threads, median of {args.rounds} rounds × {args.steps} steps:", "",
             "| method | ms/step | × KD time | GFLOP/step | × KD FLOPs | head parameters |",
             "|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c.method} | {c.ms_per_step:.1f} | {c.ms_per_step / kd.ms_per_step:.2f} | "
                     f"{c.gflops_per_step:.2f} | {c.gflops_per_step / kd.gflops_per_step:.2f} | {c.head_params:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Time every registered method that uses a teacher and print (or append) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="resnet56:resnet20", help="TEACHER:STUDENT (zoo names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", help="names to time (default: every method with a teacher)")
    parser.add_argument("--append", help="append the markdown table to this file")
    args = parser.parse_args(argv)
    pair = tuple(args.pair.split(":"))
    device = torch.device(args.device)
    names = args.methods or [n for n in METHODS.explicit_names() if METHODS.get(n).uses_teacher]
    names = ["kd"] + [n for n in names if n != "kd"]
    costs = []
    for name in names:
        costs.append(time_method(name, pair, args, device))
        print(f"{name}: {costs[-1].ms_per_step:.1f} ms/step", flush=True)
    publish(markdown(costs, pair, args), args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
