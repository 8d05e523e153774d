"""The training run: output directory, teacher preparation, resume, the epoch loop, checkpoints and results."""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctkd.build import Experiment, build_experiment, check_inputs
from ctkd.cache import cache_key, read_cached, write_cached
from ctkd.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    CheckpointSeries,
    Position,
    capture_rng_state,
    check_run_checkpoint,
    load_run_checkpoint,
    newest_intact_checkpoint,
    restore_rng_state,
    series,
    state_position,
)
from ctkd.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    diff_configs,
    is_placement_key,
    load_config,
    save_config,
)
from ctkd.distributed import (
    DistributedContext,
    barrier,
    broadcast_buffers,
    broadcast_object,
    claim_run_directory,
    decide_on_main,
    init_distributed,
    seed_rank,
    wait_for_run_directory,
)
from ctkd.engine import NonFiniteLossError, evaluate, gather_objects, local_epoch_state, train_one_epoch
from ctkd.errors import UserError
from ctkd.fileio import atomic_copy, atomic_link, atomic_write_text, supports_hard_links
from ctkd.logging import MetricsLog, get_logger, write_json_atomic
from ctkd.methods import METHODS
from ctkd.optim import load_optimizer_state
from ctkd.preemption import REPEAT_AFTER_S, STOP, StopRequested, stop_agreed
from ctkd.provenance import file_sha256, provenance
from ctkd.runs import FAILED_FILE, RunLock, check_free_space

RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "results.json")


class RunDirectoryError(UserError, RuntimeError):
    """The output directory already holds a run that this command would overwrite."""


class RunInterrupted(Exception):
    """Training was stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C); says what was saved so the command-line entry can
    tell how to continue: after `saved_steps` steps of epoch `saved_epoch` (None: the epoch's end)."""

    def __init__(self, output_dir: str, saved_epoch: int | None, saved_steps: int | None = None,
                 signal_name: str = "") -> None:
        super().__init__(f"interrupted: {output_dir}")
        self.output_dir, self.saved_epoch, self.saved_steps = output_dir, saved_epoch, saved_steps
        self.signal_name = signal_name


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


CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")  # the settings under which cuBLAS is deterministic


