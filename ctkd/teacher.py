"""The run's teacher: trained first when its checkpoint is missing, identified by its file's hash, and evaluated
once per file and test split (ctkd.cache)."""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctkd.cache import cache_key, read_cached, write_cached
from ctkd.config import Config, config_to_dict, load_config
from ctkd.distributed import DistributedContext, broadcast_object, wait_for_run_directory
from ctkd.evaluation import evaluate
from ctkd.locks import RunLock
from ctkd.logging import get_logger
from ctkd.provenance import file_sha256

if TYPE_CHECKING:
    from ctkd.build import Experiment

TrainRun = Callable[..., Any]  # ctkd.trainer.run(cfg, resume=..., run_lock=...)
TEACHER_EVAL = "teacher-eval"  # the cache kind of teachers' test accuracies (ctkd.cache)


def ensure_teacher_checkpoint(cfg: Config, ctx: DistributedContext, train: TrainRun) -> None:
    """If the teacher checkpoint is missing and `teacher.train_config` is set, train that teacher first (`train`).

    The teacher run is an ordinary run of its own config file (resumed if it was interrupted; the student's
    command-line overrides do not apply to it), so its result is reused by every later student run. Rank 0 decides,
    so all ranks enter the same run. Student runs started together that need the same teacher train it once: the
    first takes the teacher run's directory lock, the others wait for it and then use the file it wrote.
    """
    if cfg.teacher.checkpoint is None or cfg.teacher.train_config is None:
        return  # no teacher (vanilla), or load_teacher reports a missing file with instructions
    if not _teacher_missing(cfg, ctx):
        return
    teacher_cfg = load_config(cfg.teacher.train_config)  # check_teacher_source: it writes that file
    lock = wait_for_run_directory(teacher_cfg.output_dir, ctx, f"teacher checkpoint {cfg.teacher.checkpoint}")
    try:
        _train_missing_teacher(cfg, teacher_cfg, ctx, train, lock)
    finally:
        if lock is not None:
            lock.release()


def _teacher_missing(cfg: Config, ctx: DistributedContext) -> bool:
    """Whether the teacher file is missing, as rank 0 sees it (every rank gets the same answer)."""
    return bool(broadcast_object(not Path(cfg.teacher.checkpoint).is_file() if ctx.is_main else None))


def _train_missing_teacher(cfg: Config, teacher_cfg: Config, ctx: DistributedContext, train: TrainRun,
                           lock: RunLock | None) -> None:
    """Train the teacher under its run directory's lock, unless the run that held the lock wrote the file."""
    if not _teacher_missing(cfg, ctx):
        get_logger().info(f"teacher checkpoint {cfg.teacher.checkpoint} was written by the run that held it: using it")
        return
    get_logger().info(f"teacher checkpoint {cfg.teacher.checkpoint} not found: training it with "
                      f"{cfg.teacher.train_config}")
    train(teacher_cfg, resume="auto", run_lock=lock)


def teacher_sha256(exp: Experiment, cfg: Config, ctx: DistributedContext) -> str | None:
    """SHA-256 of the teacher file the run is built from (None without one, e.g. teacher.pretrained), hashed by
    rank 0 and shared, so every rank checks a resume against it alike."""
    has_file = exp.distiller.teacher is not None and cfg.teacher.checkpoint is not None
    return broadcast_object(file_sha256(cfg.teacher.checkpoint) if ctx.is_main and has_file else None)


def _teacher_eval_inputs(exp: Experiment, cfg: Config, sha256: str) -> dict[str, Any]:
    """What a teacher's test accuracy is a function of: its file, how it is built and run, and the test split."""
    data = {key: value for key, value in config_to_dict(cfg)["data"].items()
            if key not in ("download", "num_workers", "test_batch_size", "batch_size")}
    test = exp.test_loader.dataset.dataset  # the source of the loader's batches
    targets = getattr(test, "targets", None)
    return {
        "teacher_sha256": sha256, "teacher": cfg.teacher.name, "kwargs": cfg.teacher.kwargs,
        "data": data, "root": str(Path(cfg.data.root).resolve()), "test_size": len(test),
        "targets_sha256": None if targets is None else hashlib.sha256(targets.cpu().numpy().tobytes()).hexdigest(),
        "runtime": {"amp": cfg.runtime.amp, "channels_last": exp.distiller.runtime.channels_last,
                    "fold_teacher_bn": cfg.runtime.fold_teacher_bn}, "device": exp.device.type,
        "torch": torch.__version__,
    }


def evaluate_teacher(exp: Experiment, cfg: Config, sha256: str | None) -> dict[str, Any] | None:
    """The frozen teacher's test accuracy, shown at start-up so a wrong checkpoint shows before hours of training.

    Evaluated once per teacher file and test split (ctkd.cache): the runs of a table that share a teacher read the
    number the first one computed. Rank 0 decides; every rank then evaluates, or none does.
    """
    teacher = exp.distiller.teacher
    if teacher is None:
        return None
    inputs = _teacher_eval_inputs(exp, cfg, sha256) if sha256 is not None else None
    key = cache_key(TEACHER_EVAL, inputs) if inputs is not None else None
    metrics = broadcast_object(read_cached(TEACHER_EVAL, key) if key is not None and exp.ctx.is_main else None)
    if metrics is not None:
        return {**metrics, "note": " (evaluated before, with this teacher file and test split)"}
    metrics = evaluate(teacher, exp.test_loader, exp.device, exp.distiller.runtime)
    if key is not None and exp.ctx.is_main:
        write_cached(TEACHER_EVAL, key, metrics, inputs)
    return {**metrics, "note": ""}
