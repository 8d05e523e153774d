"""A training run: the output directory, the teacher, resume, and the epoch loop whose decisions `Trainer` owns,
with a method's initialisation stages before distillation epoch 1 (ctkd.stages)."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ctkd.build import Experiment, RunData, build_experiment, check_inputs
from ctkd.checkpoint import capture_rng_state
from ctkd.config import Config, save_config
from ctkd.datasets.loader import Batch
from ctkd.distributed import (
    DistributedContext,
    barrier,
    broadcast_buffers,
    broadcast_object,
    claim_run_directory,
    decide_on_main,
    gather_objects,
    init_distributed,
    seed_rank,
)
from ctkd.epoch_checks import bad_image_record, bad_images, stop_agreed
from ctkd.errors import UserError
from ctkd.evaluation import evaluate
from ctkd.fileio import supports_hard_links
from ctkd.guard import NonFiniteLossError
from ctkd.locks import RunLock, check_free_space
from ctkd.logging import MetricsLog, get_logger, write_json_atomic
from ctkd.methods import StepContext
from ctkd.preemption import REPEAT_AFTER_S, STOP, StopRequested
from ctkd.provenance import provenance
from ctkd.report import epoch_line, newest_checkpoint_note, record_failure, results_summary, round_float, startup_block
from ctkd.resume import Progress, checkpoint_state, continue_series, resolve_resume, restore, resumable, saved_epoch
from ctkd.runs import FAILED_FILE
from ctkd.series import CheckpointSeries, Position
from ctkd.stages import ActiveStage, StagePlan, stage_parameters, train_stages
from ctkd.step import EpochRun, on_device, train_step
from ctkd.system import resolve_compile_mode, seed_everything, set_cublas_workspace, set_determinism
from ctkd.teacher import ensure_teacher_checkpoint, evaluate_teacher, teacher_sha256


class RunInterrupted(Exception):
    """Training was stopped by a signal (SIGTERM, SIGUSR1, Ctrl-C); says what was saved so the command-line entry can
    tell how to continue: after `saved_steps` steps of epoch `saved_epoch` (None: the epoch's end)."""

    def __init__(self, output_dir: str, saved_epoch: int | None, saved_steps: int | None = None,
                 signal_name: str = "") -> None:
        super().__init__(f"interrupted: {output_dir}")
        self.output_dir, self.saved_epoch, self.saved_steps = output_dir, saved_epoch, saved_steps
        self.signal_name = signal_name


@dataclass
class Trainer:
    """The epoch loop of one run, and the one owner of its decisions: when to read the step flags, checkpoint,
    evaluate and stop (`after_step`, `evaluates`, `checkpoints_after`, `epoch_end_checkpoint`).

    `writer` is rank 0's checkpoint series (None on the other ranks, and in tests that save nothing); `metrics`
    writes metrics.jsonl (None: no log); `plan` the method's initialisation stages and how far they got, `active`
    the stage being trained (ctkd.stages).
    """

    exp: Experiment
    cfg: Config
    progress: Progress = field(default_factory=Progress)
    writer: CheckpointSeries | None = None
    metrics: MetricsLog | None = None
    teacher_sha256: str | None = None
    plan: StagePlan = field(init=False)
    active: ActiveStage | None = None
    feed: Callable[[EpochRun], Iterable[Batch]] | None = None  # a cohort's shared batches (ctkd.cohort)

    def __post_init__(self) -> None:
        """The method's stages, none done yet (a resume loads how far they got)."""
        self.plan = StagePlan.of(self.exp.distiller.unwrapped)

    @property
    def steps(self) -> int:
        """Training steps per epoch."""
        return len(self.exp.train_loader)

    def fit(self, inside: dict[str, Any] | None = None) -> None:
        """Train the stage epochs not done yet, then the epochs after `progress.epoch`; the first of them continues
        `inside` (a checkpoint's epoch_state)."""
        inside = train_stages(self, inside)
        first = self.progress.epoch + 1
        for epoch in range(first, self.cfg.epochs + 1):
            record, stopping = self.run_epoch(epoch, inside if epoch == first else None)
            get_logger().info(epoch_line(record, self.cfg.epochs))
            if stopping:  # a signal during the epoch's last step or its end: saved there
                raise StopRequested(epoch, self.steps, STOP.name or "a stop signal on another rank")

    def run_epoch(self, epoch: int, inside: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Train, evaluate, log and checkpoint one epoch; returns its metrics record and whether the run stops here.

        The metrics line is written before the epoch-end checkpoint: a resume drops lines past the checkpoint's
        epoch. A stop request that arrives during the epoch's last step or its evaluation (every rank agrees here)
        is answered with an epoch-end checkpoint, whatever `logging.checkpoint_every` says.
        """
        grl_lambda = self.exp.curriculum(epoch) if self.distilling else 0.0
        run = EpochRun.begin(self.exp, epoch, grl_lambda, inside)
        train_stats, per_sample = self.train_epoch(run)
        test_stats = self.evaluate_student() if self.evaluates(epoch) else {}
        record = self.epoch_record(run, grl_lambda, train_stats, test_stats)
        if self.metrics is not None:
            self.metrics.log_epoch(record, per_sample)
        improved = self.progress.finish_epoch(epoch, record["epoch_time"], test_stats)
        stopping = epoch < self.cfg.epochs and stop_agreed(1, 1, self.exp.device)  # the same on every rank
        self.save_epoch_end(epoch, improved, stopping)
        return record, stopping

    @property
    def distilling(self) -> bool:
        """Whether a teacher takes part (λ and τ are then logged)."""
        return self.exp.distiller.teacher is not None

    def batches(self, run: EpochRun) -> Any:
        """The epoch's training batches, from the step it starts at (a hook for the fault-injection tests); in a
        cohort, the batches it serves every member at once."""
        if self.feed is not None:
            return self.feed(run)
        self.exp.train_loader.sampler.set_epoch(run.epoch, start_batch=run.start_step)
        return self.exp.train_loader

    def train_epoch(self, run: EpochRun, batches: Any = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """The steps of one epoch (Algorithm 1's inner loop), from `run.start_step`; returns the epoch summary
        (weighted loss terms, train top-1/top-5, statistics such as τ) and this rank's per-sample statistics."""
        if run.stage is None:
            self.exp.distiller.train()
        else:
            run.stage.set_modes()
        source = self.batches(run) if batches is None else batches
        progress_bar = self.cfg.logging.progress_bar and self.exp.ctx.is_main and sys.stderr.isatty()
        desc = f"epoch {run.epoch}" if run.stage is None else run.stage.label
        with tqdm(source, desc=desc, leave=False, disable=not progress_bar, dynamic_ncols=True,
                  initial=run.start_step) as bar:
            for step, batch in enumerate(bar, start=run.start_step):
                batch = on_device(self.exp, batch)
                context = StepContext(epoch=run.step_epoch, step=step, grl_lambda=run.grl_lambda)
                out = train_step(self.exp, batch, context, run.guard, run.recipe)
                run.add(batch, out)
                self.after_step(run, step + 1)
        run.guard.check()
        return run.totals.summary(), run.totals.per_sample_values()

    def after_step(self, run: EpochRun, done: int) -> None:
        """Decide what follows step `done` of the epoch: read the non-finite flags (every `logging.interval`
        steps), checkpoint inside the epoch, stop on a signal. Only host integers are compared: no sync unless
        the flags are read or a checkpoint is written; no checkpoint follows a non-finite step."""
        save = self.checkpoints_after(run.epoch, done)
        # not after the last step: the epoch then ends (evaluation, epoch-end checkpoint) and the run stops there
        stop = done < self.steps and stop_agreed(done, self.cfg.logging.interval, self.exp.device)
        if save or stop or done % self.cfg.logging.interval == 0:
            run.guard.check()
        if save:
            self.save_inside(run, done)
        if stop:
            with STOP.deferred():  # rank 0 finishes the write whatever signal comes next
                if not save:
                    self.save_inside(run, done)
            barrier()  # no rank leaves (and makes torchrun stop the others) before the checkpoint is written
            raise StopRequested(run.epoch, done, STOP.name or "a stop signal on another rank")

    def checkpoints_after(self, epoch: int, done: int) -> bool:
        """Whether a checkpoint is taken inside `epoch` after `done` of its steps: every `checkpoint.every_steps`
        training steps of the run, except after the epoch's last step when the epoch-end checkpoint follows."""
        every = self.cfg.checkpoint.every_steps
        if every == 0 or (done == self.steps and self.epoch_end_checkpoint(epoch)):
            return False
        return ((epoch - 1) * self.steps + done) % every == 0

    def epoch_end_checkpoint(self, epoch: int) -> bool:
        """Whether `epoch` ends with a checkpoint: every `logging.checkpoint_every` epochs and the last (stage
        epochs ≤ 0 alike, counted back from distillation: run epoch 0, the end of the stages, always)."""
        return epoch == self.cfg.epochs or epoch % self.cfg.logging.checkpoint_every == 0

    def evaluates(self, epoch: int) -> bool:
        """Whether the student is tested after `epoch`: every `logging.eval_every` epochs and the last."""
        return epoch == self.cfg.epochs or epoch % self.cfg.logging.eval_every == 0

    def evaluate_student(self) -> dict[str, float]:
        """The student's test accuracy, from the same BatchNorm statistics on every rank (rank 0 saves them)."""
        broadcast_buffers(self.exp.distiller.student)
        return evaluate(self.exp.distiller.student, self.exp.test_loader, self.exp.device, self.exp.distiller.runtime)

    def epoch_record(self, run: EpochRun, grl_lambda: float, train: dict[str, float],
                     test: dict[str, float]) -> dict[str, Any]:
        """The epoch's metrics.jsonl line: LR, λ, training means, unreadable images, test accuracy and time."""
        record = {"epoch": run.epoch, "lr": run.lr, **({"lambda": grl_lambda} if self.distilling else {}), **train,
                  **bad_images(self.exp, run.epoch), **{f"test_{key}": value for key, value in test.items()},
                  "epoch_time": run.seconds()}
        return {key: round_float(value) for key, value in record.items()}

    def save_inside(self, run: EpochRun, done: int) -> None:
        """Checkpoint after `done` steps of the epoch, with every rank's running sums and RNG states (every rank
        calls it: a collective)."""
        bad_image_record(self.exp)  # no checkpoint of a run past its budget of unreadable images
        parts = gather_objects({"rng": capture_rng_state(), "epoch_state": run.state_dict()})
        if self.writer is not None:
            inside = {"epoch": run.epoch, "step": done, "lr": run.lr, "elapsed_s": run.seconds(),
                      "ranks": [part["epoch_state"] for part in parts],
                      **({"stage": run.stage.name} if run.stage is not None else {})}
            self.writer.save(self.checkpoint(inside, [part["rng"] for part in parts]), Position(run.epoch, done))

    def checkpoint(self, inside: dict[str, Any] | None, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint state now: inside an epoch (`inside`) or at an epoch end, with the stages' progress."""
        return checkpoint_state(self.exp, self.cfg, self.progress, self.teacher_sha256, inside, rng,
                                stages=self.plan.state_dict(self.active))

    def save_epoch_end(self, epoch: int, improved: bool, stopping: bool) -> None:
        """The epoch-end checkpoint (when due or stopping) and best.pth (when improved); every rank calls it."""
        due = self.epoch_end_checkpoint(epoch) or stopping
        if improved or due:  # every rank (all agree): each rank's RNG states go into it
            rng = gather_objects(capture_rng_state())
            if self.writer is not None:
                state = self.checkpoint(None, rng)
                with STOP.deferred():  # a stop checkpoint is finished whatever signal comes next
                    if due:
                        self.writer.save(state, Position(epoch, self.steps), best=improved)
                    else:
                        self.writer.save_best(state)
        if stopping:
            barrier()  # no rank leaves (and makes torchrun stop the others) before rank 0 has written it


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
        ensure_teacher_checkpoint(cfg, ctx, train=run)
        try:
            return _train(cfg, ctx, resume_path)
        except StopRequested as stop:
            raise RunInterrupted(cfg.output_dir, stop.epoch, stop.steps, stop.signal_name) from None
        except KeyboardInterrupt:
            raise RunInterrupted(cfg.output_dir, saved_epoch(Path(cfg.output_dir) / "last.pth")) from None
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


def _train(cfg: Config, ctx: DistributedContext, resume_path: Path | None) -> dict[str, Any]:
    """Build the experiment and train it, stopping its loader workers however training ends."""
    exp = build_run_experiment(cfg, ctx)
    try:
        trainer, inside = prepare_trainer(exp, cfg, resume_path)
        return train_prepared(trainer, inside, resume_path)
    finally:
        exp.close()


def build_run_experiment(cfg: Config, ctx: DistributedContext, data: RunData | None = None) -> Experiment:
    """The run's experiment from its seed: networks initialised from `cfg.seed` alike on every rank, then each
    rank's own RNG stream (`data`: splits and loaders already built, a cohort's)."""
    seed_everything(cfg.seed)
    set_determinism(cfg, ctx.device)
    exp = build_experiment(cfg, ctx, data)
    seed_rank(cfg.seed, ctx)  # networks are initialised alike on every rank; dropout masks then differ per rank
    return exp


def prepare_trainer(exp: Experiment, cfg: Config, resume_path: Path | None) -> tuple[Trainer, dict[str, Any] | None]:
    """Check the disk has room for the run's checkpoints, then restore, wrap and set up the run directory
    (`_prepare`)."""
    ctx = exp.ctx
    links = ctx.is_main and supports_hard_links(cfg.output_dir)
    files = CheckpointSeries.peak_files(cfg.checkpoint.keep_last, resumed=resume_path is not None, links=links)
    decide_on_main(ctx, lambda: check_free_space(cfg.output_dir, checkpoint_bytes(exp), files))
    return _prepare(exp, cfg, resume_path)


def checkpoint_bytes(exp: Experiment) -> int:
    """Estimated size of a checkpoint: the trainable module's and the method's state plus SGD's momentum buffers,
    and those of the largest initialisation stage's SGD (a checkpoint inside a stage holds both)."""
    state = exp.distiller.state_dict()
    tensors = [*state["trainable"].values(), *state["method_state"].values()]
    method = exp.distiller.unwrapped
    momentum = [p for p in method.parameters() if p.requires_grad]
    stage_momentum = max((stage_parameters(method, stage) for stage in StagePlan.of(method).stages),
                         key=lambda params: sum(p.numel() * p.element_size() for p in params), default=[])
    tensors = [*tensors, *momentum, *stage_momentum]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _prepare(exp: Experiment, cfg: Config, resume_path: Path | None) -> tuple[Trainer, dict[str, Any] | None]:
    """Restore `exp` if resuming, wrap and compile its trainable module, and set up the run directory; returns the
    trainer and the epoch_state of a checkpoint taken inside an epoch (None otherwise)."""
    ctx = exp.ctx
    trainer = Trainer(exp, cfg, teacher_sha256=teacher_sha256(exp, cfg, ctx))
    position, inside = None, None
    if resume_path is not None:
        position, inside = restore(exp, cfg, resume_path, trainer.progress, trainer.teacher_sha256, trainer.plan)
        where = trainer.plan.where(position, inside is not None, len(exp.train_loader)) or (
            f"after epoch {trainer.progress.epoch}" if inside is None
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
    if ctx.is_main:
        (output_dir / FAILED_FILE).unlink(missing_ok=True)  # a failure of an earlier attempt is over
        save_config(cfg, output_dir / "config.yaml")
        trainer.writer = CheckpointSeries(output_dir, cfg.checkpoint.keep_last, get_logger().warning,
                                          protected=position)
        if resume_path is not None and position is not None:
            continue_series(trainer.writer, resume_path, position, output_dir)
    return trainer, inside


def train_prepared(trainer: Trainer, inside: dict[str, Any] | None, resume_path: Path | None) -> dict[str, Any]:
    """Announce the run, train its remaining epochs (a failure leaves a FAILED marker) and write results.json."""
    exp, cfg, ctx, output_dir = trainer.exp, trainer.cfg, trainer.exp.ctx, Path(trainer.cfg.output_dir)
    teacher = evaluate_teacher(exp, cfg, trainer.teacher_sha256)
    plan = trainer.plan
    stages = f"\n{plan.describe(cfg.epochs)}" if plan.stages else ""
    get_logger().info(startup_block(exp, cfg, teacher, trainer.teacher_sha256, resume_path) + stages)
    origin = None
    if ctx.is_main:  # hashed at start-up: the file this run was built from (a resume may point at a moved copy)
        origin = provenance(cfg, varies_freely=resumable, device=ctx.device, world_size=ctx.world_size,
                            teacher_sha256=trainer.teacher_sha256)
    trainer.metrics = MetricsLog(output_dir, start_epoch=plan.next_run_epoch(trainer.progress.epoch),
                                 tensorboard=cfg.logging.tensorboard, enabled=ctx.is_main)
    try:
        trainer.fit(inside)
    except NonFiniteLossError as err:
        error = NonFiniteLossError(f"{err}; {newest_checkpoint_note(output_dir)}")
        record_failure(output_dir, error, ctx)
        raise error from None
    except (StopRequested, KeyboardInterrupt):
        raise
    except Exception as err:
        record_failure(output_dir, err, ctx)
        raise
    finally:
        trainer.metrics.close()
    stage_epochs = {"stage_epochs": {stage.name: stage.epochs for stage in plan.stages}} if plan.stages else {}
    results = broadcast_object(
        {**results_summary(cfg, trainer.progress, trainer.metrics.records(), teacher), **stage_epochs, **origin}
        if ctx.is_main else None)
    if ctx.is_main:
        write_json_atomic(results, output_dir / "results.json")
    get_logger().info(
        f"done: best top-1 {results['best_acc1']:.2f}% (epoch {results['best_epoch']}), "
        f"last top-1 {results['last_acc1']:.2f}%. Results: {output_dir / 'results.json'}; "
        f"TensorBoard: tensorboard --logdir {output_dir}"
    )
    return results
