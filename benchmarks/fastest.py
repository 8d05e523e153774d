"""Variant c: the fastest ctkd settings, searched on CPU and measured per compile mode on CUDA."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from benchmarks.ctkd_loop import measure_ctkd
from benchmarks.device import release
from benchmarks.results import Timing
from ctkd.config import Config

CUDA_FASTEST = ["runtime.amp=bf16", "runtime.channels_last=true", "runtime.data_on_device=on",
                "runtime.cudnn_benchmark=true"]

MakeConfig = Callable[[Sequence[str]], Config]  # a pair's config with extra overrides
Search = tuple[list[str], Timing, list[tuple[str, Timing | str]]]  # the winner, its timing, every candidate's


def fastest_cuda(make_cfg: MakeConfig, args: argparse.Namespace, device: torch.device) -> Search:
    """Variant c on CUDA: the fast settings with each compile mode, fully measured; the faster one wins."""
    modes = [args.c_compile] if args.c_compile else ["default", "reduce-overhead"]
    tried: list[tuple[list[str], Timing]] = []
    failed: list[tuple[str, str]] = []
    for mode in modes:
        overrides = [*CUDA_FASTEST, f"runtime.compile={mode}"]
        try:
            tried.append((overrides, measure_ctkd(make_cfg(overrides), device, args.warmup, args.steps)))
        except Exception as err:  # noqa: BLE001 - a mode that fails here is reported, the other one still counts
            failed.append((" ".join(overrides), f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}"))
        release(device)
    if not tried:
        raise RuntimeError(f"variant c: every compile mode failed: {failed}")
    best = max(tried, key=lambda item: item[1].images_per_s)
    return best[0], best[1], [(" ".join(o), t) for o, t in tried] + failed


def cpu_choices(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The settings the CPU search tries, in order: each key with the values to try instead of its default."""
    choices: list[tuple[str, list[str]]] = []
    if args.workers > 0:
        choices.append(("data.num_workers", ["0"]))
    # channels_last: auto is NHWC on CPU already, so the contiguous layout is the alternative to try
    choices += [("runtime.data_on_device", ["on"]), ("runtime.channels_last", ["off"]), ("runtime.amp", ["bf16"])]
    if args.cpu_compile:
        choices.append(("runtime.compile", ["default"]))
    return choices


def fastest_cpu(make_cfg: MakeConfig, args: argparse.Namespace, device: torch.device) -> Search:
    """Variant c on CPU: a greedy search in short trials, keeping each change that is faster (then measured fully)."""

    def trial(overrides: list[str]) -> Timing:
        """A short measurement of the defaults with `overrides`."""
        timing = measure_ctkd(make_cfg(overrides), device, args.trial_warmup, args.trial_steps)
        release(device)
        return timing

    best: list[str] = []
    best_timing = trial(best)
    tried: list[tuple[str, Timing | str]] = [("(ctkd defaults)", best_timing)]
    for key, values in cpu_choices(args):
        for value in values:
            candidate = [o for o in best if not o.startswith(key + "=")] + [f"{key}={value}"]
            timing = trial(candidate)
            tried.append((" ".join(candidate), timing))
            if timing.images_per_s > best_timing.images_per_s:
                best, best_timing = candidate, timing
    return best, best_timing, tried
