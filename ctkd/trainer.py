"""The training run: output directory, teacher preparation, resume, the epoch loop, checkpoints and results."""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctkd.build import Experiment, build_experiment, check_inputs
from ctkd.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    atomic_save,
    capture_rng_state,
    load_run_checkpoint,
    restore_rng_state,
)
from ctkd.config import Config, ConfigError, config_from_dict, config_to_dict, diff_configs, load_config, save_config
from ctkd.distributed import (
    DistributedContext,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    inject_fault_if_requested,
)
from ctkd.engine import evaluate, train_one_epoch
from ctkd.errors import UserError
from ctkd.logging import MetricsLog, get_logger, write_json_atomic
from ctkd.methods import METHODS
from ctkd.provenance import file_sha256, provenance

RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "results.json")


class RunDirectoryError(UserError, RuntimeError):
    """The output directory already holds a run that this command would overwrite."""


class RunInterrupted(Exception):
    """Training was stopped by Ctrl-C; says what was saved so the command-line entry can tell how to continue."""

    def __init__(self, output_dir: str, saved_epoch: int | None) -> None:
        super().__init__(f"interrupted: {output_dir}")
        self.output_dir, self.saved_epoch = output_dir, saved_epoch


@dataclass
class Progress:
    """Training progress that a checkpoint carries besides the module and optimizer states."""

    epoch: int = 0  # last completed epoch
    best_acc1: float = -1.0
    best_acc5: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so model initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_resume(cfg: Config, resume: str | None, ctx: DistributedContext) -> Path | None:
    """The checkpoint to resume from, decided by rank 0 and shared, so every rank resumes from the same file.

    Every rank raises the same error when rank 0's decision is an error.
    """
    decision: Path | UserError | None = None
    if ctx.is_main:
        try:
            decision = _find_resume_checkpoint(cfg, resume)
        except UserError as err:
            decision = err
    decision = broadcast_object(decision)
    if isinstance(decision, UserError):
        raise decision
    return decision


def _find_resume_checkpoint(cfg: Config, resume: str | None) -> Path | None:
    """'auto' → `<output_dir>/last.pth` if present; a given path must exist; without --resume, an output
    directory that already holds a run is refused rather than overwritten."""
    output_dir = Path(cfg.output_dir)
    if resume == "auto":
        last = output_dir / "last.pth"
        return last if last.is_file() else None
    if resume is not None:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file")
        return path
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    if existing:
        raise RunDirectoryError(_occupied_message(cfg, existing))
    return None


def _occupied_message(cfg: Config, existing: list[str]) -> str:
    """Why an occupied output_dir is refused, advising --resume only when the saved run is this experiment."""
    output_dir = Path(cfg.output_dir)
    elsewhere = "start a new run elsewhere with output_dir=runs/<new name>"
    try:
        saved = load_config(output_dir / "config.yaml")
        changed = [line for line in diff_configs(saved, cfg) if not _resumable(line.split(":", 1)[0])]
    except (OSError, UserError):  # no readable config.yaml: nothing tells whether it is the same experiment
        changed = None
    if changed:
        return (
            f"output_dir {output_dir} already holds a run of a different experiment ({', '.join(existing)}; "
            f"its config differs in {', '.join(line.split(':', 1)[0] for line in changed)}). Choose another "
            f"directory: {elsewhere}."
        )
    return (
        f"output_dir {output_dir} already holds a run ({', '.join(existing)}). Continue it with --resume auto, "
        f"or {elsewhere}."
    )


def ensure_teacher_checkpoint(cfg: Config, ctx: DistributedContext) -> None:
    """If the teacher checkpoint is missing and `teacher.train_config` is set, train that teacher first.

    The teacher run is an ordinary run of its own config file (resumed if it was interrupted; the student's
    command-line overrides do not apply to it), so its result is reused by every later student run. Rank 0 decides,
    so all ranks enter the same run.
    """
    if cfg.teacher.checkpoint is None or cfg.teacher.train_config is None:
        return  # no teacher (vanilla), or load_teacher reports a missing file with instructions
    missing = broadcast_object(not Path(cfg.teacher.checkpoint).is_file() if ctx.is_main else None)
    if not missing:
        return
    get_logger().info(
        f"teacher checkpoint {cfg.teacher.checkpoint} not found: training it with {cfg.teacher.train_config}"
    )
    run(load_config(cfg.teacher.train_config), resume="auto")  # check_teacher_source: it writes that file


