"""Options: the typed, validated config sections that components own, and the base class of each kind's.

A section (a frozen dataclass deriving from `Section`) checks and converts every field when it is built: int → float,
list → tuple, ranges, choices; its fields carry their rules through `spec`. Each kind of component has a base here
(`MethodOptions`, `DataOptions`, `TemperatureOptions`, `CurriculumOptions`) whose `name` selects the component; a
component subclasses it in its own file. ctkd/config.py assembles the sections into an experiment's config and adds
where each value came from to the errors. This module imports no component and no torch: models, datasets and
methods import it, and a config error answers without loading them.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ctkd.errors import ConfigError
from ctkd.yamlio import parse_yaml


def spec(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    increasing: bool = False,
    bools: tuple[str, str] | None = None,
) -> Any:
    """A dataclass field with its validation rules in metadata (for a list field, `ge`/`gt` apply to each item).

    `bools` = (for true, for false): the choices a bool stands for, in a string field that once was a bool.
    """
    rules = {"ge": ge, "gt": gt, "lt": lt, "choices": choices, "increasing": increasing, "bools": bools}
    metadata = {k: v for k, v in rules.items() if v is not None and v is not False}
    return field(default=default, metadata=metadata)


class FieldError(Exception):
    """A problem with one field's value; the caller adds the key and the source."""


class Section:
    """Mixin for config dataclasses: type-checks, converts (int → float, list → tuple) and range-checks fields."""

    def __post_init__(self) -> None:
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            try:
                value = validated(f, hints[f.name], getattr(self, f.name))
            except FieldError as err:
                raise ConfigError(f"{type(self).__name__}.{f.name} {err}") from None
            object.__setattr__(self, f.name, value)  # frozen: store the converted value

    def problems(self) -> list[tuple[str, str]]:
        """Rules between this section's own fields, as (key the problem is reported at, message); none by default."""
        return []


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config dataclass (annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)


def _optional_inner(hint: Any) -> Any | None:
    """`X` for a hint `X | None`, else None."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _type_name(hint: Any) -> str:
    """A type as error messages show it: 'int', 'float or null', 'list of int'."""
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return "mapping of names to values"
    return "bool (true/false)" if hint is bool else hint.__name__


def describe(value: Any) -> str:
    """A value as the error messages show it: its type and its repr."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    return f"{type(value).__name__} {value!r}"


def _type_fix(hint: Any, value: Any) -> str:
    """How to fix a value of the wrong type."""
    if value is None:
        return "set a value (null is not allowed here)"
    if hint is bool:
        return "use true or false (in YAML 1.2, yes/no/on/off are strings)"
    if hint is str:
        return "quote it"
    if typing.get_origin(hint) is tuple:
        return "write a YAML list such as [150, 180, 210]"
    if typing.get_origin(hint) is dict:
        return "write a YAML mapping such as {drop_rate: 0.1}"
    if isinstance(value, str):
        try:
            parsed = parse_yaml(value, "<value>")
        except ConfigError:
            parsed = None
        if not isinstance(parsed, bool) and isinstance(parsed, int if hint is int else (int, float)):
            return "remove the quotes"
    return "write a whole number" if hint is int else "write a number"


def _coerce(hint: Any, value: Any) -> Any:
    """`value` checked against the type `hint` and converted (int → float, list → tuple); raises FieldError."""
    inner = _optional_inner(hint)
    if inner is not None and value is None:
        return None
    base = hint if inner is None else inner
    ok = False
    if dataclasses.is_dataclass(base) or base in (bool, str):
        ok = isinstance(value, base)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise FieldError(f"must be a finite number, got {value}")
        ok = True
    elif typing.get_origin(base) is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if ok:
            return dict(value)
    elif typing.get_origin(base) is tuple and isinstance(value, (list, tuple)):
        item_hint = typing.get_args(base)[0]
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_coerce(item_hint, item))
            except FieldError:
                raise FieldError(
                    f"expects {_type_name(hint)}, got {describe(list(value))} (item {index} is {describe(item)})"
                ) from None
        return tuple(items)
    if not ok:
        raise FieldError(f"expects {_type_name(hint)}, got {describe(value)}; {_type_fix(base, value)}")
    return value


def _range_text(rules: Mapping[str, Any]) -> str:
    """The allowed range of a numeric field as error messages show it: '> 0', '>= 1', 'in [0, 1)'."""
    low = f"[{rules['ge']}" if "ge" in rules else f"({rules['gt']}" if "gt" in rules else None
    if "lt" in rules:
        return f"in {low}, {rules['lt']})" if low else f"< {rules['lt']}"
    return f">= {rules['ge']}" if "ge" in rules else f"> {rules['gt']}"