def set_cublas_workspace() -> None:
    """CUBLAS_WORKSPACE_CONFIG for deterministic cuBLAS (runtime.deterministic), unless already set to a valid one."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_WORKSPACE_CONFIGS:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIGS[0]


def set_determinism(cfg: Config, device: torch.device) -> None:
    """runtime.deterministic: deterministic algorithms everywhere (torch raises on an op that has none), and
    deterministic cuDNN without its benchmark; otherwise cuDNN's benchmark as runtime.cudnn_benchmark says."""
    deterministic = cfg.runtime.deterministic
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark and not deterministic


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
    """'auto' → the newest intact checkpoint of `<output_dir>` (damaged ones are set aside with a warning; none:
    a fresh start); a given path must be an intact run checkpoint (else an error naming it and why); without
    --resume, an output directory that already holds a run is refused rather than overwritten."""
    output_dir = Path(cfg.output_dir)
    if resume == "auto":
        had_checkpoints = bool(series(output_dir)) or (output_dir / "last.pth").is_file()
        found = newest_intact_checkpoint(output_dir, get_logger().warning)
        if found is None and had_checkpoints:
            get_logger().warning(f"no intact checkpoint left in {output_dir}: starting from scratch")
        return found
    if resume is not None:
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such checkpoint file")
        try:
            check_run_checkpoint(path)
        except CheckpointError as err:
            raise CheckpointError(f"--resume {path} refused: {err}") from None
        return path
    existing = [name for name in RUN_FILES if (output_dir / name).exists()]
    existing += [path.name for _, path in series(output_dir)]
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
    so all ranks enter the same run. Student runs started together that need the same teacher train it once: the
    first takes the teacher run's directory lock, the others wait for it and then use the file it wrote.
    """
    if cfg.teacher.checkpoint is None or cfg.teacher.train_config is None:
        return  # no teacher (vanilla), or load_teacher reports a missing file with instructions
    missing = broadcast_object(not Path(cfg.teacher.checkpoint).is_file() if ctx.is_main else None)
    if not missing:
        return
    teacher_cfg = load_config(cfg.teacher.train_config)  # check_teacher_source: it writes that file
    lock = wait_for_run_directory(teacher_cfg.output_dir, ctx, f"teacher checkpoint {cfg.teacher.checkpoint}")
    try:
        if not broadcast_object(not Path(cfg.teacher.checkpoint).is_file() if ctx.is_main else None):
            get_logger().info(f"teacher checkpoint {cfg.teacher.checkpoint} was written by the run that held it: "
                              "using it")
            return
        get_logger().info(
            f"teacher checkpoint {cfg.teacher.checkpoint} not found: training it with {cfg.teacher.train_config}"
        )
        run(teacher_cfg, resume="auto", run_lock=lock)
    finally:
        if lock is not None:
            lock.release()


def checkpoint_state(
    exp: Experiment, cfg: Config, progress: Progress, teacher_sha256: str | None = None,
    epoch_state: dict[str, Any] | None = None, rng: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue the run, as plain types (loadable with weights_only=True).

    Module states are taken from the unwrapped modules, so a checkpoint written by N processes resumes on M.
    `epoch_state` (a checkpoint inside an epoch): the epoch, its steps done, its LR and time so far, and every
    rank's running sums and flags (`ranks`); None at epoch ends. `rng`: every rank's RNG states (default: this
    process's); rank 0's are stored as "rng", the others' as "rng_ranks".
    """
    rng = rng if rng is not None else [capture_rng_state()]
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
        "rng": rng[0],
        "rng_ranks": rng[1:],  # ranks 1, 2, ... (each draws its own dropout masks)
        "world_size": exp.ctx.world_size,
        "config": config_to_dict(cfg),
        "teacher_sha256": teacher_sha256,  # of the teacher file: a resume with another file is refused
        "epoch_state": epoch_state,
    }


# Keys a resumed run may change: where data and outputs live, how to log and launch (ctkd.config.PLACEMENT_KEYS), and
# how long to train. Any other change (model, method, loss, temperature, curriculum, optimizer, batch, seed, data)
# would silently make the resumed run a different experiment from the one its checkpoint, metrics and config.yaml
# describe.
def _resumable(key: str) -> bool:
    """Whether a resumed run may change dotted config `key`."""
    return key == "epochs" or is_placement_key(key)


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


def restore(
    exp: Experiment, cfg: Config, path: Path, progress: Progress, teacher_sha256: str | None = None
) -> tuple[Position, dict[str, Any] | None]:
    """Load a run checkpoint into `exp` and `progress` (after checking that `cfg` continues the same experiment
    with the same teacher file); returns its position and, for one taken inside an epoch, its epoch_state."""
    state = load_run_checkpoint(path)
    check_resume_config(config_from_dict(state["config"], source=f"{path} (saved config)"), cfg, path)
    saved_teacher = state.get("teacher_sha256")
    if saved_teacher is not None and teacher_sha256 is not None and saved_teacher != teacher_sha256:
        raise CheckpointError(
            f"--resume {path}: the teacher file {cfg.teacher.checkpoint} (SHA-256 {teacher_sha256[:16]}…) is not "
            f"the one this run was trained with (SHA-256 {saved_teacher[:16]}…). Point teacher.checkpoint at that "
            "file (moved or copied, the same content is fine), or start a new run with this teacher elsewhere."
        )
    exp.distiller.load_state_dict(state)
    load_optimizer_state(exp.optimizer, state["optimizer"])
    exp.schedule.load_state_dict(state["lr_schedule"])
    for name, part in (("lr_scheduler", exp.schedule.multiplier), ("grad_scaler", exp.scaler)):
        if part is not None:
            if state.get(name) is None:
                raise CheckpointError(f"{path} holds no '{name}' state, which this run needs to continue exactly")
            part.load_state_dict(state[name])
    rank, others = exp.ctx.rank, state.get("rng_ranks") or []
    if rank == 0 or rank <= len(others):  # a rank the checkpoint did not have keeps the stream seeded for it
        restore_rng_state(state["rng"] if rank == 0 else others[rank - 1])
    for name in vars(progress):
        setattr(progress, name, state[name])
    return state_position(state, len(exp.train_loader)), state["epoch_state"]


