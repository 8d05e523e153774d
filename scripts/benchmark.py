"""Steady-state training throughput of an authors'-style KD+CTKD loop and of ctkd, side by side in one process.

    python scripts/benchmark.py                                  # resnet56→resnet20 and resnet32x4→resnet8x4, batch 64
    python scripts/benchmark.py --device cuda --pipeline --append docs/benchmarks.md
    python scripts/benchmark.py --pairs resnet8:resnet8 --batch-size 8 --device cpu --quick   # a few seconds

Data: CIFAR-100 from --data-root when <root>/cifar-100-python/train exists, else the `synthetic` dataset with 100
classes and --synthetic-size training images (rounded up to a multiple of the batch). Teachers have random weights
(saved to a temporary file and loaded like a real one): only the speed is measured.

Variants (--variants, default a,b,c,d); each is timed over --steps steps after --warmup steps, on whole epochs of its
own loader (the iterator is restarted when an epoch ends), so the time includes data loading:
  a  reference loop, the authors' way: a torchvision-style Dataset of uint8 HWC numpy images turned into PIL images,
     per-image Compose([RandomCrop(32, 4), RandomHorizontalFlip(), ToTensor(), Normalize]) in a shuffled DataLoader
     with --workers workers (not persistent), fp32, teacher forward under no_grad then student forward, 0.1·CE +
     0.9·KD with ctkd's GlobalTemperature (gradient reversal) and ctkd.losses.kd_loss, plain torch.optim.SGD (torch's
     default implementation), loss.item() every step;
  b  ctkd defaults: build_experiment + train_one_epoch with configs/cifar100/ctkd/resnet56_resnet20.yaml (teacher,
     student, data and data.num_workers=--workers overridden) and the default runtime section, compiled as the
     trainer compiles (runtime.compile=auto: default on CUDA, off on CPU);
  c  ctkd fastest: CUDA: amp bf16, channels_last, data_on_device on, cudnn_benchmark, and torch.compile default and
     reduce-overhead both measured (the faster is reported); CPU: a greedy search over data.num_workers (0 or
     --workers), data_on_device on (batches made in the training process), channels_last off (auto is NHWC on
     CPU) and amp bf16 (plus compile with --cpu-compile), in short trials of --trial-steps;
  d  KD with a fixed τ = 4 against CTKD with a global and an instance-wise τ, all with ctkd defaults; and, isolated
     from the step, the temperature module (with the gradient reversal) and the KD loss alone, forward and backward,
     for each τ: what a learnable τ adds, in ms and as a share of the fixed-τ step (the SGD update of τ's own
     parameters, one scalar for the global τ, is not in it).
The variants are measured --rounds times (default 3), alternating within each round, and each row reports the round
with the median throughput and the range over the rounds: on a shared machine a slow spell then costs every variant
alike (differences of a few percent between variants are otherwise noise).

Per row: images/s, mean step time, peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: the main process's peak
RSS above its level at the variant's start, sampled every 10 ms, loader workers not counted), FLOPs per image of
the step (teacher forward + 3 × student forward, counted by FlopCounterMode), the achieved FLOP/s and its share of
the device's matmul peak (a timed square torch.mm; bf16 on CUDA for bf16 rows, fp32 otherwise). Convolutions in the
fp32 rows may use TF32 on CUDA (torch's default for cuDNN), so their share of the fp32 peak can exceed 100 %.

--pipeline adds an input-pipeline micro-benchmark: per-image PIL transforms with --workers workers against ctkd's
batched crop/flip/normalise (datasets.transforms.train_transform) on the CPU and, with CUDA, on the device.
--concurrent K1,K2,... (CUDA only; default 1,2,4) starts K copies of variant c (--concurrent-variant) as
subprocesses of this script on the same GPU, their timed windows started together, and reports their summed
images/s and the memory of each run. --append FILE appends the tables under a heading with the date, the machine,
the torch/CUDA versions and the exact command.

On CUDA the settings column says where the ctkd loader's batches arrive (`data_on_device` only helps where the loader
honours it). On a CPU whose cores are busy with other processes (or with loader workers on few cores), torch's
OpenMP threads wait on each other and a step can take 50 times longer: pin them with --threads on such machines.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import ctkd  # noqa: F401
except ImportError:  # run as `python scripts/benchmark.py` without an install: only scripts/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from ctkd import (
    datasets,  # noqa: E402
    models,  # noqa: E402
)
from ctkd.build import build_experiment  # noqa: E402
from ctkd.config import Config, load_config  # noqa: E402
from ctkd.datasets.transforms import train_transform  # noqa: E402
from ctkd.distributed import DistributedContext  # noqa: E402
from ctkd.engine import train_one_epoch  # noqa: E402
from ctkd.losses import kd_loss  # noqa: E402
from ctkd.methods.base import resolve_channels_last  # noqa: E402
from ctkd.temperature import GlobalTemperature, build_temperature, temperature_options  # noqa: E402
from ctkd.trainer import resolve_compile_mode, seed_everything  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "cifar100" / "ctkd" / "resnet56_resnet20.yaml"
VARIANTS = ("a", "b", "c", "d")
DEFAULT_PAIRS = "resnet56:resnet20,resnet32x4:resnet8x4"
NUM_CLASSES = 100
CE_WEIGHT, KD_WEIGHT = 0.1, 0.9  # the KD+CTKD config's loss weights (configs/cifar100/_base_/ctkd.yaml)
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # the CIFAR-100 protocol's SGD
JSON_MARK = "BENCH_JSON "  # prefix of the result line a --worker prints
MIB = 2**20

# defaults of the options whose value depends on --quick: (normal, quick)
QUICK_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "warmup": (20, 2),
    "steps": (100, 3),
    "trial_warmup": (5, 1),
    "trial_steps": (20, 2),
    "synthetic_size": (5000, None),  # quick: 4 batches, so the timed steps cross an epoch boundary
    "pipeline_batches": (100, 4),
    "concurrent": ("1,2,4", "1,2"),
    "rounds": (3, 1),
}


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Timing:
    """One timed window: steps, images, seconds, peak memory and what else the run found out."""

    steps: int
    images: int
    seconds: float
    peak_bytes: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Throughput over the window."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def step_ms(self) -> float:
        """Mean wall time of a step, in milliseconds."""
        return 1000.0 * self.seconds / self.steps if self.steps else float("nan")


@dataclass
class Row:
    """A row of the main table: a variant of a pair and its measurement."""

    pair: str
    variant: str
    label: str
    settings: str
    timing: Timing
    bf16: bool = False
    relative: str = ""


@dataclass
class Report:
    """Everything printed and appended: header lines and the tables in order."""

    header: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    extra_tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- memory
def current_rss() -> int:
    """Resident set size of this process in bytes (psutil if installed, else /proc, else the peak so far)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or on CPU the peak RSS above the level at entry."""

    def __init__(self, device: torch.device, interval_s: float = 0.01) -> None:
        self.device, self.interval_s = device, interval_s
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self.peak = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        """Background sampler of the RSS (CPU)."""
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss())

    @property
    def bytes(self) -> int:
        """The peak: allocated bytes on CUDA, RSS growth on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self.peak - self.base

    def reserved(self) -> int:
        """Peak bytes reserved by the CUDA caching allocator (0 on CPU)."""
        return int(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else 0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last variant left: garbage, compiled-graph caches, cached CUDA blocks."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # only loaded once something was compiled
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """The training split every variant uses, and how to get the same split from a ctkd config."""

    description: str
    split: datasets.ImageDataset  # uint8 (N, 3, 32, 32) images, int64 labels, normalisation constants

    @property
    def images(self) -> Tensor:
        """uint8 (N, 3, 32, 32)."""
        return self.split.images

    @property
    def targets(self) -> Tensor:
        """int64 (N,)."""
        return self.split.targets

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the [0, 1] pixels."""
        return tuple(self.split.mean)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation of the [0, 1] pixels."""
        return tuple(self.split.std)


def cifar_present(root: str) -> bool:
    """Whether CIFAR-100's training pickle is under `root`."""
    return (Path(root) / "cifar-100-python" / "train").is_file()


def data_overrides(args: argparse.Namespace) -> tuple[list[str], str]:
    """Config overrides selecting the benchmark's data, and a description of it."""
    if cifar_present(args.data_root):
        return [f"data.root={args.data_root}", "data.name=cifar100"], f"CIFAR-100 training set from {args.data_root}"
    size = synthetic_size(args)
    overrides = [
        "data.name=synthetic", f"data.num_classes={NUM_CLASSES}", f"data.train_size={size}",
        f"data.test_size={max(args.batch_size, 16)}",
    ]
    return overrides, (f"synthetic ({NUM_CLASSES} classes, {size:,} training images; no CIFAR-100 under "
                       f"{args.data_root})")


def synthetic_size(args: argparse.Namespace) -> int:
    """--synthetic-size rounded up to a whole number of batches (so no recompile for a short last batch)."""
    size = args.synthetic_size if args.synthetic_size is not None else 4 * args.batch_size
    return max(1, math.ceil(size / args.batch_size)) * args.batch_size


def load_data(args: argparse.Namespace) -> Data:
    """The training split (CIFAR-100 if present, else synthetic) as ctkd builds it."""
    description = data_overrides(args)[1]
    if cifar_present(args.data_root):
        split = datasets.build_dataset("cifar100", root=args.data_root, train=True)
    else:
        split = datasets.build_dataset(
            "synthetic", root="unused", train=True, num_classes=NUM_CLASSES, train_size=synthetic_size(args)
        )
    assert isinstance(split, datasets.ImageDataset)  # both are held in memory
    return Data(description, split)


class ReferenceCIFAR(Dataset):
    """torchvision.datasets.CIFAR100's layout: uint8 HWC numpy images, int labels, a PIL image per sample."""

    def __init__(self, data: Data, transform: Callable[[Image.Image], Tensor]) -> None:
        self.data = data.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) uint8
        self.targets = data.targets.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.transform(Image.fromarray(self.data[index]))
        return image, self.targets[index]


