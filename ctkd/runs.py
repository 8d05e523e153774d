"""Run directories as reports see them: reading finished and unfinished runs (config.yaml, metrics.jsonl,
results.json), the state of a run from its files, and the one-row summaries of scripts/summarize_runs.py.

Only json, yaml and the standard library are used here, so the report scripts start quickly and never import torch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ctkd.errors import UserError
from ctkd.keys import experiment_differences
from ctkd.locks import is_locked, lock_holder

T = TypeVar("T")

RUN_MARKERS = ("config.yaml", "metrics.jsonl")  # train.py writes config.yaml first, then one metrics line per epoch


class RunFileError(UserError, ValueError):
    """A file of a run directory that exists but cannot be read or parsed."""


@dataclass(frozen=True)
class RunSummary:
    """One run's state and headline numbers, as the run summary table shows them."""

    name: str  # path of the run directory relative to the searched folder
    path: Path
    method: str | None = None
    teacher: str | None = None  # None for runs without a teacher (vanilla)
    student: str | None = None
    temperature: str | None = None  # None for runs without a teacher (vanilla)
    seed: int | None = None
    best_acc1: float | None = None
    best_epoch: int | None = None
    last_acc1: float | None = None
    final_tau: float | None = None  # tau_last of the last finished epoch
    epochs_done: int = 0
    epochs_planned: int | None = None
    status: str = "not started"

    @property
    def models(self) -> str:
        """'teacher → student', or just the student for runs without a teacher."""
        student = self.student or "?"
        return f"{self.teacher} → {student}" if self.teacher else student


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a run directory written by train.py."""
    return any((path / marker).is_file() for marker in RUN_MARKERS)


def find_runs(root: str | Path) -> list[Path]:
    """Run directories at or below `root`, sorted by their path relative to `root`."""
    root = Path(root)
    found = [Path(folder) for folder, _, files in os.walk(root) if any(m in files for m in RUN_MARKERS)]
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def _read_text(path: Path) -> str:
    """The file's text; an unreadable file (permissions, bad encoding) becomes a RunFileError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RunFileError(f"cannot read {path.name}: {err}") from err


