"""What every training script shares: how a run is cut into Rig-L segments, and
files written so that a kill never leaves half of one."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

TEMP_PREFIX = ".partial-"  # temp files beside their target; never loaded


@dataclass(frozen=True)
class SegmentPlan:
    """A run cut into segments: the steps between two Rig-L updates, one traced loop each."""

    batches_per_epoch: int
    steps_per_epoch: int  # Rig-L segments per epoch
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.batches_per_epoch * self.epochs

    @property
    def total_segments(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def num_updates(self) -> int:
        """Pattern updates: after every segment but the last (nothing would train the last)."""
        return self.total_segments - 1

    def segment(self, index: int) -> tuple[int, int, int]:
        """(epoch, first batch within the epoch, batch count) of segment `index`."""
        epoch, k = divmod(index, self.steps_per_epoch)
        first = k * self.batches_per_epoch // self.steps_per_epoch
        last = (k + 1) * self.batches_per_epoch // self.steps_per_epoch
        return epoch, first, last - first

    def first_step(self, index: int) -> int:
        epoch, first, _ = self.segment(index)
        return epoch * self.batches_per_epoch + first

    def boundary_steps(self, fractions: Sequence[float]) -> list[int]:
        """The first global step at or past each fraction of the run."""
        return [math.ceil(fraction * self.total_steps) for fraction in fractions]


def write_atomically(path: Path, write: Callable) -> None:
    """Call write(binary file) on a temp file beside `path`, then rename it into place."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX + path.name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
