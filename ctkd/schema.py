"""The schema of an experiment: `Config` and its sections, the rules between them, and where the options of each
selected component (method, dataset, temperature, curriculum) come from.

The sections of the experiment itself (model, teacher, loss, optimizer, runtime, logging, checkpoint, distributed)
are defined here; a component's section is the options class of the component its `name` selects, looked up in that
component's registry, which is imported only then (the components import torch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ctkd.keys import flatten_keys
from ctkd.options import (  # noqa: F401  (LossConfig: the loss section, defined beside the methods' options)
    CurriculumOptions,
    DataOptions,
    LossConfig,
    MethodOptions,
    Section,
    TemperatureOptions,
    spec,
)

_KeyPath = tuple[Any, ...]  # a dotted key as a tuple of its parts: ("optimizer", "lr")

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def dataset_options_class(name: str) -> type[DataOptions]:
    """The options class of the dataset registered as `name` (its registry imported on first use: torch)."""
    from ctkd.datasets import DATASETS

    return DATASETS.get(name).Options


def _default_data() -> DataOptions:
    """The options of dataset cifar100 with their defaults."""
    return dataset_options_class("cifar100")()


@dataclass(frozen=True)
class ModelConfig(Section):
    """The student network."""

    name: str = "resnet20"  # registered model name (models/)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model's builder
    pretrained: bool = False  # start from the library's own pretrained weights (torchvision./timm. models; online)
    weights: str | None = None  # start from this local weights file instead (loaded strictly)


@dataclass(frozen=True)
class TeacherConfig(Section):
    """The frozen teacher network of method kd."""

    name: str | None = None  # registered model name; required by method kd
    checkpoint: str | None = None  # path of the teacher's weights; required by method kd unless `pretrained`
    train_config: str | None = None  # a config that trains this teacher, used when `checkpoint` does not exist yet
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model's builder
    pretrained: bool = False  # use the library's own pretrained weights instead of `checkpoint` (online)


def method_class(name: str) -> Any:
    """The method registered as `name` (its registry imported on first use: torch)."""
    from ctkd.methods import METHODS

    return METHODS.get(name)


def _default_method() -> MethodOptions:
    """The options of method kd with their defaults."""
    return method_class("kd").Options()


def temperature_class(name: str) -> Any:
    """The temperature registered as `name` (its registry imported on first use: torch)."""
    from ctkd.temperatures import TEMPERATURES

    return TEMPERATURES.get(name)


def curriculum_class(name: str) -> Any:
    """The curriculum registered as `name` (its registry imported on first use)."""
    from ctkd.curricula import CURRICULA

    return CURRICULA.get(name)


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """SGD with momentum and a step learning-rate schedule."""

    lr: float = spec(0.05, gt=0)  # initial learning rate
    momentum: float = spec(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = spec(5e-4, ge=0)  # L2 weight decay
    lr_decay_epochs: tuple[int, ...] = spec((150, 180, 210), ge=1, increasing=True)  # epochs at which lr is decayed
    lr_decay_rate: float = spec(0.1, gt=0)  # factor applied to lr at each decay epoch
    # `step`: ×lr_decay_rate at each of lr_decay_epochs (the paper); `cosine`: per-iteration cosine decay to min_lr
    schedule: str = spec("step", choices=("step", "cosine"))
    warmup_epochs: float = spec(0.0, ge=0)  # linear per-iteration warm-up from lr·warmup_start_factor (any schedule)
    warmup_start_factor: float = spec(0.001, gt=0, lt=1)  # LR multiplier at the first warm-up iteration
    min_lr: float = spec(0.0, ge=0)  # `cosine`: LR reached at the last iteration


@dataclass(frozen=True)
class RuntimeConfig(Section):
    """How the step runs on the device: numerics and memory layout (the defaults change results by float rounding
    only; docs/benchmarks.md measures each)."""

    amp: str = spec("off", choices=("off", "bf16", "fp16"))  # autocast of the networks (the KD loss and τ stay fp32)
    # NHWC memory format for the networks and images: auto = on for CPU (oneDNN's convolutions, ~1.3x faster in fp32)
    # and for CUDA with amp (tensor cores), off for fp32 CUDA; true/false are read as on/off
    channels_last: str = spec("auto", choices=("auto", "on", "off"), bools=("on", "off"))
    # torch.compile of student and teacher: auto = `default` on CUDA, off on CPU; reduce-overhead adds CUDA graphs
    compile: str = spec("auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"))
    # SGD kernel: fused (one kernel, skips a non-finite step on the device), foreach, or loop (torch's default and
    # the authors': bit-identical to their updates; fused differs by float rounding), the last two read a flag per step
    sgd: str = spec("fused", choices=("fused", "foreach", "loop"))
    # fold the frozen teacher's BatchNorms into the convolutions before them: the same function up to float rounding,
    # one pass over each activation fewer (models/fusion.py checks every fold against the unfolded teacher)
    fold_teacher_bn: bool = True
    tune_malloc: bool = True  # keep freed host memory for reuse (glibc): far fewer page faults per CPU step
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution algorithms (CUDA; not bit-reproducible)
    # bit-reproducible CUDA runs: deterministic cuDNN/cuBLAS kernels and torch.use_deterministic_algorithms (slower;
    # overrides cudnn_benchmark). CPU runs are bit-reproducible without it
    deterministic: bool = False
    # in-memory datasets (CIFAR, synthetic) augmented in batches in the training process, on its device (the GPU's
    # memory with CUDA), without loader workers: auto = on for them; off = loader workers (data.num_workers)
    data_on_device: str = spec("auto", choices=("auto", "on", "off"))


@dataclass(frozen=True)
class LoggingConfig(Section):
    """Where progress is reported."""

    tensorboard: bool = True  # write TensorBoard event files into the run directory
    progress_bar: bool = True  # show a tqdm bar (also quiet automatically when stderr is not a terminal)
    interval: int = spec(100, ge=1)  # steps between reads of the device's non-finite-step flags (a host sync)
    eval_every: int = spec(1, ge=1)  # evaluate every this many epochs (and always after the last)
    checkpoint_every: int = spec(1, ge=1)  # write last.pth every this many epochs (and after the last)


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """Which checkpoints a run writes and keeps (when at epoch ends: logging.checkpoint_every)."""

    keep_last: int = 2  # series checkpoints kept (ckpt-*.pth; last.pth copies the newest, best.pth is kept apart)
    every_steps: int = spec(0, ge=0)  # also checkpoint every this many training steps (0: at epoch ends only)


# Checked here for device: cpu, and again at start-up for device: auto on a machine without CUDA.
SYNC_BN_NEEDS_CUDA = (
    "'distributed.sync_bn' needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
    "set distributed.sync_bn=false or run on GPUs"
)


@dataclass(frozen=True)
class DistributedConfig(Section):
    """Multi-process training under torchrun (ignored by single-process runs)."""

    timeout_s: float = spec(300.0, gt=0)  # how long a collective waits for a dead or hung rank before the job fails
    sync_bn: bool = False  # convert the student's BatchNorm to SyncBatchNorm (CUDA only)


@dataclass(frozen=True)
class Config(Section):
    """One experiment. The defaults are the authors' CIFAR-100 protocol."""

    output_dir: str | None = None  # run directory; None → runs/<config path below configs/> (set by load_config)
    seed: int = spec(0, ge=0)  # global random seed
    device: str = spec("auto", choices=DEVICE_CHOICES)  # auto: cuda when available, else cpu
    # the distillation method and its options: `kd`, `vanilla` (no teacher), `dkd`, ... (python -m ctkd list methods)
    method: MethodOptions = field(default_factory=_default_method)
    epochs: int = spec(240, ge=1)  # number of training epochs
    data: DataOptions = field(default_factory=_default_data)  # dataset, its options and the loaders
    student: ModelConfig = field(default_factory=ModelConfig)  # the network being trained
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the frozen teacher (method kd)
    loss: LossConfig = field(default_factory=LossConfig)  # loss weights
    # distillation temperature and its options: fixed, global, instance (python -m ctkd list temperatures)
    temperature: TemperatureOptions = field(default_factory=lambda: temperature_class("global").Options())
    # λ curriculum of a learned τ and its options: cosine, linear, constant (python -m ctkd list curricula)
    curriculum: CurriculumOptions = field(default_factory=lambda: curriculum_class("cosine").Options())
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # optimizer and LR schedule
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # mixed precision, memory format
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # progress reporting
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoint frequency and retention
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # torchrun settings