def _check_rules(rules: Mapping[str, Any], value: Any) -> None:
    """Check a converted value against its field's metadata rules; raises FieldError."""
    items = value if isinstance(value, tuple) else (value,)
    each = "each item " if isinstance(value, tuple) else ""
    for item in items:
        choices = rules.get("choices")
        if choices and item not in choices:
            close = difflib.get_close_matches(str(item), choices, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise FieldError(f"must be one of {', '.join(choices)}; got {item!r}.{hint}")
        too_low = ("ge" in rules and item < rules["ge"]) or ("gt" in rules and item <= rules["gt"])
        if too_low or ("lt" in rules and item >= rules["lt"]):
            raise FieldError(f"{each}must be {_range_text(rules)}, got {list(value) if each else value!r}")
    if rules.get("increasing") and any(b <= a for a, b in zip(value, value[1:])):
        raise FieldError(f"must be strictly increasing, got {list(value)}; sort it and drop repeats")


def validated(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """The value of field `f`, type-checked, converted and range-checked; raises FieldError."""
    if isinstance(value, bool) and "bools" in f.metadata:
        value = f.metadata["bools"][0 if value else 1]
    value = _coerce(hint, value)
    if value is not None:
        _check_rules(f.metadata, value)
    return value


# --------------------------------------------------------------------------------------------------------------------
# The base of each kind of component's options: `name` selects the component among the registered ones
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodOptions(Section):
    """Base of every method's options (each declared beside its method in ctkd/methods/); `name` selects it.

    In YAML, ``method: kd`` is short for ``method: {name: kd}``; the other keys of the section are validated
    against the options of the method that `name` selects.
    """

    name: str = "kd"  # registered method (python -m ctkd list methods)


@dataclass(frozen=True)
class DataOptions(Section):
    """Base of every dataset's options (declared beside the dataset in datasets/); `name` selects the dataset.

    The keys here are common to all datasets (where the files are, the loaders); each dataset adds its own, e.g.
    ``num_classes`` for `synthetic` or ``image_size`` for `imagenet`. ``data: synthetic`` is short for
    ``data: {name: synthetic}``.
    """

    name: str = "cifar100"  # registered dataset (python -m ctkd list datasets)
    root: str = "./data"  # folder that holds (or receives) the dataset files
    download: bool = False  # download the dataset into `root` when it is missing
    batch_size: int = spec(64, ge=1)  # global training batch size (summed over all processes)
    test_batch_size: int | None = spec(None, ge=1)  # evaluation batch size; None → max(1, batch_size // 2)
    num_workers: int = spec(4, ge=0)  # data-loader worker processes per training process

    @property
    def effective_test_batch_size(self) -> int:
        """The evaluation batch size: `test_batch_size`, or half the training batch as in the authors' protocol."""
        return self.test_batch_size if self.test_batch_size is not None else max(1, self.batch_size // 2)

    def dataset_options(self) -> dict[str, Any]:
        """The keys the dataset adds to the common ones, as keyword arguments of its builder."""
        common = {f.name for f in dataclasses.fields(DataOptions)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in common}


@dataclass(frozen=True)
class TemperatureOptions(Section):
    """Base of every temperature's options (declared beside each in ctkd/temperatures/); `name` selects it.

    ``temperature: fixed`` is short for ``temperature: {name: fixed}``; the other keys are validated against the
    options of the temperature `name` selects (a key it does not read is an error).
    """

    learnable: ClassVar[bool] = False  # whether τ has parameters (trained, with a curriculum on λ)
    name: str = "global"  # registered temperature (python -m ctkd list temperatures)


@dataclass(frozen=True)
class CurriculumOptions(Section):
    """Base of every curriculum's options (declared beside each in ctkd/curricula/); `name` selects it.

    The curriculum sets λ, the gradient-reversal strength that makes a learned τ adversarial, per epoch.
    """

    name: str = "cosine"  # registered curriculum (python -m ctkd list curricula)


@dataclass(frozen=True)
class LossConfig(Section):
    """Weights of the loss terms: loss = ce_weight · CE + kd_weight · KD(τ)."""

    ce_weight: float = spec(0.1, ge=0)  # weight γ of the cross-entropy with the labels
    kd_weight: float = spec(0.9, ge=0)  # weight α of the distillation term