def run(cfg: Config, resume: str | None = None, *, run_lock: RunLock | None = None) -> dict[str, Any]:
    """Train (or distil) as `cfg` says, writing everything under `cfg.output_dir`; returns the results summary.

    Under torchrun every process calls this; they join one process group, train one DDP-wrapped trainable module,
    and only rank 0 writes files. Rank 0 holds the output directory's lock for the whole run (`run_lock` when the
    caller already holds it), so a second run started into the same directory fails at once.
    """
    if cfg.runtime.deterministic:  # cuBLAS reads it when CUDA starts: set before anything touches the device
        set_cublas_workspace()
    ctx = init_distributed(cfg.device, cfg.distributed.timeout_s)
    check_inputs(cfg)  # input errors first: they are the user's to fix, whatever the run directory holds
    lock = claim_run_directory(cfg.output_dir, ctx, held=run_lock)  # before deciding anything about its contents
    STOP.on_first = lambda name: get_logger().warning(
        f"{name} received: stopping after a step, with a checkpoint (send it again, more than "
        f"{REPEAT_AFTER_S:.0f} s later, to stop at once)")
    installed = STOP.install()
    try:
        resume_path = resolve_resume(cfg, resume, ctx)
        ensure_teacher_checkpoint(cfg, ctx)
        progress = Progress()
        try:
            return _train(cfg, ctx, resume_path, progress)
        except StopRequested as stop:
            raise RunInterrupted(cfg.output_dir, stop.epoch, stop.steps, stop.signal_name) from None
        except KeyboardInterrupt:
            raise RunInterrupted(cfg.output_dir, _saved_epoch(Path(cfg.output_dir) / "last.pth")) from None
    except UserError:
        # an error in the input (a teacher file that is no checkpoint, a dataset, a --resume file) found before
        # the run wrote anything: the directory and lock claimed for it go again
        if lock is not None and lock is not run_lock and not (Path(cfg.output_dir) / "config.yaml").exists():
            lock.discard()
        raise
    finally:
        if installed:
            STOP.restore()
        if lock is not None and lock is not run_lock:
            lock.release()


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
    set_determinism(cfg, ctx.device)
    exp = build_experiment(cfg, ctx)
    seed_rank(cfg.seed, ctx)  # networks are initialised alike on every rank; dropout masks then differ per rank
    try:
        links = ctx.is_main and supports_hard_links(cfg.output_dir)
        files = CheckpointSeries.peak_files(cfg.checkpoint.keep_last, resumed=resume_path is not None, links=links)
        decide_on_main(ctx, lambda: check_free_space(cfg.output_dir, checkpoint_bytes(exp), files))
        return _train_experiment(exp, cfg, ctx, resume_path, progress)
    finally:
        exp.close()


def checkpoint_bytes(exp: Experiment) -> int:
    """Estimated size of a checkpoint: the trainable module's and the method's state plus SGD's momentum buffers."""
    state = exp.distiller.state_dict()
    tensors = [*state["trainable"].values(), *state["method_state"].values()]
    momentum = [p for p in exp.distiller.unwrapped.parameters() if p.requires_grad]
    return sum(t.numel() * t.element_size() for t in [*tensors, *momentum] if isinstance(t, torch.Tensor))


