"""What every distillation method shares: its options, its trainable module, and what one step gives and returns.

A method is one class, registered by name in `METHODS`, that is at once
- the **trainable module** of a run: the student, the temperature module and the method's own heads (VID
  regressors, CRD embeddings, SRRL connector) are its submodules, so one optimizer sees them, one DDP wraps them and
  one ``state_dict`` saves them; its ``forward`` computes the weighted loss terms of one step;
- the owner of its **options**: a frozen dataclass `Options` (a `MethodOptions`) that the config validates the
  ``method:`` section against, selected by ``method.name``;
- the owner of its **non-parameter state** (CRD's memory bank), built by `create_state`, kept outside the DDP
  wrapper and saved in the checkpoint beside the module.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctkd.datasets.loader import Batch
from ctkd.distributed import gather_batch
from ctkd.losses import kd_loss
from ctkd.options import LossConfig, MethodOptions, spec
from ctkd.registry import Registry

METHODS = Registry("method")

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class NetworkRuntime:
    """How the networks (student and teacher) run: autocast dtype and memory format (`runtime.*` of the config).

    Only the network forwards run under autocast; their logits and features leave them as float32 (`to_float`), so
    the CE loss, τ, the temperature module and every method head compute in float32 (KD and DKD in float64). With
    the defaults (no autocast, contiguous layout) nothing differs from calling the networks directly.
    """

    device_type: str = "cpu"  # autocast's device type: "cuda" or "cpu"
    amp_dtype: torch.dtype | None = None  # torch.bfloat16 / torch.float16, or None: float32 (amp: off)
    channels_last: bool = False  # networks and images in NHWC layout

    @classmethod
    def from_config(cls, device_type: str, amp: str, channels_last: str) -> NetworkRuntime:
        """From `runtime.amp` ("off" | "bf16" | "fp16") and `runtime.channels_last` ("auto" | "on" | "off")."""
        return cls(device_type, AMP_DTYPES[amp], resolve_channels_last(channels_last, device_type, amp))

    @property
    def memory_format(self) -> torch.memory_format:
        """The memory format of the images (and 4-d weights): channels_last, or whatever they have."""
        return torch.channels_last if self.channels_last else torch.preserve_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of a network forward: torch.autocast with the dtype, or nothing when amp is off."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


def resolve_channels_last(setting: str, device_type: str, amp: str) -> bool:
    """`runtime.channels_last` on this device: auto = NHWC on CPU (oneDNN's convolutions are faster in it at any
    precision) and on CUDA under autocast (tensor-core kernels want NHWC), contiguous for float32 CUDA."""
    if setting != "auto":
        return setting == "on"
    return device_type == "cpu" or amp != "off"


def to_float(logits: Tensor, features: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A network's logits and features as float32 where they leave the network (the same tensors if already)."""
    return logits.float(), [feature.float() for feature in features]


def same_spatial_size(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool whichever (B, C, H, W) map is larger down to the other's height and width (RepDistiller pools the
    larger to the smaller with adaptive_avg_pool2d; per dimension here, the same for the square maps it assumes)."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


@dataclass(frozen=True)
class StepContext:
    """Where a training step is: the epoch (1-based), the step within it, and the curriculum's λ."""

    epoch: int
    step: int
    grl_lambda: float | Tensor  # λ of the epoch; the training loop passes a device tensor (no recompile per epoch)


@dataclass
class TeacherOutput:
    """The frozen teacher's view of a batch, computed without gradient."""

    logits: Tensor
    features: list[Tensor] = field(default_factory=list)  # as the zoo's forward_with_features, when the method asks
    classifier: nn.Module | None = None  # the teacher's final linear layer (SRRL applies it to student features)


@dataclass
class StepOutput:
    """What one step of a method gives the trainer."""

    logits: Tensor  # (B, C) student logits, for accuracy
    losses: dict[str, Tensor]  # weighted loss terms ("loss_ce", "loss_kd", ...); the trainer minimises their sum
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached values to log, 0-d or (B,): "tau", ...