def checkpoint_state(exp: Experiment, cfg: Config, progress: Progress) -> dict[str, Any]:
    """Everything needed to continue the run, as plain types (loadable with weights_only=True).

    Module states are taken from the unwrapped modules, so a checkpoint written by N processes resumes on M.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": progress.epoch,
        **exp.distiller.state_dict(),  # "trainable" (student, temperature, heads) and "method_state"
        "optimizer": exp.optimizer.state_dict(),
        "lr_schedule": exp.schedule.state_dict(),
        # per-iteration warm-up/cosine position (None for the plain step schedule) and fp16's loss scale (None
        # unless runtime.amp is fp16): a resumed run continues both exactly
        "lr_scheduler": exp.schedule.multiplier.state_dict() if exp.schedule.multiplier is not None else None,
        "grad_scaler": exp.scaler.state_dict() if exp.scaler is not None else None,
        "best_acc1": progress.best_acc1,
        "best_acc5": progress.best_acc5,
        "best_epoch": progress.best_epoch,
        "elapsed_s": progress.elapsed_s,
        "rng": capture_rng_state(),
        "world_size": exp.ctx.world_size,
        "config": config_to_dict(cfg),
    }


# Keys a resumed run may change: where data and outputs live, how long to train, how to log and launch. Any other
# change (model, method, loss, temperature, curriculum, optimizer, batch, seed, data) would silently make the resumed
# run a different experiment from the one its checkpoint, metrics and config.yaml describe.
RESUMABLE_CHANGES = (
    "output_dir", "epochs", "device", "data.root", "data.download", "data.num_workers", "data.test_batch_size",
    "teacher.checkpoint", "teacher.train_config", "logging.", "distributed.",
)


def _resumable(key: str) -> bool:
    """Whether a resumed run may change dotted config `key` (a section name ending in '.' covers its keys)."""
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in RESUMABLE_CHANGES)


def check_resume_config(saved: Config, current: Config, path: Path) -> None:
    """Refuse a resume whose config changes the experiment; log the harmless changes."""
    changes = diff_configs(saved, current)
    refused = [line for line in changes if not _resumable(line.split(":", 1)[0])]
    if current.optimizer.schedule == "cosine":  # the cosine spans all iterations: more epochs would stretch it
        refused += [line for line in changes if line.split(":", 1)[0] == "epochs"]
    if refused:
        raise ConfigError(
            f"--resume {path}: the config differs from the checkpoint's in keys that define the experiment:\n  "
            + "\n  ".join(refused)
            + "\nRevert these changes to continue the run, or start a new run (another output_dir) instead."
        )
    for line in changes:
        get_logger().info(f"resume: {line}")


def restore(exp: Experiment, cfg: Config, path: Path, progress: Progress) -> None:
    """Load a run checkpoint into `exp` and `progress` (after checking that `cfg` continues the same experiment)."""
    state = load_run_checkpoint(path)
    check_resume_config(config_from_dict(state["config"], source=f"{path} (saved config)"), cfg, path)
    exp.distiller.load_state_dict(state)
    exp.optimizer.load_state_dict(state["optimizer"])
    exp.schedule.load_state_dict(state["lr_schedule"])
    for name, part in (("lr_scheduler", exp.schedule.multiplier), ("grad_scaler", exp.scaler)):
        if part is not None:
            if state.get(name) is None:
                raise CheckpointError(f"{path} holds no '{name}' state, which this run needs to continue exactly")
            part.load_state_dict(state[name])
    restore_rng_state(state["rng"])
    for name in vars(progress):
        setattr(progress, name, state[name])


def run(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train (or distil) as `cfg` says, writing everything under `cfg.output_dir`; returns the results summary.

    Under torchrun every process calls this; they join one process group, train one DDP-wrapped trainable module,
    and only rank 0 writes files.
    """
    ctx = init_distributed(cfg.device, cfg.distributed.timeout_s)
    check_inputs(cfg)  # input errors first: they are the user's to fix, whatever the run directory holds
    resume_path = resolve_resume(cfg, resume, ctx)
    ensure_teacher_checkpoint(cfg, ctx)
    progress = Progress()
    try:
        return _train(cfg, ctx, resume_path, progress)
    except KeyboardInterrupt:
        raise RunInterrupted(cfg.output_dir, _saved_epoch(Path(cfg.output_dir) / "last.pth")) from None


