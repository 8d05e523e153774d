"""Experiment configuration: YAML files (``_base_`` inheritance, ``KEY=VALUE`` overrides) → frozen dataclasses.

The schema is strict, so that a typo cannot silently change an experiment: an unknown key, a wrong type, an
out-of-range value or a violated cross-field rule raises :class:`ConfigError` before any heavy work, naming the file
(or command-line override) the value came from, the full dotted key and a fix. YAML is read with YAML 1.2 floats and
booleans and duplicate keys are an error, which closes PyYAML's traps (a duplicate key silently wins, `1e-3` is a
string, `yes` is True).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ctkd.errors import UserError
from ctkd.fileio import atomic_write_text
from ctkd.schema import (  # noqa: F401  (ConfigError and _spec are part of this module's interface)
    ConfigError,
    _describe,
    _FieldError,
    _Section,
    _spec,
    _type_hints,
    _validated,
)

DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")

_BASE_KEY = "_base_"
_KeyPath = tuple[Any, ...]  # a dotted key as a tuple of its parts: ("optimizer", "lr")


# --------------------------------------------------------------------------------------------------------------------
# YAML reading and writing
# --------------------------------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 core schema: only true/false are booleans (PyYAML's YAML 1.1 also reads yes/no/on/off as booleans).
_BOOL_RE = re.compile(r"^(?:true|false)$", re.IGNORECASE)
# YAML 1.2 floats: an exponent alone makes a float (PyYAML's YAML 1.1 reads 1e-3 and 5e-4 as strings).
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


def _yaml12_resolvers(resolvers: Mapping[str, list[tuple[str, re.Pattern[str]]]]) -> dict:
    """A copy of PyYAML's implicit-resolver table with YAML 1.2 booleans and floats in place of YAML 1.1's."""
    table = {
        first: [(tag, regexp) for tag, regexp in entries if tag not in (_BOOL_TAG, _FLOAT_TAG)]
        for first, entries in resolvers.items()
    }
    for first in "tTfF":
        table.setdefault(first, []).insert(0, (_BOOL_TAG, _BOOL_RE))
    for first in "-+.0123456789":
        table.setdefault(first, []).insert(0, (_FLOAT_TAG, _FLOAT_RE))
    return table


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats/booleans that rejects duplicate keys; the global SafeLoader is untouched."""

    yaml_implicit_resolvers = _yaml12_resolvers(yaml.SafeLoader.yaml_implicit_resolvers)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may legitimately be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys itself
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise ConfigError(
                    f"{key_node.start_mark.name}: duplicate key '{key}' at line {first_lines[key]} and line {line}; "
                    "keep only one of them (plain PyYAML would silently keep the last)"
                )
            first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings a YAML 1.2 reader would take for floats (e.g. '1e-3')."""

    yaml_implicit_resolvers = {
        first: [*entries, *(e for e in _StrictLoader.yaml_implicit_resolvers.get(first, []) if e[0] == _FLOAT_TAG)]
        for first, entries in yaml.SafeDumper.yaml_implicit_resolvers.items()
    }


def _parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the strict loader; `source` names the text in error messages."""
    loader = _StrictLoader(text)
    loader.name = source  # marks (line numbers in errors) carry this name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(_Section):
    """Base of every dataset's options (declared beside the dataset in datasets/); `name` selects the dataset.

    The keys here are common to all datasets (where the files are, the loaders); each dataset adds its own, e.g.
    ``num_classes`` for `synthetic` or ``image_size`` for `imagenet`. ``data: synthetic`` is short for
    ``data: {name: synthetic}``.
    """

    name: str = "cifar100"  # registered dataset (python -m ctkd list datasets)
    root: str = "./data"  # folder that holds (or receives) the dataset files
    download: bool = False  # download the dataset into `root` when it is missing
    batch_size: int = _spec(64, ge=1)  # global training batch size (summed over all processes)
    test_batch_size: int | None = _spec(None, ge=1)  # evaluation batch size; None → max(1, batch_size // 2)
    num_workers: int = _spec(4, ge=0)  # data-loader worker processes per training process

    @property
    def effective_test_batch_size(self) -> int:
        """The evaluation batch size: `test_batch_size`, or half the training batch as in the authors' protocol."""
        return self.test_batch_size if self.test_batch_size is not None else max(1, self.batch_size // 2)

    def dataset_options(self) -> dict[str, Any]:
        """The keys the dataset adds to the common ones, as keyword arguments of its builder."""
        common = {f.name for f in dataclasses.fields(DataConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}


def dataset_options_class(name: str) -> type[DataConfig]:
    """The options class of the dataset registered as `name` (imported lazily: the datasets import this module)."""
    from ctkd.datasets import DATASETS

    return DATASETS.get(name).Options


def _default_data() -> DataConfig:
    """The options of dataset cifar100 with their defaults."""
    return dataset_options_class("cifar100")()


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The student network."""

    name: str = "resnet20"  # registered model name (models/)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model's builder
    pretrained: bool = False  # start from the library's own pretrained weights (torchvision./timm. models; online)
    weights: str | None = None  # start from this local weights file instead (loaded strictly)


@dataclass(frozen=True)
class TeacherConfig(_Section):
    """The frozen teacher network of method kd."""

    name: str | None = None  # registered model name; required by method kd
    checkpoint: str | None = None  # path of the teacher's weights; required by method kd unless `pretrained`
    train_config: str | None = None  # a config that trains this teacher, used when `checkpoint` does not exist yet
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model's builder
    pretrained: bool = False  # use the library's own pretrained weights instead of `checkpoint` (online)


@dataclass(frozen=True)
class MethodConfig(_Section):
    """Base of every method's options (declared beside the method in ctkd/methods/); `name` selects the method.

    In YAML, ``method: kd`` is short for ``method: {name: kd}``; the other keys of the section are validated
    against the options class of the method that `name` selects.
    """

    name: str = "kd"  # registered method (python -m ctkd list methods)


def method_class(name: str) -> Any:
    """The method registered as `name` (imported here lazily: the methods import this module)."""
    from ctkd.methods import METHODS

    return METHODS.get(name)


def _default_method() -> MethodConfig:
    """The options of method kd with their defaults."""
    return method_class("kd").Options()


@dataclass(frozen=True)
class LossConfig(_Section):
    """Weights of the loss terms: loss = ce_weight · CE + kd_weight · KD(τ)."""

    ce_weight: float = _spec(0.1, ge=0)  # weight γ of the cross-entropy with the labels
    kd_weight: float = _spec(0.9, ge=0)  # weight α of the distillation term


@dataclass(frozen=True)
class TemperatureConfig(_Section):
    """Base of every temperature's options (declared beside each in ctkd/temperature.py); `name` selects it.

    ``temperature: fixed`` is short for ``temperature: {name: fixed}``; the other keys are validated against the
    options of the temperature `name` selects (a key it does not read is an error).
    """

    learnable: ClassVar[bool] = False  # whether τ has parameters (trained, with a curriculum on λ)
    name: str = "global"  # registered temperature (python -m ctkd list temperatures)


def temperature_class(name: str) -> Any:
    """The temperature registered as `name` (imported lazily: ctkd/temperature.py imports this module)."""
    from ctkd.temperature import TEMPERATURES

    return TEMPERATURES.get(name)


@dataclass(frozen=True)
class CurriculumConfig(_Section):
    """Base of every curriculum's options (declared beside each in ctkd/curriculum.py); `name` selects it.

    The curriculum sets λ, the gradient-reversal strength that makes a learned τ adversarial, per epoch.
    """

    name: str = "cosine"  # registered curriculum (python -m ctkd list curricula)


def curriculum_class(name: str) -> Any:
    """The curriculum registered as `name` (imported lazily: ctkd/curriculum.py imports this module)."""
    from ctkd.curriculum import CURRICULA

    return CURRICULA.get(name)


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """SGD with momentum and a step learning-rate schedule."""

    lr: float = _spec(0.05, gt=0)  # initial learning rate
    momentum: float = _spec(0.9, ge=0, lt=1)  # SGD momentum
    weight_decay: float = _spec(5e-4, ge=0)  # L2 weight decay
    lr_decay_epochs: tuple[int, ...] = _spec((150, 180, 210), ge=1, increasing=True)  # epochs at which lr is decayed
    lr_decay_rate: float = _spec(0.1, gt=0)  # factor applied to lr at each decay epoch
    # `step`: ×lr_decay_rate at each of lr_decay_epochs (the paper); `cosine`: per-iteration cosine decay to min_lr
    schedule: str = _spec("step", choices=("step", "cosine"))
    warmup_epochs: float = _spec(0.0, ge=0)  # linear per-iteration warm-up from lr·warmup_start_factor (any schedule)
    warmup_start_factor: float = _spec(0.001, gt=0, lt=1)  # LR multiplier at the first warm-up iteration
    min_lr: float = _spec(0.0, ge=0)  # `cosine`: LR reached at the last iteration


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """How the step runs on the device: numerics and memory layout (the defaults change results by float rounding
    only; docs/benchmarks.md measures each)."""

    amp: str = _spec("off", choices=("off", "bf16", "fp16"))  # autocast of the networks (the KD loss and τ stay fp32)
    # NHWC memory format for the networks and images: auto = on for CPU (oneDNN's convolutions, ~1.3x faster in fp32)
    # and for CUDA with amp (tensor cores), off for fp32 CUDA; true/false are read as on/off
    channels_last: str = _spec("auto", choices=("auto", "on", "off"), bools=("on", "off"))
    # torch.compile of student and teacher: auto = `default` on CUDA, off on CPU; reduce-overhead adds CUDA graphs
    compile: str = _spec("auto", choices=("auto", "off", "default", "reduce-overhead", "max-autotune"))
    # SGD kernel: fused (one kernel, skips a non-finite step on the device), foreach, or loop (torch's default and
    # the authors': bit-identical to their updates; fused differs by float rounding), the last two read a flag per step
    sgd: str = _spec("fused", choices=("fused", "foreach", "loop"))
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
    data_on_device: str = _spec("auto", choices=("auto", "on", "off"))


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """Where progress is reported."""

    tensorboard: bool = True  # write TensorBoard event files into the run directory
    progress_bar: bool = True  # show a tqdm bar (also quiet automatically when stderr is not a terminal)
    interval: int = _spec(100, ge=1)  # steps between reads of the device's non-finite-step flags (a host sync)
    eval_every: int = _spec(1, ge=1)  # evaluate every this many epochs (and always after the last)
    checkpoint_every: int = _spec(1, ge=1)  # write last.pth every this many epochs (and after the last)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Which checkpoints a run writes and keeps (when at epoch ends: logging.checkpoint_every)."""

    keep_last: int = 2  # series checkpoints kept (ckpt-*.pth; last.pth copies the newest, best.pth is kept apart)
    every_steps: int = _spec(0, ge=0)  # also checkpoint every this many training steps (0: at epoch ends only)


# Checked here for device: cpu, and again at start-up for device: auto on a machine without CUDA.
SYNC_BN_NEEDS_CUDA = (
    "'distributed.sync_bn' needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
    "set distributed.sync_bn=false or run on GPUs"
)


@dataclass(frozen=True)
class DistributedConfig(_Section):
    """Multi-process training under torchrun (ignored by single-process runs)."""

    timeout_s: float = _spec(300.0, gt=0)  # how long a collective waits for a dead or hung rank before the job fails
    sync_bn: bool = False  # convert the student's BatchNorm to SyncBatchNorm (CUDA only)


@dataclass(frozen=True)
class Config(_Section):
    """One experiment. The defaults are the authors' CIFAR-100 protocol."""

    output_dir: str | None = None  # run directory; None → runs/<config path below configs/> (set by load_config)
    seed: int = _spec(0, ge=0)  # global random seed
    device: str = _spec("auto", choices=DEVICE_CHOICES)  # auto: cuda when available, else cpu
    # the distillation method and its options: `kd`, `vanilla` (no teacher), `dkd`, ... (python -m ctkd list methods)
    method: MethodConfig = field(default_factory=_default_method)
    epochs: int = _spec(240, ge=1)  # number of training epochs
    data: DataConfig = field(default_factory=_default_data)  # dataset, its options and the loaders
    student: ModelConfig = field(default_factory=ModelConfig)  # the network being trained
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the frozen teacher (method kd)
    loss: LossConfig = field(default_factory=LossConfig)  # loss weights
    # distillation temperature and its options: fixed, global, instance (python -m ctkd list temperatures)
    temperature: TemperatureConfig = field(default_factory=lambda: temperature_class("global").Options())
    # λ curriculum of a learned τ and its options: cosine, linear, constant (python -m ctkd list curricula)
    curriculum: CurriculumConfig = field(default_factory=lambda: curriculum_class("cosine").Options())
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


def _cross_field_problems(cfg: Config) -> list[tuple[_KeyPath, str]]:
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


# --------------------------------------------------------------------------------------------------------------------
# Raw (dict) trees with provenance, and building the dataclasses from them
# --------------------------------------------------------------------------------------------------------------------

_Provenance = dict[_KeyPath, str]  # dotted key → where its value came from (file path or override)


def _paths(tree: Mapping[Any, Any], prefix: _KeyPath = ()) -> Iterator[_KeyPath]:
    """Every key path of a nested dict, sections and leaves."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _merge(dst: dict, dst_prov: _Provenance, src: Mapping, src_prov: _Provenance, prefix: _KeyPath = ()) -> None:
    """Merge `src` into `dst` in place: nested dicts merge, anything else replaces; provenance follows the values."""
    for key, value in src.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(dst.get(key), str):
            dst[key] = {"name": dst[key]}  # `method: kd` then `method.tau=2`: the shorthand is {name: kd}
            if path in dst_prov:
                dst_prov[path + ("name",)] = dst_prov[path]
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], dst_prov, value, src_prov, path)
            continue
        dst[key] = copy.deepcopy(value)
        for stale in [p for p in dst_prov if p[: len(path)] == path]:
            del dst_prov[stale]
        dst_prov.update({p: s for p, s in src_prov.items() if p[: len(path)] == path})


class _Builder:
    """Builds a Config from a raw tree, collecting every error with the source of the offending value."""

    def __init__(self, provenance: _Provenance, default_source: str) -> None:
        self.provenance, self.default_source = provenance, default_source
        self.errors: list[str] = []

    def source_of(self, path: _KeyPath) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in self.provenance:
                return self.provenance[path[:end]]
        return self.default_source

    def error(self, path: _KeyPath, message: str) -> None:
        self.errors.append(f"{self.source_of(path)}: {message}")

    def raise_if_errors(self) -> None:
        if len(self.errors) == 1:
            raise ConfigError(self.errors[0])
        if self.errors:
            raise ConfigError(f"{len(self.errors)} config errors:\n" + "\n".join(f"  - {e}" for e in self.errors))

    def build(self, raw: Any) -> Config:
        """The validated Config of `raw` (field and cross-field rules); raises ConfigError listing all errors."""
        cfg = self._section(Config, raw, ())
        self.raise_if_errors()
        assert cfg is not None  # no errors → built
        for path, message in _cross_field_problems(cfg):
            self.error(path, message)
        self.raise_if_errors()
        return cfg

    def _section(self, cls: type, data: Any, path: _KeyPath, owner: str | None = None) -> Any:
        """The section `cls` built from `data`, or None after reporting its errors; `owner` names the component
        whose options these are (a key it does not read is reported as such)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        where = f"in '{'.'.join(path)}'" if path else "at top level"
        if not isinstance(data, dict):
            self.error(
                path,
                f"'{'.'.join(path)}' is a section and must be a mapping of keys, got {_describe(data)}; "
                f"write its keys indented under '{path[-1]}:' (valid keys {where}: {', '.join(fields)})",
            )
            return None
        errors_before = len(self.errors)
        hints = _type_hints(cls)
        kwargs, named = {}, []
        for key, value in data.items():
            dotted = ".".join(map(str, path + (key,)))
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" Did you mean '{'.'.join(path + (close[0],))}'?" if close else ""
                whose = f" (the options of {owner}: a key it does not read is an error)" if owner else ""
                self.error(path + (key,),
                           f"unknown key '{dotted}'.{hint} Valid keys {where}: {', '.join(fields)}{whose}")
            elif hints[key] in _NAMED_SECTIONS:
                named.append((key, value))
            elif dataclasses.is_dataclass(hints[key]):
                kwargs[key] = self._section(hints[key], value, path + (key,))
            else:
                try:
                    kwargs[key] = _validated(fields[key], hints[key], value)
                except _FieldError as err:
                    self.error(path + (key,), f"'{dotted}' {err}")
        if len(self.errors) > errors_before:
            return None  # reported before the components' options are read: that imports the components (torch)
        for key, value in named:
            kwargs[key] = self._named_section(hints[key], value, path + (key,))
        if len(self.errors) > errors_before:
            return None
        section = cls(**kwargs)
        for key, message in section.problems():
            self.error(path + (key,), message)
        return section

    def _named_section(self, base: type, data: Any, path: _KeyPath) -> Any:
        """A section whose options class is chosen by its `name` (a bare string is the name alone)."""
        data = {"name": data} if isinstance(data, str) else data
        name = data.get("name", base.name) if isinstance(data, dict) else None
        if not isinstance(name, str):
            return self._section(base, data, path)  # reports the shape or type problem
        try:
            options = _NAMED_SECTIONS[base](name)
        except UserError as err:
            self.error(path + ("name",), f"'{'.'.join(path)}.name': {err}")
            return None
        foreign = [k for k in data if k not in {f.name for f in dataclasses.fields(options)}
                   and self.source_of(path + (k,)) != self.source_of(path + ("name",))]
        if foreign:  # e.g. method.name=pkt over a base file that sets DKD's options
            dotted = ".".join(path)
            self.error(path + ("name",), (
                f"'{dotted}.name' is '{name}', but {', '.join(f'{dotted}.{k}' for k in foreign)} (set by "
                f"{self.source_of(path + (foreign[0],))}) are not options of {name}: replace the whole section, "
                f"e.g. {dotted}={name} or {dotted}={{name: {name}, ...}}"
            ))
            return None
        return self._section(options, data, path, owner=f"{path[-1]} '{name}'")


# Sections whose options class is looked up by the section's `name` among the registered components.
_NAMED_SECTIONS: dict[type, Any] = {
    MethodConfig: lambda name: method_class(name).Options,
    DataConfig: dataset_options_class,
    TemperatureConfig: lambda name: temperature_class(name).Options,
    CurriculumConfig: lambda name: curriculum_class(name).Options,
}


# --------------------------------------------------------------------------------------------------------------------
# Loading, saving and comparing configs
# --------------------------------------------------------------------------------------------------------------------


def _read_tree(path: Path, chain: tuple[tuple[Path, str], ...]) -> tuple[dict, _Provenance]:
    """The merged raw tree of a config file and its `_base_` files, with the provenance of every key."""
    shown = os.path.normpath(path)
    resolved = path.resolve()
    if any(resolved == seen for seen, _ in chain):
        names = [name for _, name in chain] + [shown]
        raise ConfigError(f"{chain[-1][1]}: _base_ cycle: {' → '.join(names)}; remove one of these _base_ entries")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        where = f"{chain[-1][1]}: _base_ file" if chain else "config file"
        raise ConfigError(f"{where} '{shown}' cannot be read: {err.strerror or err}") from None
    data = _parse_yaml(text, shown)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: a config file must be a mapping of keys at top level, got {_describe(data)}")
    bases = data.pop(_BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{shown}: '{_BASE_KEY}' must be a path or a list of paths, got {_describe(bases)}")
    tree: dict = {}
    provenance: _Provenance = {}
    for base in bases:  # in order: later bases win
        base_tree, base_prov = _read_tree(path.parent / base, chain + ((resolved, shown),))
        _merge(tree, provenance, base_tree, base_prov)
    _merge(tree, provenance, data, {p: shown for p in _paths(data)})
    return tree, provenance


def _override_tree(item: str) -> tuple[dict, str]:
    """The nested dict that a `KEY=VALUE` override sets, and the source name of the override."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            f"override '{item}' must look like KEY=VALUE with a dotted KEY, "
            "e.g. 'optimizer.lr=0.1', 'optimizer.lr_decay_epochs=[30,60]' or 'teacher.checkpoint=null'"
        )
    source = f"command-line override '{item}'"
    tree: Any = _parse_yaml(value, source)
    for part in reversed(parts):
        tree = {part: tree}
    return tree, source


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file (with its `_base_` files), apply `KEY=VALUE` overrides and validate strictly.

    `output_dir` left unset is derived from the file's name (see `default_output_dir`). Raises ConfigError naming
    the file or override.
    """
    path = Path(path)
    raw, provenance = _read_tree(path, ())
    if provenance.get(("output_dir",), os.path.normpath(path)) != os.path.normpath(path):
        # A run directory belongs to the experiment of the file that names it: a config built on another one with
        # `_base_` is a new experiment and gets its own default, instead of writing into the base's runs.
        del raw["output_dir"], provenance[("output_dir",)]
    _apply_overrides(raw, provenance, overrides)
    cfg = _Builder(provenance, os.path.normpath(path)).build(raw)
    if cfg.output_dir is None:
        cfg = dataclasses.replace(cfg, output_dir=default_output_dir(path))
    return cfg


def _apply_overrides(raw: dict, provenance: _Provenance, overrides: Sequence[str]) -> None:
    """Merge `KEY=VALUE` overrides into a raw tree in place, recording each as the source of its keys."""
    for item in overrides:
        tree, source = _override_tree(item)
        _merge(raw, provenance, tree, {p: source for p in _paths(tree)})


def default_output_dir(path: Path) -> str:
    """'runs/' + the config's path below its nearest `configs` folder, without '.yaml'.

    configs/cifar100/ctkd/resnet56_resnet20.yaml → runs/cifar100/ctkd/resnet56_resnet20, so the KD and CTKD configs of
    the same pair never share a run directory; a file outside any `configs` folder → runs/<its stem>.
    """
    parts = path.resolve().with_suffix("").parts
    if "configs" in parts:
        below = parts[len(parts) - 1 - parts[::-1].index("configs") + 1:]
        return "/".join(("runs", *below))
    return f"runs/{path.stem}"


def config_from_dict(data: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> Config:
    """Validate a plain dict (e.g. the config stored in a checkpoint), with `KEY=VALUE` overrides applied, as
    strictly as a file; `source` names it in errors."""
    raw, provenance = copy.deepcopy(dict(data)), {}
    _apply_overrides(raw, provenance, overrides)
    cfg = _Builder(provenance, source).build(raw)
    if cfg.output_dir is None:
        raise ConfigError(f"{source}: 'output_dir' must be set; a resolved config always names its run directory")
    return cfg


def upgrade_saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version (a checkpoint's) in today's schema, the same experiment:
    synthetic's keys moved from data.synthetic to data; temperature and curriculum sections hold the options of the
    selected component only, and sections that the experiment never read (see `_unused_section_problems`) are
    back at their defaults, whatever an earlier version saved in them."""
    config = copy.deepcopy(config)
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("synthetic"), dict):
        synthetic = data.pop("synthetic")
        if data.get("name") == "synthetic":
            data.update(synthetic)
    for section, lookup in (("temperature", temperature_class), ("curriculum", curriculum_class)):
        values = config.get(section)
        if isinstance(values, dict) and isinstance(values.get("name"), str):
            try:
                keys = {f.name for f in dataclasses.fields(lookup(values["name"]).Options)}
            except UserError:
                continue  # an unknown name: validation reports it
            config[section] = {k: v for k, v in values.items() if k in keys}
    method = config.get("method")
    name = method.get("name") if isinstance(method, dict) else method
    temperature = config.get("temperature")
    try:
        uses_teacher = method_class(name).uses_teacher if isinstance(name, str) else True
        chosen = temperature.get("name", "global") if isinstance(temperature, dict) else None
        fixed = chosen is not None and not temperature_class(chosen).Options.learnable
    except UserError:
        return config  # an unknown name: validation reports it
    unused = ("loss", "temperature", "curriculum") if not uses_teacher else ("curriculum",) if fixed else ()
    for section in unused:
        config.pop(section, None)
    return config


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as nested plain dicts, lists and scalars, for YAML, JSON and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return list(value) if isinstance(value, tuple) else value

    return plain(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The config as the YAML text of a run's `config.yaml` (loadable as a config file)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML atomically (see ctkd.fileio); creates the folder."""
    atomic_write_text(path, config_to_yaml(cfg))


# Keys that say where data and outputs live and how a run is launched, logged and laid out in memory: two runs that
# differ only in them are the same experiment (the results agree, up to float rounding for device and runtime.*).
PLACEMENT_KEYS = (
    "output_dir", "device", "data.root", "data.download", "data.num_workers", "data.test_batch_size",
    "teacher.checkpoint", "teacher.train_config", "logging.", "checkpoint.", "distributed.",
    "runtime.data_on_device", "runtime.tune_malloc",  # where batches are made, where memory comes from: same numbers
    # the layout and the teacher's folded BatchNorms change float rounding only, as a change of device does (and
    # their defaults changed: a run checkpointed with the former ones resumes under the new)
    "runtime.channels_last", "runtime.fold_teacher_bn",
)


def is_placement_key(key: str) -> bool:
    """Whether dotted `key` is one of PLACEMENT_KEYS (an entry ending in '.' covers its section)."""
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in PLACEMENT_KEYS)


def experiment_differences(ours: Mapping[str, Any], planned: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, our value, planned value) for every key outside PLACEMENT_KEYS whose value differs between two configs
    given as nested plain dicts (config.yaml's, config_to_dict's); a key one of them lacks has the value None."""
    a, b = flatten_keys(ours), flatten_keys(planned)
    keys = list(a) + [key for key in b if key not in a]
    return [(key, a.get(key), b.get(key)) for key in keys if not is_placement_key(key) and a.get(key) != b.get(key)]


def flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict keyed by dotted keys (e.g. "optimizer.lr"); lists and empty dicts are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:  # an empty mapping (kwargs: {}) is a leaf of its own
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    """A value as YAML spells it, for diff lines."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def diff_configs(a: Config, b: Config) -> list[str]:
    """Lines "key: old → new", one per dotted key whose value differs between `a` (old) and `b` (new)."""
    old, new = flatten_keys(config_to_dict(a)), flatten_keys(config_to_dict(b))
    keys = list(old) + [key for key in new if key not in old]  # free-form sections (kwargs) may gain keys
    missing = "(unset)"
    return [f"{key}: {_show(old.get(key, missing))} → {_show(new.get(key, missing))}"
            for key in keys if old.get(key, missing) != new.get(key, missing)]