def _train_experiment(
    exp: Experiment, cfg: Config, ctx: DistributedContext, resume_path: Path | None, progress: Progress
) -> dict[str, Any]:
    """Restore `exp` if resuming, run the remaining epochs and write the results."""
    teacher_sha256 = _teacher_sha256(exp, cfg, ctx)
    position, inside = None, None
    if resume_path is not None:
        position, inside = restore(exp, cfg, resume_path, progress, teacher_sha256)
        where = (f"after epoch {progress.epoch}" if inside is None
                 else f"inside epoch {position.epoch}, after step {position.step} of {len(exp.train_loader)}")
        get_logger().info(f"resumed from {resume_path} {where}")
    if ctx.enabled:
        exp.distiller.wrap_ddp([ctx.device.index] if ctx.device.type == "cuda" else None)
    compile_mode = resolve_compile_mode(cfg.runtime.compile, ctx.device)
    if compile_mode is not None:  # after loading the state: compiled modules keep their state_dict keys anyway
        if cfg.runtime.compile == "auto":  # the default must never break a run: a graph that fails runs eagerly
            torch._dynamo.config.suppress_errors = True
        exp.distiller.compile(compile_mode)
    output_dir = Path(cfg.output_dir)
    checkpoints = _Checkpoints(None, teacher_sha256)
    if ctx.is_main:
        (output_dir / FAILED_FILE).unlink(missing_ok=True)  # a failure of an earlier attempt is over
        save_config(cfg, output_dir / "config.yaml")
        checkpoints.writer = CheckpointSeries(output_dir, cfg.checkpoint.keep_last, get_logger().warning,
                                              protected=position)
        if resume_path is not None and position is not None:
            _continue_series(checkpoints.writer, resume_path, position, output_dir)
    teacher_metrics = _evaluate_teacher(exp, cfg, teacher_sha256)
    get_logger().info(startup_block(exp, cfg, teacher_metrics, teacher_sha256, resume_path))
    origin = None
    if ctx.is_main:  # hashed at start-up: the file this run was built from (a resume may point at a moved copy)
        origin = provenance(cfg, varies_freely=_resumable, device=ctx.device, world_size=ctx.world_size,
                            teacher_sha256=teacher_sha256)
    metrics = MetricsLog(output_dir, start_epoch=progress.epoch + 1, tensorboard=cfg.logging.tensorboard,
                         enabled=ctx.is_main)
    try:
        first = progress.epoch + 1
        for epoch in range(first, cfg.epochs + 1):
            record, stopping = _run_epoch(exp, cfg, epoch, progress, metrics, checkpoints,
                                          inside if epoch == first else None)
            get_logger().info(_epoch_line(record, cfg.epochs))
            if stopping:  # a signal during the epoch's last step or its end: saved there
                raise StopRequested(epoch, len(exp.train_loader), STOP.name or "a stop signal on another rank")
    except NonFiniteLossError as err:
        error = NonFiniteLossError(f"{err}; {_newest_checkpoint_note(output_dir)}")
        _record_failure(output_dir, error, ctx)
        raise error from None
    except (StopRequested, KeyboardInterrupt):
        raise
    except Exception as err:
        _record_failure(output_dir, err, ctx)
        raise
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


def _record_failure(output_dir: Path, error: BaseException, ctx: DistributedContext) -> None:
    """Leave a FAILED marker with the error (rank 0): the run's status then says why it stopped (ctkd.runs)."""
    if ctx.is_main:
        reason = " ".join(f"{type(error).__name__}: {error}".split()) if not isinstance(error, UserError) else (
            " ".join(str(error).split()))
        atomic_write_text(output_dir / FAILED_FILE, f"1\n{reason}\n")


