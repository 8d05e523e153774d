"""The distiller of a run: the method's trainable module (possibly DDP-wrapped), the frozen teacher, the method state.

Everything that receives gradients lives in `Distiller.trainable`, one `Method` module that the optimizer sees, DDP
wraps and checkpoints store whole; the teacher stays outside it, frozen, in eval mode and out of every checkpoint; a
method's non-parameter state (CRD's memory bank) stays outside too, so DDP never re-broadcasts it.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ctkd.datasets.loader import Batch
from ctkd.distributed import unwrap
from ctkd.methods import METHODS, Method, MethodSetup, StepContext, StepOutput, TeacherOutput
from ctkd.methods.base import NetworkRuntime, to_float


class TeacherViews(Protocol):
    """The teacher outputs a cohort computes once per batch for all its members (ctkd.cohort.SharedTeacher)."""

    def view(self, distiller: Distiller, images: Tensor, features: bool, preact: bool) -> TeacherOutput:
        """`distiller`'s teacher's view of `images`, computed by the first member that asks for it."""


class Distiller:
    """One training step of a method: the teacher's view of the batch without gradient, then the method's loss."""

    def __init__(self, method: Method, teacher: nn.Module | None = None, state: nn.Module | None = None) -> None:
        self.trainable: nn.Module = method  # the Method, possibly inside DDP (see `wrap_ddp`)
        self.teacher = teacher
        self.state = state
        self.runtime = NetworkRuntime()
        self.shared: TeacherViews | None = None  # a cohort's teacher outputs of the current batch
        if teacher is not None:
            teacher.requires_grad_(False)  # frozen: never in the optimizer, no gradient bookkeeping
            teacher.eval()

    @property
    def unwrapped(self) -> Method:
        """The method module without its DDP wrapper: what optimizers see and checkpoints store."""
        return unwrap(self.trainable)

    @property
    def student(self) -> nn.Module:
        """The student network (unwrapped)."""
        return self.unwrapped.student

    def to(self, device: torch.device) -> Distiller:
        """Move every part to `device`."""
        self.trainable.to(device)
        for part in (self.teacher, self.state):
            if part is not None:
                part.to(device)
        return self

    def set_runtime(self, runtime: NetworkRuntime) -> Distiller:
        """Run the student's and the teacher's forwards as `runtime` says (call before building the optimizer).

        With channels_last, every part (student, method heads, teacher, method state) is converted; only their 4-d
        tensors (convolution weights) change layout, in place, so parameters keep their identity.
        """
        self.runtime = runtime
        self.unwrapped.runtime = runtime
        if runtime.channels_last:
            for part in (self.trainable, self.teacher, self.state):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        return self

    def compile(self, mode: str) -> None:
        """torch.compile the student and teacher in place (`mode`: torch.compile's), state_dict keys unchanged.

        Both entry points the methods call are compiled: ``net(x)`` (nn.Module.compile) and, for the feature-based
        methods, ``net.forward_with_features``.
        """
        for net in (self.student, self.teacher):
            if net is None or getattr(net, "ctkd_compiled", False):  # a cohort's members share their teacher
                continue
            net.ctkd_compiled = True
            net.compile(mode=mode)
            if self.unwrapped.features:
                net.forward_with_features = torch.compile(net.forward_with_features, mode=mode)

    def wrap_ddp(self, device_ids: list[int] | None = None) -> None:
        """Wrap the trainable module (never the teacher or the state) in one DDP.

        DDP broadcasts rank 0's parameters and buffers at construction; gradients of every trainable parameter,
        the temperature's and the heads' included, are then averaged over ranks at each step (the authors' code
        never synchronises τ; docs/differences.md).
        """
        self.trainable = nn.parallel.DistributedDataParallel(self.unwrapped, device_ids=device_ids)

    def train(self, mode: bool = True) -> Distiller:
        """Switch the trainable part; the teacher stays in eval mode so its BN statistics never move."""
        self.trainable.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def teacher_output(self, images: Tensor) -> TeacherOutput | None:
        """The teacher's view of `images` that the method uses: logits, and features when it takes them (None
        without a teacher)."""
        if self.teacher is None:
            return None
        return self.teacher_view(images, features=self.unwrapped.features, preact=self.unwrapped.preact_of("teacher"))

    def teacher_view(self, images: Tensor, *, features: bool, preact: bool) -> TeacherOutput:
        """The teacher's logits (and `features`, pre-activation if `preact`) of `images`; a cohort's members read
        the one forward of each batch that `shared` holds (ctkd.cohort)."""
        if self.shared is not None:
            return self.shared.view(self, images, features, preact)
        return self.compute_teacher_view(images, features=features, preact=preact)

    @torch.no_grad()
    def compute_teacher_view(self, images: Tensor, *, features: bool, preact: bool) -> TeacherOutput:
        """The teacher's forward without gradient, under the same autocast as the student; its outputs leave the
        teacher as float32."""
        assert self.teacher is not None
        with self.runtime.autocast():
            maps, logits = (
                self.teacher.forward_with_features(images, preact=preact) if features else ([], self.teacher(images))
            )
        logits, maps = to_float(logits, maps)
        if not features:
            return TeacherOutput(logits)
        return TeacherOutput(logits, maps, self.teacher.get_classifier())

    def __call__(self, batch: Batch, ctx: StepContext) -> StepOutput:
        """One training step's loss terms."""
        return self.trainable(batch, self.teacher_output(batch.images), ctx, self.state)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores: the whole trainable module and the method's state (never the teacher)."""
        return {
            "trainable": self.unwrapped.state_dict(),
            "method_state": self.state.state_dict() if self.state is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output strictly: a head or bank missing from the file is an error."""
        self.unwrapped.load_state_dict(state["trainable"], strict=True)
        if self.state is not None:
            self.state.load_state_dict(state["method_state"], strict=True)


@torch.no_grad()
def measure_setup(
    student: nn.Module, teacher: nn.Module | None, *, image_shape: tuple[int, ...], num_classes: int,
    train_targets: Tensor, seed: int, features: bool, preact: bool = False, teacher_preact: bool | None = None,
) -> MethodSetup:
    """Feature shapes of student and teacher, from one forward of a 2-image batch in eval mode (no state changes);
    `teacher_preact` None: the teacher's features are taken like the student's (`preact`)."""

    def shapes(model: nn.Module | None, preact: bool) -> list[tuple[int, ...]]:
        if model is None or not features:
            return []
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out, _ = model.forward_with_features(torch.zeros(2, *image_shape, device=device), preact=preact)
        model.train(was_training)
        return [tuple(f.shape[1:]) for f in out]

    teacher_shapes = shapes(teacher, preact if teacher_preact is None else teacher_preact)
    return MethodSetup(shapes(student, preact), teacher_shapes, num_classes, train_targets, seed, teacher)


def build_distiller(
    options: Any,
    *,
    student: nn.Module,
    teacher: nn.Module | None,
    temperature: nn.Module | None,
    loss: Any,
    setup: MethodSetup,
) -> Distiller:
    """Assemble the method selected by `options.name` around the given networks."""
    method_cls = METHODS.get(options.name)
    method = method_cls(student, temperature, options=options, loss=loss, setup=setup)
    return Distiller(method, teacher, method_cls.create_state(options, setup))
