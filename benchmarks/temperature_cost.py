"""Variant d's difference timed alone: a temperature module (with the gradient reversal) and the KD loss, per τ.

Run-to-run noise of whole steps hides a difference this small; timed alone, it does not.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor, nn

from benchmarks.data import NUM_CLASSES
from benchmarks.device import synchronize
from benchmarks.results import FIXED_TAU_LABEL, Row, Table
from ctkd.losses import kd_loss
from ctkd.temperatures import build_temperature, temperature_options

TEMPERATURE_NAMES = ("fixed", "global", "instance")
ITERATIONS = 200


def kd_term_ms(
    module: nn.Module, student: Tensor, teacher: Tensor, grl_lambda: Tensor, device: torch.device, iterations: int,
) -> float:
    """Mean milliseconds of the KD term with τ from `module`, forward and backward, after 10 warm-up iterations."""

    def step() -> None:
        """The KD term of one step with this τ, forward and backward."""
        kd_loss(student, teacher, module(student, teacher, grl_lambda)).backward()

    for _ in range(10):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    return 1000.0 * (time.perf_counter() - start) / iterations


def temperature_overhead(
    args: argparse.Namespace, device: torch.device, fixed_step_ms: dict[str, float], iterations: int = ITERATIONS,
) -> list[list[str]]:
    """Each τ's KD term on (batch, 100) logits, and what it adds over the fixed τ, also per pair's fixed-τ step."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch_size, NUM_CLASSES, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(args.batch_size, NUM_CLASSES, generator=gen).to(device)
    grl_lambda = torch.tensor(1.0, device=device)
    timings: dict[str, float] = {}
    for name in TEMPERATURE_NAMES:
        module = build_temperature(temperature_options(name), num_classes=NUM_CLASSES).to(device)
        timings[name] = kd_term_ms(module, student, teacher, grl_lambda, device, iterations)
    rows = []
    for name in TEMPERATURE_NAMES:
        added = timings[name] - timings["fixed"]
        shares = ", ".join(f"{pair}: {100 * added / ms:+.2f} %" for pair, ms in fixed_step_ms.items())
        rows.append([name, f"{timings[name]:.3f}", "—" if name == "fixed" else f"{added:+.3f}",
                     "—" if name == "fixed" else (shares or "(no variant d step measured)")])
    return rows


def temperature_table(args: argparse.Namespace, device: torch.device, rows: list[Row]) -> Table:
    """Variant d's table of the isolated τ cost, shares taken of each pair's measured fixed-τ step."""
    fixed_step_ms = {r.pair: r.timing.step_ms for r in rows if r.label == FIXED_TAU_LABEL}
    return (
        f"The work a learnable τ adds, isolated: temperature module + KD loss, forward and backward on "
        f"({args.batch_size}, {NUM_CLASSES}) logits, mean of {ITERATIONS} iterations",
        ["temperature", "KD term (ms)", "added vs fixed τ (ms)", "as a share of the fixed-τ step (variant d)"],
        temperature_overhead(args, device, fixed_step_ms),
    )