def startup_block(exp: Experiment, cfg: Config, teacher: dict[str, Any] | None, teacher_sha256: str | None,
                  resume_path: Path | None) -> str:
    """What the run is about to do, in one block: data, teacher, student, processes and batch, output."""
    train, test = exp.train_loader.dataset.dataset, exp.test_loader.dataset.dataset
    where = "generated" if cfg.data.name == "synthetic" else f"from {Path(cfg.data.root).resolve()}"
    lines = [f"{cfg.method.name} run of {cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}:",
             f"  data      {cfg.data.name} ({where}): {train.num_classes} classes, {len(train)} training and "
             f"{len(test)} test images"]
    if teacher is not None:
        source = (f"{cfg.teacher.checkpoint} (SHA-256 {teacher_sha256[:12]}…)" if cfg.teacher.checkpoint
                  and teacher_sha256 else "the library's pretrained weights")
        lines.append(f"  teacher   {cfg.teacher.name} from {source}: test top-1 {teacher['acc1']:.2f}%, top-5 "
                     f"{teacher['acc5']:.2f}%{teacher.get('note', '')}")
        lines.append(f"  τ         {cfg.temperature.name}" + (f", λ curriculum {cfg.curriculum.name}"
                                                              if cfg.temperature.learnable else ""))
    start = (f"weights from {cfg.student.weights}" if cfg.student.weights else
             "the library's pretrained weights" if cfg.student.pretrained else "a random initialisation")
    lines.append(f"  student   {cfg.student.name} from {start}")
    world = exp.ctx.world_size
    per_rank = f" ({cfg.data.batch_size // world} per process)" if world > 1 else ""
    lines.append(f"  processes {world} on {exp.device.type}, global batch {cfg.data.batch_size}{per_rank}, "
                 f"{len(exp.train_loader)} steps per epoch")
    state = f"continuing from {resume_path}" if resume_path is not None else "a new run"
    lines.append(f"  output    {cfg.output_dir} ({state})")
    return "\n".join(lines)


def _newest_checkpoint_note(output_dir: Path) -> str:
    """Where the run can be taken up after a non-finite step: its newest checkpoint (all finite), or none yet."""
    saved = series(output_dir)
    if not saved:
        return "no checkpoint had been written yet"
    position, path = saved[-1]
    return f"the newest checkpoint, {path} ({position}), holds the last finite state"


@dataclass
class _Checkpoints:
    """What the epochs need to checkpoint: rank 0's writer of the run directory's series (None on other ranks)
    and the teacher file's SHA-256 that each checkpoint records."""

    writer: CheckpointSeries | None
    teacher_sha256: str | None


def _teacher_sha256(exp: Experiment, cfg: Config, ctx: DistributedContext) -> str | None:
    """SHA-256 of the teacher file the run is built from (None without one, e.g. teacher.pretrained), hashed by
    rank 0 and shared, so every rank checks a resume against it alike."""
    has_file = exp.distiller.teacher is not None and cfg.teacher.checkpoint is not None
    return broadcast_object(file_sha256(cfg.teacher.checkpoint) if ctx.is_main and has_file else None)


def _continue_series(writer: CheckpointSeries, resume_path: Path, position: Position, output_dir: Path) -> None:
    """Make the series continue from the checkpoint resumed from: newer series checkpoints (of a run resumed from an
    older one) are set aside, and a resumed file of the run directory that is not in the series (last.pth of an
    earlier version, best.pth) is copied into it, so later saves neither replace nor prune it."""
    writer.set_aside_after(position)
    target = output_dir / position.name
    if resume_path.resolve().parent == output_dir.resolve() and not target.exists():
        if not atomic_link(resume_path, target):
            atomic_copy(resume_path, target)


def _checkpoint_steps(cfg: Config, epoch: int, steps: int, start: int, epoch_end: bool) -> frozenset[int]:
    """Steps of `epoch` (counted from 1) after which a checkpoint is taken inside it: every `checkpoint.every_steps`
    training steps of the run, except after the epoch's last step when the epoch-end checkpoint follows."""
    every = cfg.checkpoint.every_steps
    if every == 0:
        return frozenset()
    before = (epoch - 1) * steps
    return frozenset(s for s in range(start + 1, steps + 1)
                     if (before + s) % every == 0 and not (s == steps and epoch_end))


TEACHER_EVAL = "teacher-eval"  # the cache kind of teachers' test accuracies (ctkd.cache)


