"""Initialisation stages: what a method trains before distillation (`Method.stages()`), as RepDistiller's
helper/pretrain.py `init` trains AB's connectors, FT's paraphraser and FSP's student for 30 epochs first.

Each stage trains for its epochs with the run's loader, its own SGD (constant LR, its own momentum buffers, and its
own grad scaler under fp16) over the parameters of its `trains` alone (the only ones that require gradients, and the
only modules in train mode, as `init` sets model_s.eval() and init_modules.train()); its loss is the method's
`stage_loss_terms`, the teacher frozen, the non-finite guard as in any step (ctkd.step.train_step with the stage's
`StepRecipe`). Under torchrun the stage gets its own DDP wrapper (unused parameters allowed: a stage loss may leave
parts of a trained module, e.g. the student's classifier, without gradient). Distillation then starts exactly as
a run without stages: its optimizer, LR schedule and curriculum count epochs from 1.

Numbering. With S stage epochs in all (the stages one after another), stage epoch g (0-based over all stages) is
the run's epoch g + 1 − S: the stages fill the run epochs 1−S … 0, right before distillation epoch 1. That one
number is the data epoch (order and augmentation are seeded by (seed, run epoch), so a stage epoch never reuses a
distillation epoch's random streams, and the distillation epochs see the data a run without stages sees), the
checkpoint position (ckpt-e-0002-s000003.pth … ckpt-e0000-s000005.pth: ctkd.series), the TensorBoard step of the
stage's scalars ('stage/<name>/loss_fsp', '…/lr', '…/epoch_s') and the "epoch" of its metrics.jsonl records, which
also carry "stage" (the name) and "stage_epoch" (1-based within the stage). Checkpoints keep `StagePlan.state_dict`
under "stages": the stage epochs done and the running stage's optimizer (and scaler) state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ctkd.datasets.loader import Batch
from ctkd.epoch_checks import bad_images, stop_agreed
from ctkd.guard import NonFiniteLossError
from ctkd.logging import get_logger
from ctkd.methods import Method, Stage, StepContext, StepOutput, TeacherOutput
from ctkd.methods.base import StepInputs, to_float
from ctkd.optim import build_stage_sgd, load_optimizer_state
from ctkd.preemption import STOP, StopRequested
from ctkd.report import round_float
from ctkd.step import EpochRun, StageEpoch, StepRecipe

if TYPE_CHECKING:
    from ctkd.build import Experiment
    from ctkd.distiller import Distiller
    from ctkd.series import Position
    from ctkd.trainer import Trainer


@dataclass
class StagePlan:
    """The run's stages (those of more than 0 epochs), how many of their epochs are done, and the stage part of the
    checkpoint the run resumed from (`saved`: its optimizer state, loaded when that stage continues)."""

    stages: list[Stage]
    done: int = 0
    saved: dict[str, Any] | None = None

    @classmethod
    def of(cls, method: Method) -> StagePlan:
        """The plan of `method.stages()`, checked: distinct names, a teacher to learn from."""
        stages = [stage for stage in method.stages() if stage.epochs > 0]
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"method {method.options.name}: stage names must differ, got {names}")
        if stages and not method.uses_teacher:
            raise ValueError(f"method {method.options.name} declares stages but no teacher to train them against")
        return cls(stages)

    @property
    def total(self) -> int:
        """Stage epochs in all (S)."""
        return sum(stage.epochs for stage in self.stages)

    @property
    def finished(self) -> bool:
        """Whether every stage epoch is done (always, without stages)."""
        return self.done >= self.total

    def run_epoch(self, index: int) -> int:
        """The run epoch of stage epoch `index` (0-based over all stages): index + 1 − S, in 1−S … 0."""
        return index + 1 - self.total

    def locate(self, index: int) -> tuple[int, Stage, int]:
        """(stage index, stage, its epochs before) of stage epoch `index` (0-based over all stages)."""
        for number, stage in enumerate(self.stages):
            if index < stage.epochs:
                return number, stage, index
            index -= stage.epochs
        raise IndexError(f"stage epoch {index} past the {self.total} of the run")

    def next_run_epoch(self, distilled: int) -> int:
        """The run epoch the run continues with, after `distilled` distillation epochs."""
        return self.run_epoch(self.done) if not self.finished else distilled + 1

    def state_dict(self, active: ActiveStage | None) -> dict[str, Any] | None:
        """What a checkpoint keeps (None without stages): the epochs done and the running stage's optimizer."""
        if not self.stages:
            return None
        running = active.state_dict() if active is not None else {"stage": None, "name": None, "optimizer": None,
                                                                    "grad_scaler": None}
        return {"total": self.total, "done": self.done, **running}

    def where(self, position: Position, inside: bool, steps: int) -> str | None:
        """A resume's 'after epoch 2 of stage fsp_init' / 'inside …, after step k of N'; None past the stages."""
        if not self.stages or position.epoch > 0:
            return None
        _, stage, before = self.locate(position.epoch + self.total - 1)
        if inside:
            return f"inside epoch {before + 1} of stage {stage.name}, after step {position.step} of {steps}"
        return f"after epoch {before + 1} of stage {stage.name}"

    def describe(self, epochs: int) -> str:
        """The start-up block's line on the stages, and the run's epochs in all."""
        parts = [f"{stage.name}: {_epochs(stage.epochs)} training {', '.join(stage.trains)} (SGD lr {stage.lr:g}, "
                 f"momentum {stage.momentum:g}, weight decay {stage.weight_decay:g})" for stage in self.stages]
        return (f"  stages    {'; '.join(parts)}; then {_epochs(epochs)} of distillation ({self.total + epochs} in "
                f"all; the stages' are run epochs {1 - self.total}..0)")


