"""Cohorts: several runs that share their teacher, data, seed and schedule, trained in one process (docs/cohorts.md).

Every batch is a pure function of (seed, epoch, index), so the members of a cohort see the same batches in the same
order: one loader makes each batch once, one teacher forward per batch (and per kind of teacher view: logits, or
features, or pre-activation features) serves every member, then each member takes its own step. Each member is an
ordinary run (`ctkd.trainer`): its own Trainer, run directory, lock, checkpoints, metrics and RNG streams.

How. Each member's epoch loop runs unchanged as a coroutine of its own (a greenlet: all on the one training thread,
so one OpenMP thread team serves every member, and no member's thread-local torch state is another's): a member
runs until it asks for its next batch (`Cohort.request`), then hands over. The coordinator serves the members
that are furthest behind first: all the members at the same (epoch, step) get the same batch and the same teacher
outputs; a member behind the others (one resumed from an older checkpoint, or training its initialisation stages)
catches up alone. Before a member runs, the coordinator puts back its RNG states (Python, NumPy, torch CPU and CUDA),
and takes them again when it hands over: each member's random streams are exactly those it has as a separate run.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from greenlet import greenlet
from torch import Tensor

from ctkd.build import RunData, build_data, check_inputs, close_loader
from ctkd.checkpoint import capture_rng_state, restore_rng_state
from ctkd.config import Config, ConfigError
from ctkd.datasets.loader import Batch
from ctkd.distiller import Distiller
from ctkd.distributed import DistributedContext, broadcast_object, claim_run_directory, init_distributed
from ctkd.errors import UserError
from ctkd.locks import RunLock, RunLockedError
from ctkd.logging import get_logger
from ctkd.methods import METHODS, TeacherOutput
from ctkd.preemption import STOP, StopRequested
from ctkd.resume import resolve_resume
from ctkd.runs import inspect_run
from ctkd.schema import config_to_dict
from ctkd.step import EpochRun, on_device
from ctkd.system import set_cublas_workspace
from ctkd.teacher import ensure_teacher_checkpoint
from ctkd.trainer import Trainer, build_run_experiment, prepare_trainer, run, train_prepared

# what the members of a cohort share: the rest (student, method, temperature, curriculum, loss weights, optimizer,
# logging, checkpoints, output_dir) may differ
SHARED_SECTIONS = ("teacher", "data", "seed", "epochs", "runtime", "distributed", "device")


def shared_key(plain: dict[str, Any]) -> str | None:
    """What a run (its config as nested plain dicts, as in config.yaml) shares with the other members of its cohort,
    as one string: runs with equal keys can share one; None for a method without teacher (no cohort)."""
    if not METHODS.get(plain["method"]["name"]).uses_teacher:
        return None
    return json.dumps({name: plain[name] for name in SHARED_SECTIONS}, sort_keys=True, default=str)


def check_cohort(cfgs: Sequence[Config], sources: Sequence[str]) -> None:
    """Members that can train together: equal SHARED_SECTIONS, distinct output directories, a teacher."""
    first = config_to_dict(cfgs[0])
    for cfg, source in zip(cfgs, sources):
        plain = config_to_dict(cfg)
        if shared_key(plain) is None:
            raise ConfigError(f"{source}: method {cfg.method.name} has no teacher to share; train it on its own")
        for name in SHARED_SECTIONS:
            if plain[name] != first[name]:
                raise ConfigError(
                    f"{source}: '{name}' differs from {sources[0]}'s ({plain[name]!r} vs {first[name]!r}); the "
                    f"members of a cohort share {', '.join(SHARED_SECTIONS)}: train it in another cohort")
    dirs = [str(Path(cfg.output_dir).resolve()) for cfg in cfgs]
    for index, directory in enumerate(dirs):
        if directory in dirs[:index]:
            raise ConfigError(f"{sources[index]}: output_dir {directory} is also {sources[dirs.index(directory)]}'s; "
                              "every member needs its own")


class SharedTeacher:
    """The teacher outputs of the batch being served, each view computed once, by the first member that asks.

    A member that changed one of them (or the batch's images) in place would hand the next member other inputs than
    its separate run sees: the version counters are checked when a member hands over (`tampered`), and that member
    stops with an error while the others get the views (and images) afresh.
    """

    def __init__(self) -> None:
        self.images: Tensor | None = None
        self.image_version = 0
        self.views: dict[tuple[int, bool, bool], tuple[TeacherOutput, list[int]]] = {}

    def begin(self, images: Tensor) -> None:
        """A new batch: the views of the previous one are dropped."""
        self.images, self.image_version, self.views = images, images._version, {}

    def view(self, distiller: Distiller, images: Tensor, features: bool, preact: bool) -> TeacherOutput:
        """The teacher's view of the served batch; any other images (none in a step) are computed directly."""
        if images is not self.images:
            return distiller.compute_teacher_view(images, features=features, preact=preact)
        key = (id(distiller.teacher), features, preact)
        if key not in self.views:
            out = distiller.compute_teacher_view(images, features=features, preact=preact)
            self.views[key] = out, _versions(out)
        return self.views[key][0]

    def tampered(self) -> str | None:
        """What a member changed in place ('images', 'teacher output'; None: nothing); changed views are dropped."""
        changed = {key for key, (out, versions) in self.views.items() if _versions(out) != versions}
        for key in changed:
            del self.views[key]
        if self.images is not None and self.images._version != self.image_version:
            return "images"
        return "teacher output" if changed else None


def _versions(out: TeacherOutput) -> list[int]:
    """The in-place version counters of every tensor of `out`."""
    return [out.logits._version, *(feature._version for feature in out.features)]


@dataclass
class Member:
    """One run of the cohort: its config, lock and trainer, its RNG states while others run, and how it ended."""

    index: int
    cfg: Config
    source: str
    lock: RunLock | None = None
    resume_path: Path | None = None
    trainer: Trainer | None = None
    inside: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    coroutine: greenlet | None = None
    want: tuple[int, int] | None = None  # the (epoch, step) of the batch it waits for
    outcome: str = "pending"  # trained, done (already), elsewhere (another process holds it), failed, interrupted
    detail: str = ""

    @property
    def label(self) -> str:
        """'member 2' (numbered from 1), for log lines."""
        return f"member {self.index + 1}"

    @property
    def output_dir(self) -> Path:
        """Its run directory."""
        return Path(self.cfg.output_dir)


class Cohort:
    """Trains the members' epoch loops in lockstep on one loader and one teacher forward per batch."""

    def __init__(self, members: list[Member], data: RunData, ctx: DistributedContext) -> None:
        self.members, self.data, self.ctx = members, data, ctx
        self.shared = SharedTeacher()
        self.teachers: dict[bool, torch.nn.Module] = {}
        self.coordinator = greenlet.getcurrent()  # where a member hands over to
        self.batch: Batch | None = None
        self.cursor: tuple[int, int] | None = None  # the (epoch, step) the loader iterator yields next
        self.iterator: Iterator[Batch] | None = None

    def setup(self, member: Member) -> None:
        """Build the member as its separate run would (from its seed), with the cohort's data and teacher."""
        exp = build_run_experiment(member.cfg, self.ctx, self.data)
        self.share_teacher(exp.distiller)
        member.trainer, member.inside = prepare_trainer(exp, member.cfg, member.resume_path)
        member.trainer.feed = lambda epoch_run: self.feed(member, epoch_run)
        member.rng = capture_rng_state()  # its streams from here on, exactly as its separate run has them

    def share_teacher(self, distiller: Distiller) -> None:
        """Give the member the first member's teacher of the same kind (BatchNorm folded for the same features),
        so that every member reads one forward; its own copy is dropped."""
        kind = distiller.unwrapped.preact_of("teacher")
        distiller.teacher = self.teachers.setdefault(kind, distiller.teacher)
        distiller.shared = self.shared

    def feed(self, member: Member, epoch_run: EpochRun) -> Iterator[Batch]:
        """The member's batches of an epoch, from its start step: each one waits for its turn."""
        for step in range(epoch_run.start_step, len(self.data.train_loader)):
            yield self.request(member, epoch_run.epoch, step)

    def request(self, member: Member, epoch: int, step: int) -> Batch:
        """In the member's thread: hand over until the coordinator serves the batch at (epoch, step)."""
        self.check_untouched()
        member.want = (epoch, step)
        self.coordinator.switch()
        assert self.batch is not None
        return self.batch

    def check_untouched(self) -> None:
        """In the member's thread, before it hands over: an error if it changed what the other members read."""
        changed = self.shared.tampered()
        if changed is not None:
            raise RuntimeError(f"this member's method changed the cohort's shared {changed} in place, which its other "
                               "members read too; a method must not modify its inputs (copy them first)")

    def train(self) -> None:
        """Start every member, then serve batches until every member has finished."""
        for member in self.members:
            self.resume(member, start=True)
        while waiting := [member for member in self.members if member.want is not None]:
            position = min(member.want for member in waiting)
            self.serve(*position)
            for member in waiting:
                if member.want == position:
                    if self.shared.tampered() == "images":
                        self.serve(*position, again=True)  # a member changed the batch in place: make it afresh
                    self.resume(member)

    def serve(self, epoch: int, step: int, again: bool = False) -> None:
        """Make batch `step` of `epoch` the one served (`again`: once more, from a fresh loader iterator)."""
        if again:
            self.cursor = None
        self.batch = self.batch_at(epoch, step)
        self.shared.begin(self.batch.images)

    def batch_at(self, epoch: int, step: int) -> Batch:
        """Batch `step` of `epoch`, on the device (the loader continues where it is, else starts there)."""
        loader = self.data.train_loader
        if self.cursor != (epoch, step) or self.iterator is None:
            loader.sampler.set_epoch(epoch, start_batch=step)
            self.iterator = iter(loader)
        batch = next(self.iterator)
        self.cursor = (epoch, step + 1)
        assert self.members[0].trainer is not None
        return on_device(self.members[0].trainer.exp, batch)

    def resume(self, member: Member, start: bool = False) -> None:
        """Run `member` with its own RNG states until it asks for a batch or ends, then keep its states."""
        assert member.rng is not None
        restore_rng_state(member.rng)
        member.want = None
        if start:
            member.coroutine = greenlet(lambda: self.body(member), parent=self.coordinator)
        assert member.coroutine is not None
        member.coroutine.switch()  # back here when it asks for a batch, or when it has ended
        member.rng = capture_rng_state()

    def body(self, member: Member) -> None:
        """The member's coroutine: its run from start-up to results.json; how it ended goes into `member`."""
        assert member.trainer is not None
        try:
            train_prepared(member.trainer, member.inside, member.resume_path)
            self.check_untouched()  # its last step hands over nothing: a change there is caught here
            member.outcome = "trained"
        except StopRequested as stop:
            member.outcome, member.detail = "interrupted", f"stopped after step {stop.steps} of epoch {stop.epoch}"
        except Exception as err:  # noqa: BLE001 - recorded in its run directory (FAILED); the others go on
            member.outcome, member.detail = "failed", str(err)
            get_logger().error(f"{member.output_dir} failed: {err}; the cohort's other members go on",
                               exc_info=not isinstance(err, UserError))
        finally:
            member.want = None
            member.trainer.exp.distiller.shared = None


class MemberLog(logging.Filter):
    """Prefixes the lines a member logs (from its coroutine) with its label, and copies them to its run directory's
    train.log (rank 0), so that each member's directory holds its own log as a separate run's does under the table
    runner."""

    def __init__(self, members: Sequence[Member], write_files: bool) -> None:
        super().__init__()
        self.members = members
        self.files: dict[int, logging.Handler] = {}
        if write_files:
            for member in members:
                handler = logging.FileHandler(member.output_dir / "train.log", encoding="utf-8")
                handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
                self.files[member.index] = handler

    def filter(self, record: logging.LogRecord) -> bool:
        """Prefix and copy a member's record; pass every record on."""
        current = greenlet.getcurrent()
        member = next((member for member in self.members if member.coroutine is current), None)
        if member is not None and not getattr(record, "cohort_prefixed", False):
            record.msg, record.cohort_prefixed = f"[{member.label}] {record.msg}", True
            handler = self.files.get(member.index)
            if handler is not None:
                handler.handle(record)
        return True

    def close(self) -> None:
        """Close the members' log files."""
        for handler in self.files.values():
            handler.close()


def claim(member: Member, ctx: DistributedContext, resume: str | None) -> None:
    """Lock the member's run directory and find where it resumes; a member that is complete already, or held by
    another process, is settled instead (`member.outcome`)."""
    try:
        member.lock = claim_run_directory(member.cfg.output_dir, ctx)
    except RunLockedError as err:
        member.outcome, member.detail = "elsewhere", str(err)
        return
    status = broadcast_object(inspect_run(member.output_dir, config_to_dict(member.cfg)) if ctx.is_main else None)
    if status.state == "done" and status.matches_plan:
        member.outcome, member.detail = "done", "complete already"
        return
    member.resume_path = resolve_resume(member.cfg, resume, ctx)


def train_cohort(cfgs: Sequence[Config], sources: Sequence[str], resume: str | None = None) -> list[Member]:
    """Train the runs `cfgs` (from the files `sources`) as one cohort; returns every member with how it ended.

    Inputs are checked, and every member's directory locked and its resume point found, before any training: an
    error there (a UserError) stops the cohort with nothing trained. Under torchrun every process calls this."""
    check_cohort(cfgs, sources)
    first = cfgs[0]
    if first.runtime.deterministic:
        set_cublas_workspace()
    ctx = init_distributed(first.device, first.distributed.timeout_s)
    members = [Member(index, cfg, source) for index, (cfg, source) in enumerate(zip(cfgs, sources))]
    installed = STOP.install()
    try:
        for member in members:
            check_inputs(member.cfg)
        for member in members:
            claim(member, ctx, resume)
        training = [member for member in members if member.outcome == "pending"]
        for member in members:
            if member.outcome != "pending":
                get_logger().warning(f"{member.output_dir}: {member.detail}; not trained by this cohort")
        if training:
            ensure_teacher_checkpoint(first, ctx, train=run)
            _train_members(training, ctx)
        return members
    finally:
        if installed:
            STOP.restore()
        for member in members:
            if member.lock is not None:
                member.lock.release()


def _train_members(members: list[Member], ctx: DistributedContext) -> None:
    """Build the cohort's data once, every member on it, and train them together."""
    data = build_data(members[0].cfg, ctx)
    cohort = Cohort(members, data, ctx)
    log = MemberLog(members, write_files=ctx.is_main)
    get_logger().addFilter(log)
    try:
        for member in members:
            get_logger().info(f"[{member.label}] {member.source} → {member.output_dir}")
            cohort.setup(member)
        cohort.train()
    finally:
        get_logger().removeFilter(log)
        log.close()
        for loader in (data.train_loader, data.test_loader):
            close_loader(loader)