def _saved_epoch(path: Path) -> int | None:
    """The epoch stored in checkpoint `path`, or None if there is none (or it was cut short by the interrupt)."""
    try:  # memory-mapped: only the small 'epoch' entry is read, whatever the model's size
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001 - missing, partial or foreign file: nothing to continue from
        return None


def resolve_compile_mode(setting: str, device: torch.device) -> str | None:
    """torch.compile's mode for `runtime.compile`, or None for no compilation (`auto`: `default` on CUDA only)."""
    if setting == "auto":
        return "default" if device.type == "cuda" else None
    return None if setting == "off" else setting


def _train(cfg: Config, ctx: DistributedContext, resume_path: Path | None, progress: Progress) -> dict[str, Any]:
    """Build the experiment and train it, stopping its loader workers however training ends."""
    seed_everything(cfg.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
    exp = build_experiment(cfg, ctx)
    try:
        return _train_experiment(exp, cfg, ctx, resume_path, progress)
    finally:
        exp.close()


def _train_experiment(
    exp: Experiment, cfg: Config, ctx: DistributedContext, resume_path: Path | None, progress: Progress
) -> dict[str, Any]:
    """Restore `exp` if resuming, run the remaining epochs and write the results."""
    if resume_path is not None:
        restore(exp, cfg, resume_path, progress)
        get_logger().info(f"resumed from {resume_path} after epoch {progress.epoch}")
    if ctx.enabled:
        exp.distiller.wrap_ddp([ctx.device.index] if ctx.device.type == "cuda" else None)
    compile_mode = resolve_compile_mode(cfg.runtime.compile, ctx.device)
    if compile_mode is not None:  # after loading the state: compiled modules keep their state_dict keys anyway
        exp.distiller.compile(compile_mode)
    output_dir = Path(cfg.output_dir)
    if ctx.is_main:
        save_config(cfg, output_dir / "config.yaml")
    teacher_metrics = _evaluate_teacher(exp, cfg)
    origin = None
    if ctx.is_main:  # hashed now: the file this run was built from (a resume may point at a moved copy)
        has_file = exp.distiller.teacher is not None and cfg.teacher.checkpoint is not None  # not: pretrained
        teacher_sha256 = file_sha256(cfg.teacher.checkpoint) if has_file else None
        origin = provenance(cfg, varies_freely=_resumable, device=ctx.device, world_size=ctx.world_size,
                            teacher_sha256=teacher_sha256)
    metrics = MetricsLog(output_dir, start_epoch=progress.epoch + 1, tensorboard=cfg.logging.tensorboard,
                         enabled=ctx.is_main)
    try:
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            inject_fault_if_requested(ctx.rank, epoch)
            record = _run_epoch(exp, cfg, epoch, progress, metrics)
            get_logger().info(_epoch_line(record, cfg.epochs))
    finally:
        metrics.close()
    results = broadcast_object(
        {**_results(cfg, progress, metrics.records(), teacher_metrics), **origin} if ctx.is_main else None
    )
    if ctx.is_main:
        write_json_atomic(results, output_dir / "results.json")
    get_logger().info(
        f"done: best top-1 {results['best_acc1']:.2f}% (epoch {results['best_epoch']}), "
        f"last top-1 {results['last_acc1']:.2f}%. Results: {output_dir / 'results.json'}; "
        f"TensorBoard: tensorboard --logdir {output_dir}"
    )
    return results


def _evaluate_teacher(exp: Experiment, cfg: Config) -> dict[str, float] | None:
    """Evaluate the frozen teacher once at start-up, so a wrong checkpoint shows before hours of training."""
    teacher = exp.distiller.teacher
    if teacher is None:
        return None
    metrics = evaluate(teacher, exp.test_loader, exp.device, exp.distiller.runtime)
    get_logger().info(f"teacher {cfg.teacher.name}: top-1 {metrics['acc1']:.2f}%, top-5 {metrics['acc5']:.2f}%")
    return metrics


def _run_epoch(exp: Experiment, cfg: Config, epoch: int, progress: Progress, metrics: MetricsLog) -> dict[str, Any]:
    """Train and evaluate one epoch, log it, then checkpoint.

    The metrics line is written before the checkpoint: a resume drops lines past the checkpoint's epoch.
    """
    start = time.perf_counter()
    lr = exp.schedule.set_epoch(epoch)
    distilling = exp.distiller.teacher is not None
    grl_lambda = exp.curriculum(epoch) if distilling else 0.0
    exp.train_loader.sampler.set_epoch(epoch)
    train_stats, per_sample = train_one_epoch(
        exp.distiller, exp.optimizer, exp.train_loader, grl_lambda=grl_lambda, device=exp.device, epoch=epoch,
        progress=cfg.logging.progress_bar and exp.ctx.is_main and _stderr_is_terminal(),
        lr_schedule=exp.schedule, scaler=exp.scaler, check_every=cfg.logging.interval,
    )
    last = epoch == cfg.epochs
    test_stats: dict[str, float] = {}
    if last or epoch % cfg.logging.eval_every == 0:
        broadcast_buffers(exp.distiller.student)  # all ranks evaluate (and rank 0 saves) the same BN statistics
        test_stats = evaluate(exp.distiller.student, exp.test_loader, exp.device, exp.distiller.runtime)
    epoch_time = time.perf_counter() - start
    record = {"epoch": epoch, "lr": lr, **({"lambda": grl_lambda} if distilling else {}), **train_stats}
    record.update({f"test_{k}": v for k, v in test_stats.items()}, epoch_time=epoch_time)
    record = {key: _round(value) for key, value in record.items()}
    metrics.log_epoch(record, per_sample)
    improved = bool(test_stats) and test_stats["acc1"] > progress.best_acc1
    progress.epoch = epoch
    progress.elapsed_s += epoch_time
    if improved:
        progress.best_acc1, progress.best_acc5, progress.best_epoch = test_stats["acc1"], test_stats["acc5"], epoch
    if exp.ctx.is_main and (improved or last or epoch % cfg.logging.checkpoint_every == 0):
        state = checkpoint_state(exp, cfg, progress)
        if last or epoch % cfg.logging.checkpoint_every == 0:
            atomic_save(state, Path(cfg.output_dir) / "last.pth")
        if improved:
            atomic_save(state, Path(cfg.output_dir) / "best.pth")
    return record


def _stderr_is_terminal() -> bool:
    """tqdm bars only on an interactive terminal (logs in files stay clean)."""
    return sys.stderr.isatty()


def _round(value: Any) -> Any:
    """Floats to 12 significant digits: the schedule's 0.24999999999999978 is logged as 0.25, accuracies unchanged."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One console line per epoch; τ is the last batch's (what results.json's final_tau and the paper report)."""
    ctkd = f" λ {record['lambda']:.4f}" if "lambda" in record else ""
    if "tau_last" in record:
        ctkd += f" τ {record['tau_last']:.3f} (epoch mean {record['tau_mean']:.3f})"
    test = (f"test top-1 {record['test_acc1']:.2f}% top-5 {record['test_acc5']:.2f}%" if "test_acc1" in record
            else "not evaluated (logging.eval_every)")
    return (
        f"epoch {record['epoch']}/{epochs} lr {record['lr']:.4g}{ctkd} loss {record['train_loss']:.4f} "
        f"train top-1 {record['train_acc1']:.2f}% | {test} ({record['epoch_time']:.1f}s)"
    )


def _results(
    cfg: Config, progress: Progress, records: list[dict[str, Any]], teacher: dict[str, float] | None
) -> dict[str, Any]:
    """The final summary written to results.json."""
    last = records[-1] if records else {}
    return {
        "output_dir": cfg.output_dir,
        "method": cfg.method.name,
        "student": cfg.student.name,
        "teacher": cfg.teacher.name,
        "temperature": cfg.temperature.name if METHODS.get(cfg.method.name).uses_teacher else None,
        "epochs": progress.epoch,
        "best_acc1": progress.best_acc1,
        "best_acc5": progress.best_acc5,
        "best_epoch": progress.best_epoch,
        "last_acc1": last.get("test_acc1"),
        "last_acc5": last.get("test_acc5"),
        "final_tau": last.get("tau_last"),
        "teacher_acc1": teacher["acc1"] if teacher else None,
        "teacher_acc5": teacher["acc5"] if teacher else None,
        "wall_time_s": progress.elapsed_s,
    }
