"""What a run tells its user: the start-up block, one line per epoch, results.json and the FAILED marker."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctkd.config import Config
from ctkd.distributed import DistributedContext
from ctkd.errors import UserError
from ctkd.fileio import atomic_write_text
from ctkd.methods import METHODS
from ctkd.resume import Progress
from ctkd.runs import FAILED_FILE
from ctkd.series import series

if TYPE_CHECKING:
    from ctkd.build import Experiment


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


def epoch_line(record: dict[str, Any], epochs: int) -> str:
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


def round_float(value: Any) -> Any:
    """Floats to 12 significant digits: the schedule's 0.24999999999999978 is logged as 0.25, accuracies unchanged."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def results_summary(
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


def newest_checkpoint_note(output_dir: Path) -> str:
    """Where the run can be taken up after a non-finite step: its newest checkpoint (all finite), or none yet."""
    saved = series(output_dir)
    if not saved:
        return "no checkpoint had been written yet"
    position, path = saved[-1]
    return f"the newest checkpoint, {path} ({position}), holds the last finite state"


def record_failure(output_dir: Path, error: BaseException, ctx: DistributedContext) -> None:
    """Leave a FAILED marker with the error (rank 0): the run's status then says why it stopped (ctkd.runs)."""
    if ctx.is_main:
        reason = " ".join(f"{type(error).__name__}: {error}".split()) if not isinstance(error, UserError) else (
            " ".join(str(error).split()))
        atomic_write_text(output_dir / FAILED_FILE, f"1\n{reason}\n")