def _changed_keys(section: str, value: Any, default: Any) -> list[str]:
    """Dotted keys of `section` that were changed from `default`: its `name` when another component is selected, and
    the keys whose values differ from their defaults in the selected component's options."""
    renamed = [f"{section}.name"] if getattr(value, "name", None) != getattr(default, "name", None) else []
    ours, theirs = flatten_keys(config_to_dict(value)), flatten_keys(config_to_dict(type(value)()))
    return renamed + [f"{section}.{key}" for key in ours if key != "name" and ours[key] != theirs.get(key)]


def _unused_section_problems(cfg: Config, method: Any) -> list[tuple[_KeyPath, str]]:
    """Sections that the experiment never reads must stay at their defaults: a method without a teacher reads no
    loss weights, temperature or curriculum, and a fixed τ no curriculum (a sweep over such a key would silently run
    one experiment many times)."""
    defaults = Config(output_dir=cfg.output_dir)
    if not method.uses_teacher:
        unused = [("loss", f"method {cfg.method.name} trains with plain cross-entropy")] + [
            (name, f"method {cfg.method.name} has no teacher, so no temperature or curriculum")
            for name in ("temperature", "curriculum")
        ]
    elif not cfg.temperature.learnable:
        unused = [("curriculum", f"a {cfg.temperature.name} temperature has no parameters, so no curriculum on λ")]
    else:
        return []
    problems: list[tuple[_KeyPath, str]] = []
    for section, why in unused:
        changed = _changed_keys(section, getattr(cfg, section), getattr(defaults, section))
        if changed:
            problems.append(((section, changed[0].split(".", 1)[1]), (
                f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} set, but {why}: nothing reads "
                f"{'it' if len(changed) == 1 else 'them'}; remove {'it' if len(changed) == 1 else 'them'}"
            )))
    return problems


