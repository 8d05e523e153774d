"""Continuing a run: which checkpoint to resume from, what a checkpoint holds, and restoring it exactly."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ctkd.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    capture_rng_state,
    load_run_checkpoint,
    restore_rng_state,
)
from ctkd.config import Config, ConfigError, config_from_dict, config_to_dict, diff_configs, load_config
from ctkd.distributed import DistributedContext, decide_on_main
from ctkd.errors import UserError
from ctkd.fileio import atomic_copy, atomic_link
from ctkd.integrity import CheckpointError
from ctkd.keys import is_placement_key
from ctkd.logging import get_logger
from ctkd.optim import load_optimizer_state
from ctkd.series import (
    CheckpointSeries,
    Position,
    check_run_checkpoint,
    newest_intact_checkpoint,
    series,
    state_position,
)

if TYPE_CHECKING:
    from ctkd.build import Experiment
    from ctkd.stages import StagePlan

RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "results.json")


class RunDirectoryError(UserError, RuntimeError):
    """The output directory already holds a run that this command would overwrite."""


@dataclass
class Progress:
    """Training progress that a checkpoint carries besides the module and optimizer states."""

    epoch: int = 0  # last completed epoch
    best_acc1: float = -1.0
    best_acc5: float = -1.0
    best_epoch: int = 0
    elapsed_s: float = 0.0

    def finish_epoch(self, epoch: int, seconds: float, test: dict[str, float]) -> bool:
        """Count `epoch` as done; returns whether its test accuracy (if evaluated) is the best so far."""
        improved = bool(test) and test["acc1"] > self.best_acc1
        self.epoch, self.elapsed_s = epoch, self.elapsed_s + seconds
        if improved:
            self.best_acc1, self.best_acc5, self.best_epoch = test["acc1"], test["acc5"], epoch
        return improved


def resumable(key: str) -> bool:
    """Whether a resumed run may change dotted config `key`: where data and outputs live and how to log and launch
    (ctkd.keys.PLACEMENT_KEYS), and how long to train; any other change would make the resumed run another
    experiment than its checkpoint, metrics and config.yaml describe."""
    return key == "epochs" or is_placement_key(key)


def resolve_resume(cfg: Config, resume: str | None, ctx: DistributedContext) -> Path | None:
    """The checkpoint to resume from, decided by rank 0 and shared, so every rank resumes from the same file (and
    every rank raises rank 0's error)."""
    return decide_on_main(ctx, lambda: _find_resume_checkpoint(cfg, resume), share=True)


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
        changed = [line for line in diff_configs(saved, cfg) if not resumable(line.split(":", 1)[0])]
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


def checkpoint_state(
    exp: Experiment, cfg: Config, progress: Progress, teacher_sha256: str | None = None,
    epoch_state: dict[str, Any] | None = None, rng: list[dict[str, Any]] | None = None,
    stages: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to continue the run, as plain types (loadable with weights_only=True).

    Module states come from the unwrapped modules, so a checkpoint written by N processes resumes on M.
    `epoch_state` (a checkpoint inside an epoch): the epoch, its steps done, its LR and time so far, and every
    rank's running sums and flags (`ranks`); None at epoch ends. `rng`: every rank's RNG states (default: this
    process's); rank 0's are stored as "rng", the others' as "rng_ranks". `stages`: the initialisation stages'
    progress (ctkd.stages.StagePlan.state_dict; None for a method without stages).
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
        "stages": stages,  # stage epochs done (of "total") and the running stage's optimizer and scaler states
    }


def check_resume_config(saved: Config, current: Config, path: Path) -> None:
    """Refuse a resume whose config changes the experiment; log the harmless changes."""
    changes = diff_configs(saved, current)
    refused = [line for line in changes if not resumable(line.split(":", 1)[0])]
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


def _check_teacher_file(state: dict[str, Any], cfg: Config, path: Path, teacher_sha256: str | None) -> None:
    """Refuse a resume with another teacher file than the checkpoint was trained with."""
    saved = state.get("teacher_sha256")
    if saved is not None and teacher_sha256 is not None and saved != teacher_sha256:
        raise CheckpointError(
            f"--resume {path}: the teacher file {cfg.teacher.checkpoint} (SHA-256 {teacher_sha256[:16]}…) is not "
            f"the one this run was trained with (SHA-256 {saved[:16]}…). Point teacher.checkpoint at that "
            "file (moved or copied, the same content is fine), or start a new run with this teacher elsewhere."
        )


def restore(
    exp: Experiment, cfg: Config, path: Path, progress: Progress, teacher_sha256: str | None = None,
    plan: StagePlan | None = None,
) -> tuple[Position, dict[str, Any] | None]:
    """Load a run checkpoint into `exp`, `progress` and the stage `plan` (after checking that `cfg` continues the
    same experiment with the same teacher file); returns its position and, for one taken inside an epoch (or a
    stage epoch), its epoch_state."""
    state = load_run_checkpoint(path)
    check_resume_config(config_from_dict(state["config"], source=f"{path} (saved config)"), cfg, path)
    _check_teacher_file(state, cfg, path, teacher_sha256)
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
    if plan is not None:
        _restore_stages(state, plan, path)
    return state_position(state, len(exp.train_loader)), state["epoch_state"]


def _restore_stages(state: dict[str, Any], plan: StagePlan, path: Path) -> None:
    """How far the stages got, and the running stage's optimizer state (loaded when that stage continues)."""
    if not plan.stages:
        return
    saved = state.get("stages")
    if saved is None or int(saved["total"]) != plan.total:
        raise CheckpointError(f"{path} holds no progress of the {plan.total} stage epochs this run trains first "
                              "('stages'), which it needs to continue exactly")
    plan.done, plan.saved = int(saved["done"]), saved


def continue_series(writer: CheckpointSeries, resume_path: Path, position: Position, output_dir: Path) -> None:
    """Make the series continue from the checkpoint resumed from: newer series checkpoints (of a run resumed from an
    older one) are set aside, and a resumed file of the run directory that is not in the series (last.pth of an
    earlier version, best.pth) is linked or copied into it, so later saves neither replace nor prune it."""
    writer.set_aside_after(position)
    target = output_dir / position.name
    if resume_path.resolve().parent == output_dir.resolve() and not target.exists():
        if not atomic_link(resume_path, target):
            atomic_copy(resume_path, target)


def saved_epoch(path: Path) -> int | None:
    """The epoch stored in checkpoint `path`, or None if there is none (or it was cut short by the interrupt)."""
    try:  # memory-mapped: only the small 'epoch' entry is read, whatever the model's size
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # noqa: BLE001 - missing, partial or foreign file: nothing to continue from
        return None