def _epochs(count: int) -> str:
    """'1 epoch', '30 epochs'."""
    return f"{count} epoch{'' if count == 1 else 's'}"


def stage_parameters(method: Method, stage: Stage) -> list[nn.Parameter]:
    """The parameters of the submodules `stage.trains` names (attribute names or dotted paths), each once."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for name in stage.trains:
        try:
            module = method.get_submodule(name)
        except AttributeError:
            raise ValueError(f"method {method.options.name}: stage {stage.name} trains '{name}', which is no "
                             "submodule of it") from None
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    if not params:
        raise ValueError(f"method {method.options.name}: stage {stage.name} trains no parameter ({stage.trains})")
    return params


def stage_teacher_output(distiller: Distiller, images: torch.Tensor) -> TeacherOutput:
    """The frozen teacher's logits and features (pre-activation if the method takes the teacher's so), under the
    run's autocast."""
    assert distiller.teacher is not None  # StagePlan.of: a method with stages has a teacher
    return distiller.teacher_view(images, features=True, preact=distiller.unwrapped.preact_of("teacher"))


class StageStep(nn.Module):
    """The trainable module's forward in a stage: the student's features and logits, τ, and the stage's terms.

    Its output holds the logits detached, so under DDP only the parameters the stage's loss reaches count as used.
    """

    def __init__(self, method: Method, stage: Stage) -> None:
        super().__init__()
        self.method = method
        self.stage = stage

    def forward(self, batch: Batch, teacher: TeacherOutput, ctx: StepContext,
                state: nn.Module | None = None) -> StepOutput:
        """One stage step's loss terms (only the student's forward under the run's autocast, as in distillation)."""
        method = self.method
        with method.runtime.autocast():
            features, logits = method.student.forward_with_features(batch.images, preact=method.preact_of("student"))
        logits, features = to_float(logits, features)
        assert method.temperature is not None  # a method with stages uses a teacher, hence a temperature module
        tau = method.temperature(logits, teacher.logits, ctx.grl_lambda)
        terms = method.stage_loss_terms(self.stage, StepInputs(batch, logits, features, teacher, tau, ctx, state))
        return StepOutput(logits.detach(), terms)


