"""What the ranks agree on at a step or epoch boundary: whether to stop, and the unreadable images met so far."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ctkd.distributed import any_rank, gather_objects, get_world_size
from ctkd.preemption import STOP

if TYPE_CHECKING:
    from ctkd.build import Experiment


def stop_agreed(step_count: int, interval: int, device: torch.device) -> bool:
    """Whether every rank stops now, after `step_count` steps of the epoch (ctkd.preemption).

    One process reads its flag at every step boundary. Several agree once per `interval` steps (and at the epoch's
    end, `interval` = 1) with one all-reduce of their flags, so they stop at the same step; between those points
    they never read each other's flags.
    """
    if get_world_size() == 1:
        return STOP.received is not None
    return step_count % interval == 0 and any_rank(STOP.received is not None, device)


def bad_images(exp: Experiment, epoch: int) -> dict[str, int]:
    """`bad_images`: the unreadable training images replaced in `epoch`, over all ranks, for a dataset with a
    budget for them (data.max_bad_images > 0); else nothing. One collective per epoch, on every rank: the files met
    by all ranks together must stay within the budget (each rank alone stops at once past it)."""
    merged = bad_image_record(exp)
    if merged is None:
        return {}
    return {"bad_images": sum(1 for last in merged.values() if last == epoch + 1)}


def bad_image_record(exp: Experiment) -> dict[int, int] | None:
    """The unreadable training files met by every rank (index → 1 + last epoch), after checking them against
    data.max_bad_images (a collective: every rank calls it); None for a dataset without that budget."""
    source = getattr(exp.train_loader.dataset, "dataset", None)
    if not getattr(source, "max_bad_images", 0):
        return None
    merged: dict[int, int] = {}
    for record in gather_objects(source.bad_record()):
        for index, last in record.items():  # 1 + a stage's run epoch may be ≤ 0: no 0 default
            merged[index] = max(last, merged[index]) if index in merged else last
    source.check_budget(merged)
    return merged
