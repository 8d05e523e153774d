"""The plan of a table's runs (docs/tables.md): one train.py command per (cell, seed), and the teachers they need
first, each with the experiment it trains (a resolved config) to compare with what its run directory holds."""
from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctkd.errors import UserError
from ctkd.runs import RunStatus, inspect_run
from ctkd.tables import Cell, Table, run_dir, teacher_run_dir


@dataclass
class Job:
    """One train.py run: a teacher, or a (cell, seed)."""

    label: str
    run_dir: Path
    argv: list[str]  # the train.py command line without the interpreter
    plan: dict[str, Any]  # the experiment this run trains, as a resolved config of plain types
    cell: Cell | None = None  # None for a teacher
    needs: str | None = None  # label of the teacher job this run waits for

    @property
    def command(self) -> str:
        """The command as a user would type it."""
        return shlex.join(["python", *self.argv])

    def status(self) -> RunStatus:
        """What the run directory holds, compared with this job's experiment."""
        return inspect_run(self.run_dir, self.plan)


@dataclass
class Plan:
    """The jobs of one invocation: teachers first, then cells in table order."""

    teachers: list[Job] = field(default_factory=list)
    cells: list[Job] = field(default_factory=list)

    @property
    def jobs(self) -> list[Job]:
        """Teachers first, so that one slot trains them before the cells that need them."""
        return [*self.teachers, *self.cells]


def _load(config: str, overrides: Sequence[str], where: str) -> Any:
    """The validated config; an error names the table entry it came from."""
    from ctkd.config import load_config  # imports the components (torch): only when a table is planned

    try:
        return load_config(config, overrides)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def _plain(cfg: Any, **changes: Any) -> dict[str, Any]:
    """A validated config (with `changes`) as nested plain dicts, the form of a run's config.yaml."""
    import dataclasses

    from ctkd.config import config_to_dict

    return config_to_dict(dataclasses.replace(cfg, **changes))


def _teacher_job(table: Table, name: str, config: str, root: Path, common: Sequence[str] = ()) -> Job:
    """The run that trains teacher `name` once for the whole table."""
    where = f"{table.path}: teachers.{name}"
    cfg = _load(config, common, where)
    if cfg.student.name != name:
        raise UserError(f"{where}: {config} trains {cfg.student.name}, not {name}")
    directory = teacher_run_dir(table, name, root)
    argv = ["train.py", "--config", config, *common, f"output_dir={directory}", "--resume", "auto"]
    return Job(f"teacher {name}", directory, argv, _plain(cfg))


def _teacher_config(table: Table, cell: Cell, cfg: Any) -> str:
    """The config that trains the cell's missing teacher: the table's entry, else the config's teacher.train_config."""
    config = table.teachers.get(cfg.teacher.name) or cfg.teacher.train_config
    if config is None:
        raise UserError(
            f"{table.path}: cells.{cell.row}.{cell.column}: teacher.checkpoint {cfg.teacher.checkpoint} does not exist "
            f"and the table has no 'teachers.{cfg.teacher.name}' entry to train it; add one or download the teacher"
        )
    return config


def make_plan(
    table: Table, seeds: Sequence[int], root: Path, only_index: int | None = None, common: Sequence[str] = ()
) -> Plan:
    """Every job of the table (or of its run number `only_index`), with the teachers the cells need; `common`
    overrides (e.g. data.root=...) apply to every run, after the cell's own."""
    runs = table.runs(seeds)
    if only_index is not None:
        if not 0 <= only_index < len(runs):
            raise UserError(f"--only-index {only_index} is out of range: the table has {len(runs)} runs "
                            f"(0..{len(runs) - 1})")
        runs = [runs[only_index]]
    plan, teachers, configs = Plan(), {}, {}
    for cell, seed in runs:
        where = f"{table.path}: cells.{cell.row}.{cell.column}"
        if cell not in configs:  # one load per cell: the seed does not change the epochs or the teacher
            configs[cell] = _load(cell.config, (*cell.overrides, *common), where)
        cfg = configs[cell]
        directory = run_dir(table, cell, seed, root)
        extra, needs = [f"output_dir={directory}", f"seed={seed}"], None
        # a published teacher file at the configured path always wins over training one
        if cfg.teacher.checkpoint is not None and not Path(cfg.teacher.checkpoint).is_file():
            name = cfg.teacher.name
            if name not in teachers:
                teachers[name] = _teacher_job(table, name, _teacher_config(table, cell, cfg), root, common)
                plan.teachers.append(teachers[name])
            extra.append(f"teacher.checkpoint={teachers[name].run_dir / 'best.pth'}")
            needs = teachers[name].label
        argv = ["train.py", "--config", cell.config, *cell.overrides, *common, *extra, "--resume", "auto"]
        plan.cells.append(Job(f"{cell.row}/{cell.column} seed {seed}", directory, argv, _plain(cfg, seed=seed), cell,
                              needs))
    return plan


MAX_COHORT = 16  # members per cohort by default (the plug-in table's rows have 14): one process holds them all


def cohort_units(plan: Plan, cap: int = MAX_COHORT) -> list[list[Job]]:
    """The plan's jobs as units of work: every teacher alone, then the cells grouped into cohorts (ctkd.cohort) of
    at most `cap` runs that share teacher, data, seed and schedule (and wait for the same teacher job), in table
    order; `cap` 1: every run alone."""
    from ctkd.cohort import shared_key  # torch: only when a table is planned

    units: list[list[Job]] = [[job] for job in plan.teachers]
    open_units: dict[str, list[Job]] = {}
    for job in plan.cells:
        key = shared_key(job.plan)
        if cap < 2 or key is None:
            units.append([job])
            continue
        key += f"|{job.needs}"
        unit = open_units.get(key)
        if unit is None or len(unit) >= cap:
            unit = open_units[key] = []
            units.append(unit)
        unit.append(job)
    return units


def cohort_argv(jobs: Sequence[Job]) -> list[str]:
    """One train.py command line for `jobs`: each --config with its own overrides, then --resume auto."""
    if len(jobs) == 1:
        return jobs[0].argv
    parts = ["train.py"]
    for job in jobs:
        assert job.argv[0] == "train.py" and job.argv[-2:] == ["--resume", "auto"]
        parts += job.argv[1:-2]
    return [*parts, "--resume", "auto"]
