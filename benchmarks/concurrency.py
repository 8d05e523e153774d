"""Several runs on one GPU: K copies of a ctkd variant as subprocesses (benchmark.py --worker), timed together."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from benchmarks.ctkd_loop import ctkd_config, measure_ctkd
from benchmarks.data import save_random_teacher, synthetic_size
from benchmarks.device import pick_device
from benchmarks.memory import MIB
from benchmarks.results import Table

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "benchmark.py"  # the entry point, which runs a worker for --worker
REPO = HERE.parent  # the workers run from the repository root, as the benchmark itself is run
JSON_MARK = "BENCH_JSON "  # prefix of the result line a --worker prints
HEADERS = ["runs", "images/s (sum)", "images/s (all images / union of windows)", "images/s per run",
           "peak allocated per run (MiB)", "peak reserved per run (MiB)", "vs 1 run"]


def worker_command(args: argparse.Namespace, pair: str, overrides: list[str], barrier: Path, index: int) -> list[str]:
    """The command line of one concurrent run: the benchmark in --worker mode."""
    command = [
        sys.executable, str(SCRIPT), "--worker", "--pairs", pair, "--device", args.device,
        "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps),
        "--workers", str(args.workers), "--data-root", args.data_root,
        "--synthetic-size", str(synthetic_size(args)), "--worker-overrides", json.dumps(overrides),
        "--barrier", str(barrier), "--worker-index", str(index),
    ]
    return command + (["--threads", str(args.threads)] if args.threads else [])


def run_worker(args: argparse.Namespace, teacher_name: str, student_name: str) -> None:
    """--worker: one ctkd run of the pair with the given overrides; waits at the barrier; prints a JSON line."""
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


def read_results(procs: list[subprocess.Popen], logs: list[IO[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The finished workers' JSON results, and for each that failed its last line of output (logs are closed)."""
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
    return results, errors


def run_together(
    args: argparse.Namespace, pair: str, overrides: list[str], k: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """K workers whose timed windows start together (once every one is warm): their results and errors."""
    with tempfile.TemporaryDirectory() as folder:
        barrier = Path(folder)
        logs = [open(barrier / f"log.{i}", "w+") for i in range(k)]  # noqa: SIM115 - closed by read_results
        procs = [subprocess.Popen(worker_command(args, pair, overrides, barrier, i), stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO) for i, log in enumerate(logs)]
        while len(list(barrier.glob("ready.*"))) < k and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        (barrier / "go").touch()
        for proc in procs:
            proc.wait()
        return read_results(procs, logs)


def concurrent_row(k: int, results: list[dict[str, Any]], summed: float, single: float) -> list[str]:
    """A table row of K runs: summed and whole-window images/s, per run, memory, and the gain over one run."""
    window = max(r["wall_end"] for r in results) - min(r["wall_start"] for r in results)
    wall = sum(r["images"] for r in results) / window
    return [
        str(k), f"{summed:,.0f}", f"{wall:,.0f}", f"{summed / k:,.0f}",
        f"{max(r['peak_bytes'] for r in results) / MIB:,.0f}", f"{max(r['reserved'] for r in results) / MIB:,.0f}",
        f"{summed / single:.2f}×",
    ]


def run_concurrent(args: argparse.Namespace, pair: str, overrides: list[str], counts: list[int]) -> list[list[str]]:
    """K runs of a ctkd variant at once on one GPU for each K: summed images/s and memory per run."""
    rows: list[list[str]] = []
    single: float | None = None
    for k in counts:
        results, errors = run_together(args, pair, overrides, k)
        if errors:
            rows.append([str(k), f"failed: {errors[0][:120]}", "", "", "", "", ""])
            continue
        summed = sum(r["images"] / r["seconds"] for r in results)
        single = single or summed  # the first K that ran is the baseline of "vs 1 run"
        rows.append(concurrent_row(k, results, summed, single))
    return rows


def concurrent_table(
    args: argparse.Namespace, teacher_name: str, student_name: str, chosen: list[str], counts: list[int],
) -> Table:
    """--concurrent's table for one pair: variant c runs with the overrides chosen for it, variant b with none."""
    overrides = chosen if args.concurrent_variant == "c" else []
    return (
        f"Concurrent runs of variant {args.concurrent_variant} on one GPU, {teacher_name} → {student_name} "
        f"({' '.join(overrides) or 'ctkd defaults'})",
        HEADERS, run_concurrent(args, f"{teacher_name}:{student_name}", overrides, counts),
    )