@dataclass(frozen=True)
class StepInputs:
    """What a method's own loss terms are computed from in one step."""

    batch: Batch  # this rank's share of the global batch
    logits: Tensor  # (B, C) student logits
    student_features: list[Tensor]  # from forward_with_features when the method asks, else []
    teacher: TeacherOutput
    tau: Tensor  # 0-d or (B,) temperature
    ctx: StepContext
    state: nn.Module | None = None  # the method's non-parameter state (CRD's memory)

    def global_features(self, index: int) -> tuple[Tensor, Tensor]:
        """Student and teacher `features[index]` of the whole global batch (gathered from every rank, with
        gradient), for losses that relate the samples of a batch to each other."""
        size = self.batch.global_size
        return gather_batch(self.student_features[index], size), gather_batch(self.teacher.features[index], size)


@dataclass(frozen=True)
class MethodSetup:
    """Facts a method may need to build its heads and state, measured once before training."""

    student_feature_shapes: list[tuple[int, ...]]  # per sample, from forward_with_features (empty if not asked)
    teacher_feature_shapes: list[tuple[int, ...]]
    num_classes: int
    train_targets: Tensor  # (N,) labels of the training set, in dataset order (CRD's negatives)
    seed: int
    # the frozen teacher as loaded (its BatchNorms not yet folded), to read from while the heads are built (e.g. the
    # statistics of its BatchNorms); never a submodule of the method
    teacher: nn.Module | None = None


@dataclass(frozen=True)
class Stage:
    """A stage a method trains before distillation, as RepDistiller's `init` does for AB, FT and FSP: which
    submodules of the trainable module train (by attribute name), for how many epochs, with which SGD settings
    (a constant LR); its loss terms are the method's `stage_loss_terms(stage, step)`.

    How a run trains it (ctkd.stages): before distillation epoch 1, for `epochs` epochs of the run's loader, with
    its own SGD over the parameters of `trains` (the only ones that require gradients, and the only modules in
    train mode: the rest of the trainable module is in eval mode, as RepDistiller's `init` sets it); the student's
    and the teacher's features (pre-activation as `preact_of` says for each) reach `stage_loss_terms` whatever the
    method's `features`, and its terms alone make the loss (no CE or KD unless the method returns them). The
    StepContext of a stage step carries the stage's epoch (1-based). A stage of 0 epochs is skipped.
    """

    name: str  # letters, digits and "_": it names TensorBoard tags (stage/<name>/...) and metrics records
    epochs: int
    # attribute names of the method's submodules, e.g. ("student", "connectors"); dotted paths ("student.fc") too
    trains: tuple[str, ...]
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        """A name fit for tags and file records, something to train, a non-negative length and a positive LR."""
        if not (self.name and self.name.isascii() and self.name.replace("_", "").isalnum()):
            raise ValueError(f"stage name {self.name!r}: use letters, digits and '_' only")
        if not self.trains or self.epochs < 0 or self.lr <= 0:
            raise ValueError(f"stage {self.name}: needs modules to train, epochs >= 0 and lr > 0 (got {self})")


@dataclass(frozen=True)
class InitStageOptions(MethodOptions):
    """The options of a method with RepDistiller's initialisation stage (AB, FT, FSP): its length and SGD."""

    init_epochs: int = spec(30, ge=0)  # RepDistiller --init_epochs 30; 0 skips the stage
    init_lr: float = spec(0.05, gt=0)  # RepDistiller init(): the run's --learning_rate, 0.05 for CIFAR-100
    init_momentum: float = spec(0.9, ge=0)  # RepDistiller --momentum 0.9
    init_weight_decay: float = spec(5e-4, ge=0)  # RepDistiller --weight_decay 5e-4


def init_stage(name: str, trains: tuple[str, ...], options: InitStageOptions) -> list[Stage]:
    """The one initialisation stage `options` describe, training the submodules `trains`; none at init_epochs 0."""
    if options.init_epochs == 0:
        return []
    return [Stage(name, options.init_epochs, trains, options.init_lr, options.init_momentum,
                  options.init_weight_decay)]