def _teacher_eval_inputs(exp: Experiment, cfg: Config, teacher_sha256: str) -> dict[str, Any]:
    """What a teacher's test accuracy is a function of: its file, how it is built and run, and the test split."""
    data = {key: value for key, value in config_to_dict(cfg)["data"].items()
            if key not in ("download", "num_workers", "test_batch_size", "batch_size")}
    test = exp.test_loader.dataset.dataset  # the source of the loader's batches
    targets = getattr(test, "targets", None)
    return {
        "teacher_sha256": teacher_sha256, "teacher": cfg.teacher.name, "kwargs": cfg.teacher.kwargs,
        "data": data, "root": str(Path(cfg.data.root).resolve()), "test_size": len(test),
        "targets_sha256": None if targets is None else hashlib.sha256(targets.cpu().numpy().tobytes()).hexdigest(),
        "runtime": {"amp": cfg.runtime.amp, "channels_last": exp.distiller.runtime.channels_last,
                    "fold_teacher_bn": cfg.runtime.fold_teacher_bn}, "device": exp.device.type,
        "torch": torch.__version__,
    }


def _evaluate_teacher(exp: Experiment, cfg: Config, teacher_sha256: str | None) -> dict[str, float] | None:
    """The frozen teacher's test accuracy, shown at start-up so a wrong checkpoint shows before hours of training.

    Evaluated once per teacher file and test split (ctkd.cache): the runs of a table that share a teacher read the
    number the first one computed. Rank 0 decides; every rank then evaluates, or none does.
    """
    teacher = exp.distiller.teacher
    if teacher is None:
        return None
    inputs = _teacher_eval_inputs(exp, cfg, teacher_sha256) if teacher_sha256 is not None else None
    key = cache_key(TEACHER_EVAL, inputs) if inputs is not None else None
    metrics = broadcast_object(read_cached(TEACHER_EVAL, key) if key is not None and exp.ctx.is_main else None)
    if metrics is not None:
        note = " (evaluated before, with this teacher file and test split)"
    else:
        metrics, note = evaluate(teacher, exp.test_loader, exp.device, exp.distiller.runtime), ""
        if key is not None and exp.ctx.is_main:
            write_cached(TEACHER_EVAL, key, metrics, inputs)
    metrics = {**metrics, "note": note}
    return metrics