def cross_field_problems(cfg: Config) -> list[tuple[_KeyPath, str]]:
    """All rules that involve more than one field, as (key the problem is reported at, message)."""
    problems: list[tuple[_KeyPath, str]] = []
    if cfg.optimizer.warmup_epochs >= cfg.epochs:
        problems.append((
            ("optimizer", "warmup_epochs"),
            f"'optimizer.warmup_epochs' ({cfg.optimizer.warmup_epochs:g}) must be less than 'epochs' ({cfg.epochs}): "
            "the LR would never reach optimizer.lr; shorten the warm-up or train longer",
        ))
    if cfg.checkpoint.keep_last < 2:
        problems.append((
            ("checkpoint", "keep_last"),
            f"'checkpoint.keep_last' is {cfg.checkpoint.keep_last}, but at least 2 checkpoints must be kept: a "
            "machine that dies while the newest is written, or a newest one damaged on disk, must leave an intact "
            "earlier one to resume from; set checkpoint.keep_last=2 or more",
        ))
    if cfg.distributed.sync_bn and cfg.device == "cpu":
        problems.append((
            ("distributed", "sync_bn"),
            SYNC_BN_NEEDS_CUDA,
        ))
    teacher_fields = dataclasses.asdict(cfg.teacher)
    name = cfg.method.name
    method = method_class(name)
    problems += _unused_section_problems(cfg, method)
    if method.uses_teacher and cfg.temperature.learnable and cfg.loss.kd_weight == 0 and not method.uses_tau:
        problems.append((
            ("loss", "kd_weight"),
            f"'loss.kd_weight' is 0, so the learned temperature ({cfg.temperature.name}) reaches no loss term of "
            f"method {name} and would never change; give the KD term a weight, or use temperature.name: fixed",
        ))
    if method.uses_teacher:
        needed = ("name",) if cfg.teacher.pretrained else ("name", "checkpoint")
        missing = [f"teacher.{k}" for k in needed if teacher_fields[k] is None]
        if missing:
            problems.append((
                ("method",),
                f"method: {name} needs teacher.name and teacher.checkpoint, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; "
                "set it, or use method: vanilla to train without a teacher",
            ))
    else:
        used = [f"teacher.{k}" for k, v in teacher_fields.items() if v not in (None, False, {})]
        if used:
            problems.append((
                ("teacher",),
                f"teacher.* is unused with method: {name}; remove it (set: {', '.join(used)})",
            ))
    return problems



def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts, lists and scalars, for YAML, JSON and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return list(value) if isinstance(value, tuple) else value

    return plain(cfg)




# Sections whose options class is looked up by the section's `name` among the registered components.
_NAMED_SECTIONS: dict[type, Any] = {
    MethodOptions: lambda name: method_class(name).Options,
    DataOptions: lambda name: dataset_options_class(name),
    TemperatureOptions: lambda name: temperature_class(name).Options,
    CurriculumOptions: lambda name: curriculum_class(name).Options,
}


def named_section_options(hint: Any) -> Any:
    """For a field typed as a component kind's options base, the lookup name → that component's options class;
    None for any other field."""
    return _NAMED_SECTIONS.get(hint)