class ActiveStage:
    """The stage being trained: the parameters of its `trains` alone require gradients, through its own SGD (and
    grad scaler under fp16) and, under torchrun, its own DDP wrapper; `close` gives the module back as it was."""

    def __init__(self, exp: Experiment, index: int, stage: Stage, *, sgd: str, fp16: bool,
                 saved: dict[str, Any] | None = None) -> None:
        self.index, self.stage, self.distiller = index, stage, exp.distiller
        method = exp.distiller.unwrapped
        self.modules = [method.get_submodule(name) for name in stage.trains]
        params = stage_parameters(method, stage)
        self.flags = [(param, param.requires_grad) for param in method.parameters()]
        trained = {id(param) for param in params}
        for param, _ in self.flags:
            param.requires_grad_(id(param) in trained)
        self.optimizer = build_stage_sgd(params, lr=stage.lr, momentum=stage.momentum,
                                         weight_decay=stage.weight_decay, implementation=sgd)
        self.scaler = torch.amp.GradScaler(exp.device.type) if fp16 else None
        module: nn.Module = StageStep(method, stage)
        if exp.ctx.enabled:  # built on every rank at once (it broadcasts rank 0's state: the same as every rank's)
            device_ids = [exp.device.index] if exp.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
        self.module: nn.Module | None = module
        if saved is not None and saved.get("stage") == index:  # a resume inside this stage
            load_optimizer_state(self.optimizer, saved["optimizer"])
            if self.scaler is not None and saved.get("grad_scaler") is not None:
                self.scaler.load_state_dict(saved["grad_scaler"])

    def losses(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """One step's stage loss terms: the teacher's view without gradient, then the (wrapped) stage forward."""
        assert self.module is not None, "the stage is closed"
        teacher = stage_teacher_output(self.distiller, batch.images)
        return self.module(batch, teacher, ctx, self.distiller.state)

    def set_modes(self) -> None:
        """Eval mode for the trainable module (and the teacher), train mode for the modules the stage trains."""
        self.distiller.train(False)
        for module in self.modules:
            module.train()

    def epoch(self, number: int) -> StageEpoch:
        """Epoch `number` (1-based) of this stage, for an EpochRun."""
        recipe = StepRecipe(self.losses, self.optimizer, self.scaler)
        return StageEpoch(self.stage.name, number, self.stage.epochs, recipe, self.set_modes)

    def state_dict(self) -> dict[str, Any]:
        """The stage's index and name and its optimizer's (and scaler's) state, for checkpoints."""
        return {"stage": self.index, "name": self.stage.name, "optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def close(self) -> None:
        """Every parameter's requires_grad back as before the stage, the stage's DDP wrapper dropped."""
        for param, flag in self.flags:
            param.requires_grad_(flag)
        self.module = None

    def __enter__(self) -> ActiveStage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stage_line(record: dict[str, Any]) -> str:
    """One console line per stage epoch: which stage and epoch, its LR, its loss terms and time."""
    terms = " ".join(f"{key.removeprefix('train_')} {value:.4f}" for key, value in record.items()
                     if key.startswith("train_loss_"))
    return (f"stage {record['stage']} epoch {record['stage_epoch']}/{record['stage_epochs']} (run epoch "
            f"{record['epoch']}) lr {record['lr']:.4g} loss {record['train_loss']:.4f} ({terms}) "
            f"({record['epoch_time']:.1f}s)")


# ------------------------------------------------------------------------------------------ the stages of a run
def train_stages(trainer: Trainer, inside: dict[str, Any] | None) -> dict[str, Any] | None:
    """Train the stage epochs not done yet, each stage with its own optimizer, the first epoch continuing `inside`;
    returns `inside` when it belongs to distillation (every stage already done), else None."""
    plan, cfg = trainer.plan, trainer.cfg
    if plan.finished:
        return inside
    while not plan.finished:
        index, stage, before = plan.locate(plan.done)
        fp16 = cfg.runtime.amp == "fp16"
        with ActiveStage(trainer.exp, index, stage, sgd=cfg.runtime.sgd, fp16=fp16, saved=plan.saved) as active:
            trainer.active = active
            try:
                for number in range(before + 1, stage.epochs + 1):
                    record, stopping = run_stage_epoch(trainer, active, number, inside)
                    inside = None
                    get_logger().info(stage_line(record))
                    if stopping:  # saved at the stage epoch's end
                        signal = STOP.name or "a stop signal on another rank"
                        raise StopRequested(record["epoch"], trainer.steps, signal)
            finally:
                trainer.active = None
    return None


def run_stage_epoch(trainer: Trainer, active: ActiveStage, number: int,
                    inside: dict[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """Train, log and checkpoint epoch `number` of the active stage (no evaluation: the student's classifier may
    not have trained yet); returns its metrics record and whether the run stops here."""
    plan, exp = trainer.plan, trainer.exp
    epoch = plan.run_epoch(plan.done)
    grl_lambda = exp.curriculum(1) if trainer.distilling else 0.0  # the first epoch's λ, should a stage learn τ
    run = EpochRun.begin(exp, epoch, grl_lambda, inside, active.epoch(number))
    try:
        train, _ = trainer.train_epoch(run)
    except NonFiniteLossError as err:
        raise NonFiniteLossError(f"{err} (epoch {epoch} of the run: {active.epoch(number).label})") from None
    losses = {key: value for key, value in train.items() if key.startswith("train_loss")}
    record = {"epoch": epoch, "stage": active.stage.name, "stage_epoch": number, "stage_epochs": active.stage.epochs,
              "lr": run.lr, **losses, **bad_images(exp, epoch), "epoch_time": run.seconds()}
    record = {key: round_float(value) for key, value in record.items()}
    if trainer.metrics is not None:
        trainer.metrics.log_epoch(record)
    plan.done += 1
    trainer.progress.elapsed_s += record["epoch_time"]
    stopping = stop_agreed(1, 1, exp.device)  # distillation follows: a stop is always possible here
    trainer.save_epoch_end(epoch, False, stopping)
    return record, stopping
