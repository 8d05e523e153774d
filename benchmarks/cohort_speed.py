"""A cohort (ctkd.cohort) against its members trained one after another, end to end, on the CPU (or --device).

    python -m benchmarks.cohort_speed                                  # both pairs, 2 and 14 members
    python -m benchmarks.cohort_speed --pair resnet56:resnet20 --members 2 --steps 8 --append docs/benchmarks.md

The members are the shipped configs of a table row: `cifar_kd`'s KD and CTKD (2 members) and the plug-in row, KD,
PKT, SP, VID, CRD, SRRL and DKD each ± CTKD (14 members:
configs/cifar100/{kd,ctkd,plugin}/.../resnet56_resnet20.yaml, with the pair's networks swapped in for resnet32x4 →
resnet8x4). Each is trained for 2 epochs of --steps batches of 64 CIFAR-shaped synthetic images (100 classes) from a
randomly initialised teacher file (BatchNorm statistics set on random images), exactly as train.py trains it:
separately, each member in a process of its own, one after another; and together, all members in one process
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
from typing import Any

import torch

from benchmarks.report import publish

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


# runs train.py in this process; writes its peak resident memory (bytes), the seconds its teacher forwards took
# (every Distiller.compute_teacher_view, the work a cohort shares) and the moments each epoch's end (evaluation,
# metrics and checkpoints) was done, for every run it trains, as JSON to the file named by CTKD_STATS_FILE
STATS_WRAPPER = """
import json, os, resource, runpy, sys, time
import torch
from ctkd.distiller import Distiller
sys.argv = sys.argv[1:]
real, spent = Distiller.compute_teacher_view, [0.0]
def timed_view(self, images, **kwargs):
    start = time.perf_counter()
    out = real(self, images, **kwargs)
    if images.is_cuda:
        torch.cuda.synchronize()
    spent[0] += time.perf_counter() - start
    return out
Distiller.compute_teacher_view = timed_view
from ctkd.trainer import Trainer
real_save, ends = Trainer.save_epoch_end, []
def timed_save(self, *args, **kwargs):
    real_save(self, *args, **kwargs)
    ends.append(time.perf_counter())
Trainer.save_epoch_end = timed_save
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.environ["CTKD_STATS_FILE"], "w") as out:
        json.dump({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "teacher_s": spent[0],
                   "epoch_ends": ends}, out)
"""


def timed(command: list[str], env: dict[str, str], stats_file: Path) -> dict[str, Any]:
    """`python train.py ...` (`command`: its arguments) run: its wall seconds ("wall"), the peak resident memory
    (bytes, "peak") of its process, the seconds its teacher forwards took ("teacher_s") and the moments its epochs
    ended ("epoch_ends", every run's, in order)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", STATS_WRAPPER, "train.py", *command], cwd=REPO,
                   env={**env, "CTKD_STATS_FILE": str(stats_file)}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    return {"wall": time.perf_counter() - start, **json.loads(stats_file.read_text())}


def last_epoch_s(epoch_ends: list[float], runs: int) -> float:
    """The time from the end of the second-to-last epoch to the end of the last (training, evaluation, metrics and
    checkpoints: the steady state of a long run) of `runs` runs trained together, whose epoch ends are `epoch_ends`
    (every run ends epoch e before any ends epoch e + 1)."""
    assert len(epoch_ends) == EPOCHS * runs, "a run did not end every epoch"
    return epoch_ends[-1] - epoch_ends[-runs - 1]


def calibrated_teacher(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with BatchNorm statistics measured on random images: a freshly initialised deep ResNet's logits reach
    ~1e4 in eval mode (unit running variances under growing residual sums), which makes VID's loss non-finite."""
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(BATCH, 3, 32, 32))
    return net.eval()


def measure(teacher: str, student: str, members: int, steps: int, device: str) -> dict[str, float]:
    """Both ways of training the row's members; the numbers of each."""
    from ctkd import models

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    configs = member_configs(members)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher_file = root / "teacher.pth"
        net = calibrated_teacher(models.build_model(teacher, num_classes=100))
        torch.save({"model": net.state_dict()}, teacher_file)
        alone = []
        for index, config in enumerate(configs):
            extra = overrides(teacher, student, teacher_file, steps, root / "alone", index)
            alone.append(timed(["--config", config, *extra, f"device={device}"], env, root / "stats"))
        command = [f"device={device}"]
        for index, config in enumerate(configs):
            command += ["--config", config, *overrides(teacher, student, teacher_file, steps, root / "together", index)]
        together = timed(command, env, root / "stats")
    alone_epoch = sum(last_epoch_s(stats["epoch_ends"], 1) for stats in alone)
    together_epoch = last_epoch_s(together["epoch_ends"], len(configs))
    alone_teacher = sum(stats["teacher_s"] for stats in alone)
    images = steps * BATCH  # per student: img/s per student = one student's images / the time all of them took
    # the most a cohort can gain: it computes the teacher's views once (per kind) instead of once per member; the
    # rest of each member's work (its own forward, backward, method, optimizer) it does as the separate runs do
    saved_per_epoch = (alone_teacher - together["teacher_s"]) / EPOCHS
    bound = alone_epoch / (alone_epoch - saved_per_epoch)
    return {"teacher_share": alone_teacher / EPOCHS / alone_epoch, "bound": bound,
            "alone_epoch_s": alone_epoch, "together_epoch_s": together_epoch,
            "alone_wall_s": sum(stats["wall"] for stats in alone), "together_wall_s": together["wall"],
            "alone_img_s": images / alone_epoch, "together_img_s": images / together_epoch,
            "alone_peak_gib": max(stats["peak"] for stats in alone) / 2**30,
            "together_peak_gib": together["peak"] / 2**30}


def table(rows: list[tuple[str, int, dict[str, float]]], steps: int, device: str) -> str:
    """The results as a markdown table."""
    lines = [f"Cohort vs members one after another ({device}, {torch.get_num_threads()} threads, batch {BATCH}, "
             f"{steps} steps per epoch, epoch 2 timed end to end; "
             f"`python -m benchmarks.cohort_speed --steps {steps}`):", "",
             "| pair | members | epoch 2 alone (s) | epoch 2 cohort (s) | speed-up (bound) "
             "| img/s per student alone → cohort | wall alone → cohort (s) | peak RSS alone → cohort (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for pair, members, r in rows:
        lines.append(
            f"| {pair} | {members} | {r['alone_epoch_s']:.1f} | {r['together_epoch_s']:.1f} | "
            f"{r['alone_epoch_s'] / r['together_epoch_s']:.2f}× ({r['bound']:.2f}×) | "
            f"{r['alone_img_s']:.0f} → {r['together_img_s']:.0f} "
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
    publish(table(rows, args.steps, args.device), args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