def reference_transform(data: Data) -> T.Compose:
    """The authors' CIFAR training transform, applied per image."""
    return T.Compose([
        T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std),
    ])


def reference_loader(data: Data, batch_size: int, workers: int) -> DataLoader:
    """The authors' training loader: shuffled, last batch kept, workers re-forked every epoch."""
    dataset = ReferenceCIFAR(data, reference_transform(data))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


class EpochFeed:
    """Batches from whole epochs of a loader, restarting it (and setting its epoch, if it has one) when exhausted."""

    def __init__(self, loader: Any, first_epoch: int = 1) -> None:
        self.loader, self.epoch = loader, first_epoch
        self.images = 0
        self.first_device: torch.device | None = None
        self._iterator: Iterator[Any] | None = None

    def _start_epoch(self) -> None:
        """Select the epoch (ctkd's sampler needs it) and start a new pass."""
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        elif hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(self.epoch)
        self._iterator = iter(self.loader)

    def take(self, count: int) -> Iterator[Any]:
        """The next `count` batches, counting their images."""
        produced = 0
        while produced < count:
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                self._iterator, self.epoch = None, self.epoch + 1
                continue
            images = batch[0]
            if self.first_device is None:
                self.first_device = images.device
            self.images += int(images.shape[0])
            produced += 1
            yield batch