class Method(nn.Module):
    """Base class: the student and the temperature module; subclasses add heads and define `loss_terms`."""

    Options: ClassVar[type[MethodOptions]] = MethodOptions
    paper: ClassVar[str] = ""  # "Authors, Venue Year" of the method, shown by `python -m ctkd list methods`
    uses_teacher: ClassVar[bool] = True  # needs teacher.name/teacher.checkpoint and a temperature module
    features: ClassVar[bool] = False  # whether student and teacher features are computed (forward_with_features)
    min_samples_per_rank: ClassVar[int] = 1  # a method with BatchNorm in its heads needs ≥ 2
    uses_tau: ClassVar[bool] = False  # whether the method's own terms use τ (DKD), besides the KD term
    preact: ClassVar[bool] = False  # features taken before each stage's final ReLU (AB, OFD), for both networks
    teacher_preact: ClassVar[bool | None] = None  # the teacher's own choice where it differs (ReviewKD); None: preact

    def __init__(
        self,
        student: nn.Module,
        temperature: nn.Module | None,
        *,
        options: MethodOptions,
        loss: LossConfig,
        setup: MethodSetup,
    ) -> None:
        super().__init__()
        if self.uses_teacher and temperature is None:
            raise ValueError(f"method '{options.name}' needs a temperature module")
        self.student = student
        self.temperature = temperature
        self.options = options
        self.ce_weight = loss.ce_weight
        self.kd_weight = loss.kd_weight
        self.runtime = NetworkRuntime()  # set for the run by Distiller.set_runtime
        self.build_heads(setup)

    def build_heads(self, setup: MethodSetup) -> None:
        """Create the method's trainable heads (embeddings, connectors, regressors) from the networks' shapes."""

    @classmethod
    def create_state(cls, options: MethodOptions, setup: MethodSetup) -> nn.Module | None:
        """The method's non-parameter state (kept outside DDP, checkpointed); None for most methods."""
        return None

    def forward(
        self, batch: Batch, teacher: TeacherOutput | None, ctx: StepContext, state: nn.Module | None = None
    ) -> StepOutput:
        """One training step's loss terms: student forward (with features if asked), τ, then the method's terms.

        Only the student's forward runs under the run's autocast; its outputs are float32 from here on.
        """
        with self.runtime.autocast():
            if self.features:
                student_features, logits = self.student.forward_with_features(batch.images, preact=self.preact)
            else:
                student_features, logits = [], self.student(batch.images)
        logits, student_features = to_float(logits, student_features)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits, batch.targets)}
        if teacher is None:
            return StepOutput(logits, losses)
        assert self.temperature is not None
        tau = self.temperature(logits, teacher.logits, ctx.grl_lambda)
        if self.kd_weight > 0:  # α = 0 (DKD's setting) skips the term instead of computing it times zero
            losses["loss_kd"] = self.kd_weight * kd_loss(*self.kd_inputs(logits, teacher.logits), tau)
        losses.update(self.loss_terms(StepInputs(batch, logits, student_features, teacher, tau, ctx, state)))
        return StepOutput(logits, losses, {"tau": tau.detach()})

    def loss_terms(self, step: StepInputs) -> dict[str, Tensor]:
        """The method's own weighted terms beside γ·CE and α·KD(τ); none for plain KD."""
        return {}

    def kd_inputs(self, logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The student and teacher logits the α·KD(τ) term softens: the logits themselves, unless a method
        transforms them first (logit standardisation z-scores them)."""
        return logits, teacher_logits

    def stages(self) -> list[Stage]:
        """The stages this run trains before distillation, in order (distinct names); none for most methods. Asked
        once per run, after `build_heads`; a method with stages needs a teacher."""
        return []

    def stage_loss_terms(self, stage: Stage, step: StepInputs) -> dict[str, Tensor]:
        """The weighted loss terms ("loss_<x>") of one step of `stage` (its parameters alone are trained); `step`
        holds both networks' features and τ, computed as `Stage` describes."""
        raise NotImplementedError(f"method {self.options.name} declares stage {stage.name} but no loss for it")

    @classmethod
    def preact_of(cls, network: str) -> bool:
        """Whether the "student" or the "teacher" gives this method its features before each stage's final ReLU."""
        if network == "teacher" and cls.teacher_preact is not None:
            return cls.teacher_preact
        return cls.preact

    @classmethod
    def needs(cls) -> str:
        """What the method asks of a run, for `python -m ctkd list methods`."""
        if not cls.uses_teacher:
            return "no teacher"
        parts = ["teacher logits"]
        if cls.features:
            student, teacher = cls.preact_of("student"), cls.preact_of("teacher")
            parts.append("pre-activation features" if student and teacher else
                         "features (the teacher's pre-activation)" if teacher else
                         "features (the student's pre-activation)" if student else "features")
        if cls.uses_tau:
            parts.append("τ inside its loss")
        if cls.stages is not Method.stages:
            parts.append("an initialisation stage")
        return ", ".join(parts)

    def extra_repr(self) -> str:
        """The options in module printouts."""
        return f"options={self.options}"