def _run_epoch(
    exp: Experiment, cfg: Config, epoch: int, progress: Progress, metrics: MetricsLog, checkpoints: _Checkpoints,
    inside: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train and evaluate one epoch, log it, then checkpoint (and inside it every `checkpoint.every_steps` steps);
    returns its metrics record and whether the run stops here.

    `inside`: the epoch_state of a checkpoint taken inside this epoch, which it continues from. The metrics line is
    written before the epoch-end checkpoint: a resume drops lines past the checkpoint's epoch. A stop request that
    arrives during the epoch's last step or its evaluation (every rank agrees here) is answered with an epoch-end
    checkpoint, whether or not the epoch is one of `logging.checkpoint_every`.
    """
    start = time.perf_counter()
    lr = exp.schedule.set_epoch(epoch)  # the LRs of this epoch (and of the restored per-iteration position)
    start_step, elapsed, resume = 0, 0.0, None
    if inside is not None:
        start_step, lr, elapsed = int(inside["step"]), inside["lr"], float(inside["elapsed_s"])
        resume = local_epoch_state(inside["ranks"], exp.device)
    distilling = exp.distiller.teacher is not None
    grl_lambda = exp.curriculum(epoch) if distilling else 0.0
    last = epoch == cfg.epochs
    epoch_end = last or epoch % cfg.logging.checkpoint_every == 0
    steps = len(exp.train_loader)

    def checkpoint_inside(done: int, local: dict[str, Any]) -> None:  # every rank, after `done` steps of the epoch
        _bad_image_record(exp)  # no checkpoint of a run past its budget of unreadable images
        parts = gather_objects({"rng": capture_rng_state(), "epoch_state": local})
        if checkpoints.writer is not None:
            state = {"epoch": epoch, "step": done, "lr": lr, "elapsed_s": elapsed + time.perf_counter() - start,
                     "ranks": [part["epoch_state"] for part in parts]}
            checkpoints.writer.save(
                checkpoint_state(exp, cfg, progress, checkpoints.teacher_sha256, state, [p["rng"] for p in parts]),
                Position(epoch, done),
            )

    exp.train_loader.sampler.set_epoch(epoch, start_batch=start_step)
    train_stats, per_sample = train_one_epoch(
        exp.distiller, exp.optimizer, exp.train_loader, grl_lambda=grl_lambda, device=exp.device, epoch=epoch,
        progress=cfg.logging.progress_bar and exp.ctx.is_main and _stderr_is_terminal(),
        lr_schedule=exp.schedule, scaler=exp.scaler, check_every=cfg.logging.interval,
        start_step=start_step, resume=resume, checkpoint=checkpoint_inside,
        checkpoint_after=_checkpoint_steps(cfg, epoch, steps, start_step, epoch_end),
        # not after the last step: the epoch then ends (evaluation, epoch-end checkpoint) and the run stops after it
        stop_check=lambda done: done < steps and stop_agreed(done, cfg.logging.interval, exp.device),
    )
    test_stats: dict[str, float] = {}
    if last or epoch % cfg.logging.eval_every == 0:
        broadcast_buffers(exp.distiller.student)  # all ranks evaluate (and rank 0 saves) the same BN statistics
        test_stats = evaluate(exp.distiller.student, exp.test_loader, exp.device, exp.distiller.runtime)
    epoch_time = elapsed + time.perf_counter() - start
    record = {"epoch": epoch, "lr": lr, **({"lambda": grl_lambda} if distilling else {}), **train_stats,
              **_bad_images(exp, epoch)}
    record.update({f"test_{k}": v for k, v in test_stats.items()}, epoch_time=epoch_time)
    record = {key: _round(value) for key, value in record.items()}
    metrics.log_epoch(record, per_sample)
    improved = bool(test_stats) and test_stats["acc1"] > progress.best_acc1
    progress.epoch = epoch
    progress.elapsed_s += epoch_time
    if improved:
        progress.best_acc1, progress.best_acc5, progress.best_epoch = test_stats["acc1"], test_stats["acc5"], epoch
    stopping = not last and stop_agreed(1, 1, exp.device)  # the same decision on every rank
    if improved or epoch_end or stopping:  # every rank (all three agree): each rank's RNG states go into it
        rng = gather_objects(capture_rng_state())
        if checkpoints.writer is not None:
            state = checkpoint_state(exp, cfg, progress, checkpoints.teacher_sha256, rng=rng)
            with STOP.deferred():  # a stop checkpoint is finished whatever signal comes next
                if epoch_end or stopping:
                    checkpoints.writer.save(state, Position(epoch, steps), best=improved)
                else:
                    checkpoints.writer.save_best(state)
    if stopping:
        barrier()  # no rank leaves (and makes torchrun stop the others) before rank 0 has written it
    return record, stopping


def _bad_images(exp: Experiment, epoch: int) -> dict[str, int]:
    """`bad_images`: the unreadable training images replaced in `epoch`, over all ranks, for a dataset with a
    budget for them (data.max_bad_images > 0); else nothing. One collective per epoch, on every rank: the files met
    by all ranks together must stay within the budget (each rank alone stops at once past it)."""
    merged = _bad_image_record(exp)
    if merged is None:
        return {}
    return {"bad_images": sum(1 for last in merged.values() if last == epoch + 1)}


def _bad_image_record(exp: Experiment) -> dict[int, int] | None:
    """The unreadable training files met by every rank (index → 1 + last epoch), after checking them against
    data.max_bad_images (a collective: every rank calls it); None for a dataset without that budget."""
    source = getattr(exp.train_loader.dataset, "dataset", None)
    if not getattr(source, "max_bad_images", 0):
        return None
    merged: dict[int, int] = {}
    for record in gather_objects(source.bad_record()):
        for index, last in record.items():
            merged[index] = max(last, merged.get(index, 0))
    source.check_budget(merged)
    return merged


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
