"""Steady-state training throughput of an authors'-style KD+CTKD loop and of ctkd, side by side in one process.

    python benchmarks/benchmark.py                                # resnet56→resnet20 and resnet32x4→resnet8x4, batch 64
    python benchmarks/benchmark.py --device cuda --pipeline --append docs/benchmarks.md
    python benchmarks/benchmark.py --pairs resnet8:resnet8 --batch-size 8 --device cpu --quick   # a few seconds

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
  b  ctkd defaults: build_experiment + Trainer.train_epoch with configs/cifar100/ctkd/resnet56_resnet20.yaml (teacher,
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

This file holds the command line and the order of the work; the rest of benchmarks/ holds one part each:
reference_loop.py (variant a), ctkd_loop.py (ctkd's step, variants b to d), fastest.py (variant c's search),
variants.py (the entries of a pair), rounds.py (alternating rounds, median), temperature_cost.py (variant d's τ
alone), pipeline.py (PIL against batched transforms), flops.py (FLOPs and the matmul peak), memory.py (peak
memory), concurrency.py (runs side by side on one GPU), data.py, device.py, results.py and report.py.
"""
# ruff: noqa: E402 - the imports of the package follow the sys.path set-up below
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Run as `python benchmarks/benchmark.py`, only benchmarks/ is on sys.path: the repository root holds the namespace
# package `benchmarks` (no __init__.py: an install ships ctkd alone) and, without an install, ctkd. Appended, so
# that an installed ctkd is the one measured.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import torch

from benchmarks.concurrency import concurrent_table, run_worker
from benchmarks.data import Data, load_data, save_random_teacher
from benchmarks.device import machine, pick_device
from benchmarks.fastest import CUDA_FASTEST
from benchmarks.flops import matmul_peaks, step_flops_per_image
from benchmarks.pipeline import pipeline_table
from benchmarks.report import add_relative, append_section, header_lines, render
from benchmarks.results import Report
from benchmarks.rounds import measure_rounds, record
from benchmarks.temperature_cost import temperature_table
from benchmarks.variants import Pair, pair_entries
from ctkd import models

VARIANTS = ("a", "b", "c", "d")
DEFAULT_PAIRS = "resnet56:resnet20,resnet32x4:resnet8x4"

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


# ---------------------------------------------------------------------------------------------------- options
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


# ---------------------------------------------------------------------------------------------------- orchestration
def benchmark_pair(
    teacher_name: str, student_name: str, data: Data, args: argparse.Namespace, device: torch.device,
    report: Report, folder: Path,
) -> list[str]:
    """Every requested variant of one pair, as rows of `report`; returns the overrides chosen for variant c."""
    pair = Pair(teacher_name, student_name, save_random_teacher(teacher_name, folder), data, args, device)
    entries, chosen = pair_entries(pair, report.extra_tables)
    measure_rounds(entries, args.rounds, device)
    record(report, pair.name, entries, args.rounds)
    # without variant c (or on CPU), the concurrent runs of c take the CUDA fast settings
    return chosen or [*CUDA_FASTEST, f"runtime.compile={args.c_compile or 'default'}"]


def measure_pairs(
    pairs: list[tuple[str, str]], data: Data, args: argparse.Namespace, device: torch.device, report: Report,
) -> None:
    """Every pair's variants and, on CUDA, its concurrent runs; the random teachers live in a temporary folder."""
    counts = [int(k) for k in args.concurrent.split(",") if k.strip() and int(k) > 0]
    with tempfile.TemporaryDirectory() as folder:
        for teacher_name, student_name in pairs:
            print(f"{teacher_name} → {student_name}", file=sys.stderr, flush=True)
            chosen = benchmark_pair(teacher_name, student_name, data, args, device, report, Path(folder))
            if device.type == "cuda" and counts:
                report.extra_tables.append(concurrent_table(args, teacher_name, student_name, chosen, counts))


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """Measure everything asked for and return the Markdown report (also appended with --append)."""
    device = pick_device(args.device)
    pairs = parse_pairs(args.pairs)
    info = machine(device)
    data = load_data(args)
    report = Report()
    peak_size = args.peak_size or (4096 if device.type == "cuda" else 1024)
    peaks = matmul_peaks(device, peak_size)
    flops = {f"{t} → {s}": step_flops_per_image(t, s) for t, s in pairs}
    report.header += header_lines(info, device, data.description, args, peaks, peak_size, flops)
    measure_pairs(pairs, data, args, device, report)
    add_relative(report.rows)
    if "d" in args.variants.split(","):
        report.extra_tables.append(temperature_table(args, device, report.rows))
    if args.pipeline:
        report.extra_tables.append(pipeline_table(data, args, device))
    body = render(report, flops, peaks)
    if args.append is not None:
        append_section(args.append, body, info, argv)
    return body


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the benchmark, or with --worker one concurrent run of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        run_worker(args, *parse_pairs(args.pairs)[0])
        return 0
    print(run_benchmark(args, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
