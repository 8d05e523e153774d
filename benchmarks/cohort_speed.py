"""A cohort (ctkd.cohort) against its members trained one after another, end to end, on the CPU (or --device).

    python -m benchmarks.cohort_speed                                  # both pairs, 2 and 14 members
    python -m benchmarks.cohort_speed --pair resnet56:resnet20 --members 2 --steps 8 --append docs/benchmarks.md

The members are the shipped configs of a table row: `cifar_kd`'s KD and CTKD (2 members) and the plug-in row, KD,
PKT, SP, VID, CRD, SRRL and DKD each ± CTKD (14 members: configs/cifar100/{kd,ctkd,plugin}/.../resnet56_resnet20.yaml,
with the pair's networks swapped in for resnet32x4 → resnet8x4). Each is trained for 2 epochs of --steps batches of
64 CIFAR-shaped synthetic images (100 classes) from a randomly initialised teacher file, exactly as train.py trains
it: separately, each member in a process of its own, one after another; and together, all members in one process
(`train.py --config A --config B ...`). Reported: the second epoch's time (every network built, the teacher's test
accuracy known: the steady state of a long run), the wall time of the whole command (start-up included), images/s
per student in the steady state, and the peak resident memory of the largest process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BATCH = 64
EPOCHS = 2
ROW = "resnet56_resnet20"
PLUGIN = ("pkt", "sp", "vid", "crd", "srrl", "dkd")


def member_configs(count: int) -> list[str]:
    """The shipped configs of the row's members: KD and CTKD, then the plug-in methods ± CTKD."""
    configs = [f"configs/cifar100/kd/{ROW}.yaml", f"configs/cifar100/ctkd/{ROW}.yaml"]
    if count > 2:
        configs += [f"configs/cifar100/plugin/{method}/{variant}/{ROW}.yaml"
                    for method in PLUGIN for variant in ("base", "ctkd")]
    return configs[:count]


def overrides(teacher: str, student: str, teacher_file: Path, steps: int, out: Path, index: int) -> list[str]:
    """Synthetic CIFAR-shaped data of `steps` batches, the pair's networks, 2 epochs, no TensorBoard."""
    return ["data.name=synthetic", "data.num_classes=100", f"data.train_size={steps * BATCH}",
            f"data.test_size={BATCH}", f"data.batch_size={BATCH}", f"epochs={EPOCHS}", f"student.name={student}",
            f"teacher.name={teacher}", f"teacher.checkpoint={teacher_file}", f"output_dir={out / f'm{index}'}",
            "logging.tensorboard=false", "logging.progress_bar=false"]


# runs train.py in this process and writes its peak resident memory (KiB) to the file named by CTKD_PEAK_FILE
PEAK_WRAPPER = """
import os, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.environ["CTKD_PEAK_FILE"], "w") as out:
        out.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def timed(command: list[str], env: dict[str, str], peak_file: Path) -> tuple[float, int]:
    """Wall seconds of `python train.py ...` (`command`: its arguments) and the peak resident memory (bytes) of its
    process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEAK_WRAPPER, "train.py", *command], cwd=REPO,
                   env={**env, "CTKD_PEAK_FILE": str(peak_file)}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    return time.perf_counter() - start, int(peak_file.read_text()) * 1024


def second_epoch_s(run_dir: Path) -> float:
    """The time of the run's second epoch, from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(record["epoch_time"] for record in records if record["epoch"] == 2)


def measure(teacher: str, student: str, members: int, steps: int, device: str) -> dict[str, float]:
    """Both ways of training the row's members; the numbers of each."""
    from ctkd import models

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    configs = member_configs(members)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        teacher_file = root / "teacher.pth"
        torch.save({"model": models.build_model(teacher, num_classes=100).state_dict()}, teacher_file)
        alone_wall, alone_peak, alone_epoch = 0.0, 0, 0.0
        for index, config in enumerate(configs):
            extra = overrides(teacher, student, teacher_file, steps, root / "alone", index)
            wall, peak = timed(["--config", config, *extra, f"device={device}"], env, root / "peak")
            alone_wall, alone_peak = alone_wall + wall, max(alone_peak, peak)
            alone_epoch += second_epoch_s(root / "alone" / f"m{index}")
        command = [f"device={device}"]
        for index, config in enumerate(configs):
            command += ["--config", config, *overrides(teacher, student, teacher_file, steps, root / "together", index)]
        together_wall, together_peak = timed(command, env, root / "peak")
        # each member's epoch spans the cohort's whole epoch (they step in turn): the slowest is the epoch's time
        together_epoch = max(second_epoch_s(root / "together" / f"m{index}") for index in range(len(configs)))
    images = steps * BATCH
    return {"alone_epoch_s": alone_epoch, "together_epoch_s": together_epoch, "alone_wall_s": alone_wall,
            "together_wall_s": together_wall, "alone_img_s": images * len(configs) / alone_epoch / len(configs),
            "together_img_s": images * len(configs) / together_epoch / len(configs),
            "alone_peak_gib": alone_peak / 2**30, "together_peak_gib": together_peak / 2**30}


def table(rows: list[tuple[str, int, dict[str, float]]], steps: int, device: str) -> str:
    """The results as a markdown table."""
    lines = [f"Cohort vs members one after another ({device}, {torch.get_num_threads()} threads, batch {BATCH}, "
             f"{steps} steps per epoch, epoch 2 timed; `python -m benchmarks.cohort_speed --steps {steps}`):", "",
             "| pair | members | epoch 2 alone (s) | epoch 2 cohort (s) | speed-up | img/s per student alone → cohort "
             "| wall alone → cohort (s) | peak RSS alone → cohort (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for pair, members, r in rows:
        lines.append(
            f"| {pair} | {members} | {r['alone_epoch_s']:.1f} | {r['together_epoch_s']:.1f} | "
            f"{r['alone_epoch_s'] / r['together_epoch_s']:.2f}× | {r['alone_img_s']:.0f} → {r['together_img_s']:.0f} "
            f"| {r['alone_wall_s']:.0f} → {r['together_wall_s']:.0f} ({r['alone_wall_s'] / r['together_wall_s']:.2f}×) "
            f"| {r['alone_peak_gib']:.2f} → {r['together_peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure the requested pairs and member counts; print (and append) the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", action="append", help="TEACHER:STUDENT (repeatable; default both pairs)")
    parser.add_argument("--members", type=int, action="append", choices=(2, 14), help="2 and/or 14 (default both)")
    parser.add_argument("--steps", type=int, default=8, help="batches per epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--append", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    rows = []
    for pair in args.pair or ["resnet56:resnet20", "resnet32x4:resnet8x4"]:
        teacher, student = pair.split(":")
        for members in args.members or [2, 14]:
            result = measure(teacher, student, members, args.steps, args.device)
            rows.append((f"{teacher} → {student}", members, result))
            print(json.dumps({"pair": pair, "members": members, **result}), flush=True)
    text = table(rows, args.steps, args.device)
    print(text)
    if args.append is not None:
        with args.append.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
