"""Configs as plain dicts with dotted keys: flattening them, and which keys place a run rather than define its
experiment (two runs that differ only in those are the same experiment)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
