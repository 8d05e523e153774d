"""YAML as configs are read and written: YAML 1.2 booleans and floats, and duplicate keys refused.

PyYAML reads YAML 1.1, whose traps silently change an experiment: a duplicate key keeps the last value, `1e-3` is a
string, `yes` is True. The loader here closes them without touching PyYAML's global SafeLoader.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from typing import Any

import yaml

from ctkd.errors import ConfigError

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


class Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings a YAML 1.2 reader would take for floats (e.g. '1e-3')."""

    yaml_implicit_resolvers = {
        first: [*entries, *(e for e in _StrictLoader.yaml_implicit_resolvers.get(first, []) if e[0] == _FLOAT_TAG)]
        for first, entries in yaml.SafeDumper.yaml_implicit_resolvers.items()
    }


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the strict loader; `source` names the text in error messages."""
    loader = _StrictLoader(text)
    loader.name = source  # marks (line numbers in errors) carry this name
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    finally:
        loader.dispose()