def read_metrics(run_dir: str | Path, stages: bool = False) -> list[dict[str, Any]]:
    """The per-epoch records of `metrics.jsonl` ([] when absent): the distillation epochs, and the epochs of a method's
    initialisation stages (records with a "stage" key, run epochs ≤ 0) only when `stages`.

    A last line that is not valid JSON was cut short by a crash mid-append and is ignored (train.py drops it too on
    resume); a damaged line elsewhere raises RunFileError.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in _read_text(path).splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise RunFileError(f"metrics.jsonl line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunFileError(f"metrics.jsonl line {number} is not an epoch record")
        if stages or "stage" not in record:
            records.append(record)
    return records


def read_results(run_dir: str | Path) -> dict[str, Any] | None:
    """The contents of `results.json`, or None when the run has not finished (no file)."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RunFileError(f"results.json is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunFileError("results.json is not a JSON object")
    return data


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config in `config.yaml` as a plain dict (not re-validated: old runs may predate a schema change)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunFileError("config.yaml is missing")
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise RunFileError(f"config.yaml is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunFileError("config.yaml is not a mapping")
    return data


def config_value(config: Mapping[str, Any], dotted_key: str) -> Any:
    """The value at a dotted key such as 'teacher.name', or None when any part is missing."""
    value: Any = config
    for part in dotted_key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _method_name(config: Mapping[str, Any]) -> str | None:
    """The method's name: `method.name`, or `method` itself in configs written before methods had options."""
    method = config.get("method")
    return config_value(config, "method.name") if isinstance(method, Mapping) else method


def _number(value: Any) -> float | None:
    """`value` as a float when it is a number (JSON null and junk become None)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _best(records: list[dict[str, Any]]) -> tuple[float | None, int | None]:
    """Best test top-1 over the records and its first epoch (the trainer keeps the first of equal bests)."""
    scored = [(acc, record["epoch"]) for record in records if (acc := _number(record.get("test_acc1"))) is not None]
    if not scored:
        return None, None
    best = max(acc for acc, _ in scored)
    return best, next(epoch for acc, epoch in scored if acc == best)


# ------------------------------------------------------------------------------------------------ the state of a run
RUN_STATES = ("done", "running", "interrupted", "failed", "not started")
FAILED_FILE = "FAILED"  # written when a run ends in an error: its exit status, the reason, the command


@dataclass(frozen=True)
class RunStatus:
    """What a run directory holds, read from its files alone: its state, why (a failure's reason, the lock's holder,
    a damaged file) and, when compared with a plan, the experiment keys in which it differs from it."""

    state: str  # one of RUN_STATES
    detail: str = ""
    epochs_done: int = 0
    epochs_planned: int | None = None  # what its own config.yaml plans
    differences: tuple[tuple[str, Any, Any], ...] = ()  # (key, this run's value, the plan's)

    @property
    def matches_plan(self) -> bool:
        """Whether the run is the experiment it was compared with (no difference outside the placement keys)."""
        return not self.differences

    def describe(self, plan_name: str = "the table") -> str:
        """'done', 'failed: <reason>', or 'done with epochs=1, data.name=synthetic; <plan_name> plans 240, cifar100'."""
        text = self.state
        if self.differences:
            ours = ", ".join(f"{key}={_shown(value)}" for key, value, _ in self.differences)
            theirs = ", ".join(f"{key}={_shown(value)}" for key, _, value in self.differences)
            text = f"{text} with {ours}; {plan_name} plans {theirs}"
        return f"{text}: {self.detail}" if self.detail else text


def _shown(value: Any) -> str:
    """A config value as YAML spells it, for status lines."""
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _has_checkpoint(path: Path) -> bool:
    """Whether the run left a checkpoint to continue from (the series or, from earlier versions, last.pth)."""
    return (path / "last.pth").is_file() or any(path.glob("ckpt-e*-s*.pth"))


def _failure_reason(path: Path) -> str:
    """The reason recorded in the run's FAILED marker (its second line), or its first when there is no other."""
    try:
        lines = [line for line in (path / FAILED_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return "(FAILED marker unreadable)"
    return lines[1] if len(lines) > 1 else (lines[0] if lines else "(no reason recorded)")


def inspect_run(run_dir: str | Path, plan: Mapping[str, Any] | None = None) -> RunStatus:
    """The state of the run in `run_dir` from what the directory holds (config.yaml, results.json, metrics.jsonl,
    checkpoints, its lock and FAILED marker), never from how it was started; with `plan` (a config as nested plain
    dicts), also how the run differs from that experiment."""
    path = Path(run_dir)
    problems: list[str] = []
    config = _attempt(read_config, path, {}, problems) if (path / "config.yaml").exists() else {}
    records = _attempt(read_metrics, path, [], problems)
    results = _attempt(read_results, path, None, problems)
    epochs = config_value(config, "epochs")
    planned = epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None
    done_epochs = records[-1]["epoch"] if records else 0
    differences = tuple(experiment_differences(config, plan)) if plan is not None and config else ()
    if results is not None and planned is not None and results.get("epochs") == planned:
        state, detail = "done", ""  # a results.json of an earlier, shorter run resumed for more epochs is not
    elif is_locked(path):
        state, detail = "running", lock_holder(path)
    elif (path / FAILED_FILE).is_file():
        state, detail = "failed", _failure_reason(path)
    elif _has_checkpoint(path) or records:
        state, detail = "interrupted", ""
    else:
        state, detail = "not started", ""
    if problems and state != "running":
        detail = "; ".join([*problems, *([detail] if detail else [])])
        if state == "done":
            state = "interrupted"  # its records cannot be trusted to say it finished
    return RunStatus(state, detail, done_epochs, planned, differences)


def _attempt(read: Callable[[Path], T], path: Path, default: T, problems: list[str]) -> T:
    """`read(path)`, or `default` with the reason appended to `problems` when the file is damaged."""
    try:
        return read(path)
    except RunFileError as err:
        problems.append(str(err))
        return default


def summarize_run(run_dir: str | Path, root: str | Path | None = None) -> RunSummary:
    """Summarise one run directory; never raises for a damaged run (its status says 'unreadable: <reason>')."""
    path = Path(run_dir)
    if root is not None and path.resolve() != Path(root).resolve():
        name = path.relative_to(root).as_posix()
    else:
        name = path.resolve().name
    problems: list[str] = []
    # each file is read on its own, so one damaged file still leaves the others' numbers in the table
    config = _attempt(read_config, path, {}, problems)
    records = _attempt(read_metrics, path, [], problems)
    results = _attempt(read_results, path, None, problems)
    planned = config_value(config, "epochs")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    found = inspect_run(path)
    status = found.describe() if found.state in ("failed", "running") else found.state
    if found.state == "done" and results is not None:
        best_acc1, best_epoch = _number(results.get("best_acc1")), results.get("best_epoch")
    else:
        best_acc1, best_epoch = _best(records)
    # validated configs only set teacher.* for methods that distil, so teacher.name tells whether τ means anything
    teacher = config_value(config, "teacher.name")
    seed = config_value(config, "seed")
    last = records[-1] if records else {}
    return RunSummary(
        name=name,
        path=path,
        method=_method_name(config),
        teacher=teacher,
        student=config_value(config, "student.name"),
        temperature=config_value(config, "temperature.name") if teacher else None,
        seed=seed if isinstance(seed, int) else None,
        best_acc1=best_acc1,
        best_epoch=best_epoch if isinstance(best_epoch, int) else None,
        last_acc1=_number(last.get("test_acc1")),
        final_tau=_number(last.get("tau_last")),
        epochs_done=last.get("epoch", 0),
        epochs_planned=planned,
        status=f"unreadable: {'; '.join(problems)}" if problems else status,
    )


def summarize_runs(root: str | Path) -> list[RunSummary]:
    """Summaries of every run directory at or below `root`, sorted by path."""
    return [summarize_run(path, root) for path in find_runs(root)]
