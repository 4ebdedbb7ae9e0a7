"""Stage timings of one pipeline call."""

from __future__ import annotations

import time

import torch

#: the clock stages are timed with (a module attribute, so that tests can substitute a deterministic one)
clock = time.perf_counter


class StageClock:
    """Each :meth:`lap` measures the time since the previous one; ``sync``: a CUDA device to synchronise at each
    lap, so that asynchronous GPU work is counted in the stage that launched it (``Pipeline.profile = True``)."""

    def __init__(self, sync: torch.device | None = None) -> None:
        self.sync = sync
        self.start = self.last = clock()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        if self.sync is not None:
            torch.cuda.synchronize(self.sync)
        now = clock()
        self.timings[stage] = now - self.last
        self.last = now

    def finish(self) -> dict[str, float]:
        self.timings["total"] = self.last - self.start
        return self.timings
