"""What the figures of the scripts share: an epoch axis that shows whole epochs, however few."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_TICKED_EPOCHS = 12  # up to this many epochs, every one gets its own tick


def epoch_axis(ax: Any, epochs: Iterable[int]) -> None:
    """An x axis of whole epochs: a tick per epoch for short runs (half an epoch of margin on both sides, so one
    epoch is not drawn on a fractional axis from 0.95 to 1.05), integer ticks chosen by matplotlib otherwise."""
    from matplotlib.ticker import MaxNLocator

    shown = sorted(set(epochs))
    ax.set_xlabel("epoch")
    if shown and shown[-1] - shown[0] + 1 <= MAX_TICKED_EPOCHS:
        ax.set_xticks(range(shown[0], shown[-1] + 1))
        ax.set_xlim(shown[0] - 0.5, shown[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