# ---------------------------------------------------------------------------------------------------- variant a
def save_random_teacher(name: str, folder: Path) -> Path:
    """A randomly initialised `name` saved as a bare state_dict (what a teacher file may hold)."""
    torch.manual_seed(0)
    path = folder / f"{name}_random.pth"
    if not path.exists():
        torch.save(models.build_model(name, num_classes=NUM_CLASSES).state_dict(), path)
    return path


def accuracy(logits: Tensor, targets: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """The authors' top-k accuracy (%), left on the device as their AverageMeter receives it."""
    top = logits.topk(max(topk), dim=1).indices.t()
    correct = top.eq(targets.view(1, -1).expand_as(top))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / targets.shape[0]) for k in topk]


def reference_step(
    nets: tuple[nn.Module, nn.Module, nn.Module], optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor,
    grl_lambda: float, device: torch.device, losses: list[float],
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


def run_reference(
    teacher_name: str, student_name: str, data: Data, teacher_file: Path, args: argparse.Namespace,
    device: torch.device,
) -> Timing:
    """Variant a: the authors'-style loop over a per-image PIL DataLoader."""
    with PeakMemory(device) as memory:
        torch.manual_seed(0)
        student = models.build_model(student_name, num_classes=NUM_CLASSES).to(device).train()
        teacher = models.build_model(teacher_name, num_classes=NUM_CLASSES)
        teacher.load_state_dict(torch.load(teacher_file, map_location="cpu", weights_only=True))
        teacher = teacher.to(device).eval()
        temperature = GlobalTemperature().to(device)
        trainable = nn.ModuleList([student, temperature])
        optimizer = torch.optim.SGD(trainable.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        feed = EpochFeed(reference_loader(data, args.batch_size, args.workers))
        losses: list[float] = []
        nets = (student, teacher, temperature)
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


# ---------------------------------------------------------------------------------------------------- ctkd variants
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


def measure_ctkd(
    cfg: Config, device: torch.device, warmup: int, steps: int, before_timing: Callable[[], None] | None = None,
) -> Timing:
    """Build the experiment as the trainer does (seed, cudnn.benchmark, compile) and time train_one_epoch."""
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
            exp.schedule.set_epoch(1)
            grl_lambda = exp.curriculum(cfg.epochs)  # λ at its maximum (past the ramp): same cost as any other λ
            feed = EpochFeed(exp.train_loader)

            def run(count: int) -> None:
                """`count` training steps, as one call of train_one_epoch (its end-of-call read included)."""
                train_one_epoch(
                    exp.distiller, exp.optimizer, feed.take(count), grl_lambda=grl_lambda, device=device, epoch=1,
                    lr_schedule=exp.schedule, scaler=exp.scaler, check_every=cfg.logging.interval,
                )

            run(warmup)
            synchronize(device)
            if before_timing is not None:
                before_timing()
            start_images, start, wall_start = feed.images, time.perf_counter(), time.time()
            run(steps)
            synchronize(device)
            seconds, wall_end = time.perf_counter() - start, time.time()
        finally:
            exp.close()
    info = {
        "compile": compile_mode or "off", "reserved": memory.reserved(), "wall_start": wall_start,
        "wall_end": wall_end, "batches_on": str(feed.first_device.type if feed.first_device else "?"),
    }
    return Timing(steps, feed.images - start_images, seconds, memory.bytes, info)


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


CUDA_FASTEST = ["runtime.amp=bf16", "runtime.channels_last=true", "runtime.data_on_device=on",
                "runtime.cudnn_benchmark=true"]


def fastest_cuda(
    make_cfg: Callable[[Sequence[str]], Config], args: argparse.Namespace, device: torch.device,
) -> tuple[list[str], Timing, list[tuple[str, Timing | str]]]:
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


def fastest_cpu(
    make_cfg: Callable[[Sequence[str]], Config], args: argparse.Namespace, device: torch.device,
) -> tuple[list[str], Timing, list[tuple[str, Timing | str]]]:
    """Variant c on CPU: greedy search over workers, in-process batches, the memory format, bf16 (and compile) in
    short trials, each change kept when it is faster; the winner is then measured like the other variants."""
    choices: list[tuple[str, list[str]]] = []
    if args.workers > 0:
        choices.append(("data.num_workers", ["0"]))
    # channels_last: auto is NHWC on CPU already, so the contiguous layout is the alternative to try
    choices += [("runtime.data_on_device", ["on"]), ("runtime.channels_last", ["off"]), ("runtime.amp", ["bf16"])]
    if args.cpu_compile:
        choices.append(("runtime.compile", ["default"]))

    def trial(overrides: list[str]) -> Timing:
        """A short measurement of the defaults with `overrides`."""
        timing = measure_ctkd(make_cfg(overrides), device, args.trial_warmup, args.trial_steps)
        release(device)
        return timing

    best: list[str] = []
    best_timing = trial(best)
    tried = [("(ctkd defaults)", best_timing)]
    for key, values in choices:
        for value in values:
            candidate = [o for o in best if not o.startswith(key + "=")] + [f"{key}={value}"]
            timing = trial(candidate)
            tried.append((" ".join(candidate), timing))
            if timing.images_per_s > best_timing.images_per_s:
                best, best_timing = candidate, timing
    return best, best_timing, tried


# ---------------------------------------------------------------------------------------------------- FLOPs and peak
def forward_flops(name: str) -> int:
    """FLOPs of one image's forward pass of model `name` (FlopCounterMode, eval mode, on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build_model(name, num_classes=NUM_CLASSES).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(2, 3, 32, 32))
    return counter.get_total_flops() // 2


def step_flops_per_image(teacher_name: str, student_name: str) -> int:
    """FLOPs per image of a KD step: teacher forward + student forward and backward (≈ 3 forwards)."""
    return forward_flops(teacher_name) + 3 * forward_flops(student_name)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 0.5) -> float:
    """FLOP/s of a timed square torch.mm of `size`² in `dtype` (after warm-up), over about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    reps = max(3, int(seconds / max(time.perf_counter() - start, 1e-6)))
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    synchronize(device)
    return 2.0 * size**3 * reps / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- pipeline
def time_feed(feed: EpochFeed, batches: int, device: torch.device | None = None) -> float:
    """Images/s of `batches` batches of `feed` after one warm-up batch (worker start-up is not timed)."""
    for _ in feed.take(1):
        pass
    start_images, start = feed.images, time.perf_counter()
    for _ in feed.take(batches):
        pass
    if device is not None:
        synchronize(device)
    return (feed.images - start_images) / (time.perf_counter() - start)


class BatchedTransformLoader:
    """ctkd's batched train_transform over shuffled batches of uint8 images kept where `images` lives."""

    def __init__(self, data: Data, batch_size: int, device: torch.device) -> None:
        self.images, self.batch_size, self.device = data.images.to(device), batch_size, device
        self.targets = data.targets.to(device)
        self.mean, self.std, self.epoch = data.mean, data.std, 1

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the augmentation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.images), device=self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            images = train_transform(self.images[idx], idx, seed=0, epoch=self.epoch, mean=self.mean, std=self.std)
            yield images, self.targets[idx]


TEMPERATURE_NAMES = ("fixed", "global", "instance")


def temperature_overhead(
    args: argparse.Namespace, device: torch.device, fixed_step_ms: dict[str, float], iterations: int = 200,
) -> list[list[str]]:
    """Variant d's difference isolated: the temperature module (with the gradient reversal) and the KD loss, forward
    and backward on (batch, 100) logits, for each τ; what a τ adds over the fixed one, also as a share of each pair's
    fixed-τ step. Run-to-run noise of whole steps hides a difference this small; timed alone, it does not."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch_size, NUM_CLASSES, generator=gen).to(device).requires_grad_()
    teacher = torch.randn(args.batch_size, NUM_CLASSES, generator=gen).to(device)
    grl_lambda = torch.tensor(1.0, device=device)
    timings: dict[str, float] = {}
    for name in TEMPERATURE_NAMES:
        module = build_temperature(temperature_options(name), num_classes=NUM_CLASSES).to(device)

        def step(module: nn.Module = module) -> None:
            """The KD term of one step with this τ, forward and backward."""
            kd_loss(student, teacher, module(student, teacher, grl_lambda)).backward()

        for _ in range(10):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            step()
        synchronize(device)
        timings[name] = 1000.0 * (time.perf_counter() - start) / iterations
    rows = []
    for name in TEMPERATURE_NAMES:
        added = timings[name] - timings["fixed"]
        shares = ", ".join(f"{pair}: {100 * added / ms:+.2f} %" for pair, ms in fixed_step_ms.items())
        rows.append([name, f"{timings[name]:.3f}", "—" if name == "fixed" else f"{added:+.3f}",
                     "—" if name == "fixed" else (shares or "(no variant d step measured)")])
    return rows


def pipeline_benchmark(data: Data, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Images/s of the per-image PIL pipeline against ctkd's batched transforms (CPU, and the device with CUDA)."""
    n, rows = args.pipeline_batches, []
    pil = EpochFeed(reference_loader(data, args.batch_size, args.workers))
    rows.append([f"per-image PIL transforms (torchvision), DataLoader, {args.workers} workers",
                 f"{time_feed(pil, n):,.0f}"])
    batched = EpochFeed(BatchedTransformLoader(data, args.batch_size, torch.device("cpu")))
    rows.append(["ctkd train_transform, batched, main process, CPU", f"{time_feed(batched, n):,.0f}"])
    loader = datasets.build_loader(data.split, batch_size=args.batch_size, train=True, seed=0,
                                   num_workers=args.workers, persistent_workers=True)
    rows.append([f"ctkd loader (datasets.build_loader), {args.workers} workers",
                 f"{time_feed(EpochFeed(loader), n):,.0f}"])
    del loader
    if device.type == "cuda":
        try:
            on_device = EpochFeed(BatchedTransformLoader(data, args.batch_size, device))
            result = f"{time_feed(on_device, n, device):,.0f}"
        except Exception as err:  # noqa: BLE001 - reported in the table: the CPU rows still stand
            result = f"n/a ({type(err).__name__}: {str(err).splitlines()[0][:100]})"
        rows.append([f"ctkd train_transform, batched, on {torch.cuda.get_device_name(device)}", result])
    return rows


# ---------------------------------------------------------------------------------------------------- concurrency
def worker_command(args: argparse.Namespace, pair: str, overrides: list[str], barrier: Path, index: int) -> list[str]:
    """The command line of one concurrent run: this script in --worker mode."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--pairs", pair, "--device", args.device,
        "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--workers", str(args.workers), "--data-root", args.data_root,
        "--synthetic-size", str(synthetic_size(args)), "--worker-overrides", json.dumps(overrides),
        "--barrier", str(barrier), "--worker-index", str(index),
    ]
    return command + (["--threads", str(args.threads)] if args.threads else [])


def run_worker(args: argparse.Namespace) -> None:
    """--worker: one ctkd run of the pair with the given overrides; waits at the barrier; prints a JSON line."""
    teacher_name, student_name = parse_pairs(args.pairs)[0]
    device = pick_device(args.device)
    barrier = Path(args.barrier)

    def wait_for_go() -> None:
        """Say this run is warm, then wait until every run is (the parent's 'go' file)."""
        (barrier / f"ready.{args.worker_index}").touch()
        deadline = time.time() + 1800
        while not (barrier / "go").exists() and time.time() < deadline:
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as folder:
        teacher_file = save_random_teacher(teacher_name, Path(folder))
        cfg = ctkd_config(teacher_name, student_name, teacher_file, args, device, json.loads(args.worker_overrides))
        timing = measure_ctkd(cfg, device, args.warmup, args.steps, before_timing=wait_for_go)
    result = {"images": timing.images, "seconds": timing.seconds, "steps": timing.steps,
              "peak_bytes": timing.peak_bytes, **timing.info}
    print(JSON_MARK + json.dumps(result), flush=True)


def run_concurrent(
    args: argparse.Namespace, pair: str, overrides: list[str], counts: list[int],
) -> list[list[str]]:
    """K runs of a ctkd variant at once on one GPU for each K: summed images/s and memory per run."""
    rows, single = [], None
    for k in counts:
        with tempfile.TemporaryDirectory() as folder:
            barrier = Path(folder)
            logs = [open(barrier / f"log.{i}", "w+") for i in range(k)]  # noqa: SIM115 - closed below
            procs = [subprocess.Popen(worker_command(args, pair, overrides, barrier, i), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=REPO) for i, log in enumerate(logs)]
            while len(list(barrier.glob("ready.*"))) < k and all(p.poll() is None for p in procs):
                time.sleep(0.1)
            (barrier / "go").touch()
            for proc in procs:
                proc.wait()
            results, errors = [], []
            for proc, log in zip(procs, logs):
                log.seek(0)
                text = log.read()
                log.close()
                lines = [line for line in text.splitlines() if line.startswith(JSON_MARK)]
                if proc.returncode == 0 and lines:
                    results.append(json.loads(lines[-1][len(JSON_MARK):]))
                else:
                    errors.append(text.strip().splitlines()[-1] if text.strip() else f"exit {proc.returncode}")
        if errors:
            rows.append([str(k), f"failed: {errors[0][:120]}", "", "", "", "", ""])
            continue
        summed = sum(r["images"] / r["seconds"] for r in results)
        window = max(r["wall_end"] for r in results) - min(r["wall_start"] for r in results)
        wall = sum(r["images"] for r in results) / window
        single = single or summed
        rows.append([
            str(k), f"{summed:,.0f}", f"{wall:,.0f}", f"{summed / k:,.0f}",
            f"{max(r['peak_bytes'] for r in results) / MIB:,.0f}", f"{max(r['reserved'] for r in results) / MIB:,.0f}",
            f"{summed / single:.2f}×",
        ])
    return rows


# ---------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, str]:
    """CPU, GPU and software versions, for the report."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": f"{cpu_model()} ({cores} cores available, {os.cpu_count()} in the machine)",
        "gpu": "none",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} intra-op threads",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
        info["software"] += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return info


# ---------------------------------------------------------------------------------------------------- report
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


MAIN_HEADERS = ("pair", "variant", "settings", "images/s", "step (ms)", "peak memory (MiB)", "GFLOP/image",
                "achieved TFLOP/s", "% of peak", "relative")


def images_cell(timing: Timing) -> str:
    """Images/s of the median round, with the range of all rounds when there were several."""
    rounds = timing.info.get("rounds", [])
    spread = f" ({min(rounds):,.0f}–{max(rounds):,.0f})" if len(rounds) > 1 else ""
    return f"{timing.images_per_s:,.1f}{spread}"


def main_rows(report: Report, flops: dict[str, int], peaks: dict[str, float]) -> list[list[str]]:
    """The main table's cells."""
    rows = []
    for row in report.rows:
        t, per_image = row.timing, flops[row.pair]
        achieved = per_image * t.images_per_s
        kind = "bf16" if row.bf16 and "bf16" in peaks else "fp32"
        rows.append([
            row.pair, row.label, row.settings, images_cell(t), f"{t.step_ms:,.2f}",
            f"{t.peak_bytes / MIB:,.1f}", f"{per_image / 1e9:.3f}", f"{achieved / 1e12:.4f}",
            f"{100 * achieved / peaks[kind]:.2f} ({kind})", row.relative,
        ])
    return rows


def add_relative(rows: list[Row]) -> None:
    """Speed-ups against variant a (or b), and d's step-time cost against fixed τ, per pair."""
    for pair in dict.fromkeys(r.pair for r in rows):
        mine = [r for r in rows if r.pair == pair]
        by = {r.label: r for r in mine}
        base = next((r for r in mine if r.variant == "a"), None) or next((r for r in mine if r.variant == "b"), None)
        fixed = by.get("d: KD, fixed τ")
        for r in mine:
            if r.variant in "abc" and base is not None:
                ratio = r.timing.images_per_s / base.timing.images_per_s
                r.relative = "reference" if r is base else f"{ratio:.2f}× {base.variant}"
            elif r.variant == "d" and fixed is not None:
                cost = 100 * (r.timing.step_ms / fixed.timing.step_ms - 1)
                r.relative = "baseline of d" if r is fixed else f"{cost:+.1f} % step time vs fixed τ"


def render(report: Report, flops: dict[str, int], peaks: dict[str, float]) -> str:
    """Header lines and every table as Markdown."""
    parts = ["\n".join(f"- {line}" for line in report.header)]
    if report.rows:
        parts.append(markdown_table(MAIN_HEADERS, main_rows(report, flops, peaks)))
    for title, headers, rows in report.extra_tables:
        parts.append(f"{title}\n\n{markdown_table(headers, rows)}")
    return "\n\n".join(parts) + "\n"


def command_line(argv: Sequence[str]) -> str:
    """The exact command, with the script's path as typed (relative to the repository when inside it)."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return "python " + shlex.join([str(script), *argv])


def append_section(path: Path, body: str, info: dict[str, str], argv: Sequence[str]) -> None:
    """Append the report to `path` under a heading with the date and machine."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    gpu = info["gpu"] if info["gpu"] != "none" else "no GPU"
    heading = f"## Training throughput, {date}: {info['cpu'].split(' (')[0]}, {gpu}"
    lines = [heading, "", f"Command: `{command_line(argv)}`", ""]
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(separator + "\n".join(lines) + "\n" + body)


# ---------------------------------------------------------------------------------------------------- main
def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'teacher:student,...' → [(teacher, student), ...], names checked against the model registry."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        teacher, sep, student = item.partition(":")
        if not sep or not teacher or not student:
            raise SystemExit(f"--pairs: '{item}' is not TEACHER:STUDENT")
        for name in (teacher, student):
            try:
                models.MODELS.get(name)
            except ValueError as err:  # an unknown name, with close matches
                raise SystemExit(f"--pairs: {err}") from None
        pairs.append((teacher, student))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=DEFAULT_PAIRS, help=f"TEACHER:STUDENT,... (default {DEFAULT_PAIRS})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variants", default="a,b,c,d", help="any of a,b,c,d (see the module docstring)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (default 20; --quick 2)")
    p.add_argument("--steps", type=int, help="timed steps (default 100; --quick 3)")
    p.add_argument("--rounds", type=int, help="measure every variant this many times, alternating, and report the "
                                              "median (default 3; --quick 1)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of variants a, b and d (default 2)")
    p.add_argument("--data-root", default="./data", help="folder holding cifar-100-python/ (else synthetic data)")
    p.add_argument("--synthetic-size", type=int, help="synthetic training images (default 5000; --quick 4 batches)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--trial-warmup", type=int, help="warm-up steps of a CPU trial of variant c (default 5)")
    p.add_argument("--trial-steps", type=int, help="timed steps of a CPU trial of variant c (default 20)")
    p.add_argument("--cpu-compile", action="store_true", help="also try torch.compile in the CPU search of c")
    p.add_argument("--c-compile", choices=("default", "reduce-overhead", "max-autotune"),
                   help="CUDA: use this compile mode for c instead of measuring default and reduce-overhead")
    p.add_argument("--peak-size", type=int, help="matmul size of the peak (default 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--pipeline", action="store_true", help="add the input-pipeline micro-benchmark")
    p.add_argument("--pipeline-batches", type=int, help="timed batches per pipeline row (default 100; --quick 4)")
    p.add_argument("--concurrent", help="CUDA: K1,K2,... concurrent runs of --concurrent-variant (default 1,2,4; "
                                        "'0' for none)")
    p.add_argument("--concurrent-variant", choices=("b", "c"), default="c")
    p.add_argument("--append", type=Path, help="append the report to this Markdown file (e.g. docs/benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="tiny step counts and data, for tests")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-overrides", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset with their normal or --quick defaults, and check them."""
    for name, (normal, quick) in QUICK_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    if min(args.warmup, args.trial_warmup) < 0 or min(args.steps, args.trial_steps, args.batch_size, args.rounds) < 1:
        raise SystemExit("--steps, --trial-steps, --batch-size and --rounds must be >= 1, --warmup >= 0")
    return args


def pick_device(name: str) -> torch.device:
    """--device: auto → cuda when available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


@dataclass
class Entry:
    """A variant to measure in every round: how to measure it once, and how to describe its settings."""

    variant: str
    label: str
    measure: Callable[[], Timing]
    settings: Callable[[Timing], str]
    bf16: bool = False
    timings: list[Timing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self) -> Timing:
        """The round with the median throughput (the lower middle of an even count), its info listing every round's
        images/s and its peak memory the largest of all rounds."""
        ordered = sorted(self.timings, key=lambda t: t.images_per_s)
        middle = ordered[(len(ordered) - 1) // 2]
        middle.info["rounds"] = [t.images_per_s for t in self.timings]
        middle.peak_bytes = max(t.peak_bytes for t in self.timings)
        return middle


def measure_rounds(entries: Sequence[Entry], rounds: int, device: torch.device) -> None:
    """Measure every entry `rounds` times, alternating them within each round, so that a slow spell of a shared
    machine costs every variant alike instead of one. A measurement that fails is recorded and the rest go on."""
    for number in range(1, rounds + 1):
        if rounds > 1:
            print(f"  round {number} of {rounds}", file=sys.stderr, flush=True)
        for entry in entries:
            try:
                timing = entry.measure()
            except Exception as err:  # noqa: BLE001 - e.g. out of memory under one setting: the others still count
                entry.errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
                print(f"  {entry.label}: failed: {entry.errors[-1]}", file=sys.stderr, flush=True)
                continue
            finally:
                release(device)
            entry.timings.append(timing)
            print(f"  {entry.label}: {timing.images_per_s:,.1f} images/s", file=sys.stderr, flush=True)


def benchmark_pair(
    teacher_name: str, student_name: str, data: Data, args: argparse.Namespace, device: torch.device,
    report: Report, folder: Path,
) -> list[str]:
    """Every requested variant of one pair, as rows of `report`; returns the overrides chosen for variant c."""
    pair = f"{teacher_name} → {student_name}"
    variants = args.variants.split(",")
    teacher_file = save_random_teacher(teacher_name, folder)

    def make_cfg(extra: Sequence[str]) -> Config:
        """This pair's config with `extra` overrides."""
        return ctkd_config(teacher_name, student_name, teacher_file, args, device, extra)

    def ctkd_entry(variant: str, label: str, extra: Sequence[str], settings: str | None = None) -> Entry:
        """An entry measuring ctkd with `extra` overrides (settings: described from the config unless given)."""
        cfg = make_cfg(extra)
        return Entry(variant, label, lambda: measure_ctkd(cfg, device, args.warmup, args.steps),
                     lambda timing: settings or describe(cfg, timing, device),
                     bf16=cfg.runtime.amp == "bf16")

    entries: list[Entry] = []
    if "a" in variants:
        entries.append(Entry(
            "a", "a: reference loop",
            lambda: run_reference(teacher_name, student_name, data, teacher_file, args, device),
            lambda _: f"PIL per-image transforms, {args.workers} workers, fp32, torch SGD (default implementation), "
                      "loss.item() every step",
        ))
    if "b" in variants:
        entries.append(ctkd_entry("b", "b: ctkd defaults", []))
    chosen: list[str] = []
    if "c" in variants:
        search = fastest_cuda if device.type == "cuda" else fastest_cpu
        chosen, _, tried = search(make_cfg, args, device)
        kind = "full measurements" if device.type == "cuda" else f"trials of {args.trial_steps} steps"
        report.extra_tables.append((
            f"Variant c candidates, {pair} ({kind}; the fastest is then measured in the rounds of the main table)",
            ["overrides", "images/s", "step (ms)"],
            [[o, f"{t.images_per_s:,.1f}", f"{t.step_ms:,.2f}"] if isinstance(t, Timing) else [o, t, ""]
             for o, t in tried],
        ))
        entries.append(ctkd_entry("c", "c: ctkd fastest", chosen))
    if "d" in variants:
        for name, label in (("fixed", "d: KD, fixed τ"), ("global", "d: CTKD, global τ"),
                            ("instance", "d: CTKD, instance τ")):
            # the whole section replaced (each temperature reads only its own keys; a fixed τ has no curriculum)
            overrides = [f"temperature={name}"] + (["curriculum=cosine"] if name == "fixed" else [])
            entries.append(ctkd_entry("d", label, overrides, f"ctkd defaults, temperature={name}"))
    measure_rounds(entries, args.rounds, device)
    for entry in entries:
        if entry.timings:
            timing = entry.median()
            report.rows.append(Row(pair, entry.variant, entry.label, entry.settings(timing), timing, entry.bf16))
        if entry.errors:
            report.header.append(f"{pair}, {entry.label}: {len(entry.errors)} of {args.rounds} round(s) failed "
                                 f"({entry.errors[0]})")
    return chosen or [*CUDA_FASTEST, f"runtime.compile={args.c_compile or 'default'}"]


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """Measure everything asked for and return the Markdown report (also appended with --append)."""
    device = pick_device(args.device)
    pairs = parse_pairs(args.pairs)
    info = machine(device)
    data = load_data(args)
    report = Report()
    peak_size = args.peak_size or (4096 if device.type == "cuda" else 1024)
    peaks = {"fp32": matmul_peak(device, torch.float32, peak_size)}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, peak_size)
    flops = {f"{t} → {s}": step_flops_per_image(t, s) for t, s in pairs}
    report.header += [
        f"machine: {info['cpu']}; GPU: {info['gpu']}; {info['software']}",
        f"device: {device}; data: {data.description}; batch {args.batch_size}; warm-up {args.warmup} steps, timed "
        f"{args.steps} steps; each row is the median of {args.rounds} round(s) in which the variants alternate "
        "(the range of images/s over the rounds in parentheses)",
        "matmul peak (" + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items())
        + f", {peak_size}² torch.mm); FLOPs per image = teacher forward + 3 × student forward: "
        + ", ".join(f"{pair} {value / 1e9:.3f} GFLOP" for pair, value in flops.items()),
        "peak memory: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                           else "peak RSS of the main process above its level at the variant's start")
        + " (the largest over the rounds)",
    ]
    counts = [int(k) for k in args.concurrent.split(",") if k.strip() and int(k) > 0]
    with tempfile.TemporaryDirectory() as folder:
        for teacher_name, student_name in pairs:
            print(f"{teacher_name} → {student_name}", file=sys.stderr, flush=True)
            chosen = benchmark_pair(teacher_name, student_name, data, args, device, report, Path(folder))
            if device.type == "cuda" and counts:
                overrides = chosen if args.concurrent_variant == "c" else []
                report.extra_tables.append((
                    f"Concurrent runs of variant {args.concurrent_variant} on one GPU, {teacher_name} → "
                    f"{student_name} ({' '.join(overrides) or 'ctkd defaults'})",
                    ["runs", "images/s (sum)", "images/s (all images / union of windows)", "images/s per run",
                     "peak allocated per run (MiB)", "peak reserved per run (MiB)", "vs 1 run"],
                    run_concurrent(args, f"{teacher_name}:{student_name}", overrides, counts),
                ))
    add_relative(report.rows)
    if "d" in args.variants.split(","):
        fixed_step_ms = {r.pair: r.timing.step_ms for r in report.rows if r.label == "d: KD, fixed τ"}
        report.extra_tables.append((
            f"The work a learnable τ adds, isolated: temperature module + KD loss, forward and backward on "
            f"({args.batch_size}, {NUM_CLASSES}) logits, mean of 200 iterations",
            ["temperature", "KD term (ms)", "added vs fixed τ (ms)", "as a share of the fixed-τ step (variant d)"],
            temperature_overhead(args, device, fixed_step_ms),
        ))
    if args.pipeline:
        report.extra_tables.append((
            f"Input pipeline, batch {args.batch_size}, {args.pipeline_batches} batches after one warm-up batch",
            ["pipeline", "images/s"], pipeline_benchmark(data, args, device),
        ))
    body = render(report, flops, peaks)
    if args.append is not None:
        append_section(args.append, body, info, argv)
    return body


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args)
        return 0
    print(run_benchmark(args, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
