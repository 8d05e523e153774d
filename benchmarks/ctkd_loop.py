"""Variants b to d: ctkd's own training step (build_experiment + Trainer.train_epoch) for a config, timed."""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.data import EpochFeed, data_overrides
from benchmarks.device import synchronize
from benchmarks.memory import PeakMemory
from benchmarks.results import Timing
from ctkd.build import Experiment, build_experiment
from ctkd.config import Config, load_config
from ctkd.distributed import DistributedContext
from ctkd.methods.base import resolve_channels_last
from ctkd.step import EpochRun
from ctkd.system import resolve_compile_mode, seed_everything
from ctkd.trainer import Trainer

BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "ctkd" / "resnet56_resnet20.yaml"


def ctkd_config(
    teacher_name: str, student_name: str, teacher_file: Path, args: argparse.Namespace, device: torch.device,
    extra: Sequence[str] = (),
) -> Config:
    """The KD+CTKD config of the paper for this pair and data, with `extra` overrides (later ones win)."""
    overrides = [
        f"student.name={student_name}", f"teacher.name={teacher_name}", f"teacher.checkpoint={teacher_file}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"device={device.type}",
        "logging.tensorboard=false", "logging.progress_bar=false",
        f"output_dir={Path(tempfile.gettempdir()) / 'ctkd_benchmark_unused'}",
        *data_overrides(args)[0], *extra,
    ]
    return load_config(BASE_CONFIG, overrides)


def time_steps(
    exp: Experiment, cfg: Config, device: torch.device, warmup: int, steps: int,
    before_timing: Callable[[], None] | None,
) -> dict[str, Any]:
    """`warmup` untimed then `steps` timed steps of the trainer's epoch over whole epochs of the experiment's loader."""
    grl_lambda = exp.curriculum(cfg.epochs)  # λ at its maximum (past the ramp): same cost as any other λ
    feed, trainer = EpochFeed(exp.train_loader), Trainer(exp, cfg)

    def run(count: int) -> None:
        """`count` training steps, as one epoch of the trainer (its end-of-epoch read included)."""
        trainer.train_epoch(EpochRun.begin(exp, 1, grl_lambda, None), feed.take(count))

    run(warmup)
    synchronize(device)
    if before_timing is not None:
        before_timing()
    start_images, start, wall_start = feed.images, time.perf_counter(), time.time()
    run(steps)
    synchronize(device)
    seconds, wall_end = time.perf_counter() - start, time.time()
    return {"images": feed.images - start_images, "seconds": seconds, "wall_start": wall_start,
            "wall_end": wall_end, "batches_on": str(feed.first_device.type if feed.first_device else "?")}


def measure_ctkd(
    cfg: Config, device: torch.device, warmup: int, steps: int, before_timing: Callable[[], None] | None = None,
) -> Timing:
    """Build the experiment as the trainer does (seed, cudnn.benchmark, compile) and time its training steps."""
    ctx = DistributedContext(device=device)
    with PeakMemory(device) as memory:
        seed_everything(cfg.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
        exp = build_experiment(cfg, ctx)
        try:
            compile_mode = resolve_compile_mode(cfg.runtime.compile, device)
            if compile_mode is not None:
                exp.distiller.compile(compile_mode)
            window = time_steps(exp, cfg, device, warmup, steps, before_timing)
        finally:
            exp.close()
    info = {
        "compile": compile_mode or "off", "reserved": memory.reserved(), "wall_start": window["wall_start"],
        "wall_end": window["wall_end"], "batches_on": window["batches_on"],
    }
    return Timing(steps, window["images"], window["seconds"], memory.bytes, info)


def describe(cfg: Config, timing: Timing, device: torch.device) -> str:
    """The settings a ctkd row ran with, in a few words."""
    r = cfg.runtime
    parts = [
        f"amp {r.amp}", f"channels_last {r.channels_last}"
        + (f" ({'on' if resolve_channels_last('auto', device.type, r.amp) else 'off'})" if r.channels_last == "auto"
           else ""),
        f"fold_teacher_bn {'on' if r.fold_teacher_bn else 'off'}", f"compile {timing.info['compile']}",
        f"sgd {r.sgd}", f"workers {cfg.data.num_workers}", f"data_on_device {r.data_on_device}",
    ]
    if device.type == "cuda":
        parts[-1] += f" (batches arrive on {timing.info['batches_on']})"
        parts.append(f"cudnn_benchmark {'on' if r.cudnn_benchmark else 'off'}")
    return ", ".join(parts)
