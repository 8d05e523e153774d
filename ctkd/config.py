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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ctkd.errors import ConfigError, UserError
from ctkd.fileio import atomic_write_text
from ctkd.keys import flatten_keys
from ctkd.options import FieldError, describe, type_hints, validated
from ctkd.schema import (  # noqa: F401  (the schema's names are part of this module's interface)
    SYNC_BN_NEEDS_CUDA,
    CheckpointConfig,
    Config,
    CurriculumOptions,
    DataOptions,
    DistributedConfig,
    LoggingConfig,
    LossConfig,
    MethodOptions,
    ModelConfig,
    OptimizerConfig,
    RuntimeConfig,
    TeacherConfig,
    TemperatureOptions,
    config_to_dict,
    cross_field_problems,
    curriculum_class,
    dataset_options_class,
    method_class,
    named_section_options,
    temperature_class,
)
from ctkd.yamlio import Dumper, parse_yaml

_BASE_KEY = "_base_"
_KeyPath = tuple[Any, ...]  # a dotted key as a tuple of its parts: ("optimizer", "lr")

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
        for path, message in cross_field_problems(cfg):
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
                f"'{'.'.join(path)}' is a section and must be a mapping of keys, got {describe(data)}; "
                f"write its keys indented under '{path[-1]}:' (valid keys {where}: {', '.join(fields)})",
            )
            return None
        errors_before = len(self.errors)
        hints = type_hints(cls)
        kwargs, named = {}, []
        for key, value in data.items():
            dotted = ".".join(map(str, path + (key,)))
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" Did you mean '{'.'.join(path + (close[0],))}'?" if close else ""
                whose = f" (the options of {owner}: a key it does not read is an error)" if owner else ""
                self.error(path + (key,),
                           f"unknown key '{dotted}'.{hint} Valid keys {where}: {', '.join(fields)}{whose}")
            elif named_section_options(hints[key]) is not None:
                named.append((key, value))
            elif dataclasses.is_dataclass(hints[key]):
                kwargs[key] = self._section(hints[key], value, path + (key,))
            else:
                try:
                    kwargs[key] = validated(fields[key], hints[key], value)
                except FieldError as err:
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
            options = named_section_options(base)(name)
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
    data = parse_yaml(text, shown)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: a config file must be a mapping of keys at top level, got {describe(data)}")
    bases = data.pop(_BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{shown}: '{_BASE_KEY}' must be a path or a list of paths, got {describe(bases)}")
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
    tree: Any = parse_yaml(value, source)
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


def config_to_yaml(cfg: Config) -> str:
    """The config as the YAML text of a run's `config.yaml` (loadable as a config file)."""
    return yaml.dump(config_to_dict(cfg), Dumper=Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML atomically (see ctkd.fileio); creates the folder."""
    atomic_write_text(path, config_to_yaml(cfg))


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
