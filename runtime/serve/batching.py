"""Dynamic batching for the service, with cost budgets, isolation and cancellation (no Ray import).

Requests arrive as :class:`Job` s. A worker gathers them for up to ``max_wait_s`` after the first (or until
``max_batch`` jobs or ``max_batch_cost`` pixel-steps are waiting), groups those that can share a pipeline call (same
size, steps and guidance), and runs the groups one after another in a worker thread, cheapest first; each job is
answered as soon as its group finishes.

- **Isolation**: when a call of several jobs fails, its jobs are run again one by one, so that only the job that
  causes the failure gets it. When it fails for lack of memory, it is split in halves (and so on) before any job
  is failed.
- **Cancellation**: a job whose caller has gone (``abandoned``) or whose ``deadline`` has passed is dropped before
  its call starts, and a call whose jobs are all gone stops at the pipeline's next check (its ``cancel`` hook).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import Cancelled

#: ``run(jobs, cancel) -> one result per job`` (in a worker thread); raises when the call fails.
Runner = Callable[[Sequence["Job"], Callable[[], bool]], Sequence[Any]]


class OutOfMemory(Exception):
    """A job failed for lack of memory even when run alone."""


@dataclass(eq=False)
class Job:
    """One request on its way through the batcher."""

    key: tuple[Any, ...]  # jobs with equal keys can share a pipeline call
    cost: int  # pixel-steps
    payload: Any  # what the runner needs
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for the answer
    arrived: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)
    future: "asyncio.Future[Any] | None" = None

    def gone(self) -> bool:
        """Nobody waits for this job's answer any more."""
        return self.abandoned.is_set() or time.monotonic() > self.deadline


def is_out_of_memory(error: BaseException) -> bool:
    """Allocation failures (torch's CUDA OOM is a RuntimeError whose message says so; MemoryError on the CPU)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error))


class Batcher:
    """See the module docstring. ``submit`` from the event loop; the runner runs in one worker thread at a time."""

    def __init__(self, run: Runner, max_batch: int, max_wait_s: float, max_batch_cost: float,
                 is_oom: Callable[[BaseException], bool] = is_out_of_memory,
                 on_call: Callable[[int, int], None] | None = None) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_batch_cost = max_batch_cost
        self.is_oom = is_oom
        self.on_call = on_call  # (jobs in the call, jobs gathered in the batch), for metrics
        self.queue: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.cancelled_calls = 0  # calls stopped by their cancel hook (everyone had gone)
        self.retried_calls = 0  # calls whose jobs were run again one by one (or in halves)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def submit(self, job: Job) -> Any:
        """Queue ``job`` and wait for its result (its runner result, or raises its error). A cancelled caller marks
        the job abandoned."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        job.future = loop.create_future()
        self.queue.append(job)
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.abandoned.set()
            raise

    # ------------------------------------------------------------------------------------------------ worker
    async def _work(self) -> None:
        assert self._wake is not None
        while True:
            self._drop_gone()
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            batch = self._take()
            if not batch:
                continue
            groups: dict[tuple[Any, ...], list[Job]] = {}
            for job in batch:
                groups.setdefault(job.key, []).append(job)
            for jobs in sorted(groups.values(), key=lambda js: js[0].cost):  # cheapest first: answered first
                jobs = [j for j in jobs if not self._settle_if_gone(j)]
                if not jobs:
                    continue
                if self.on_call is not None:
                    self.on_call(len(jobs), len(batch))
                outcomes = await asyncio.to_thread(self._call_isolated, jobs)
                for job, (ok, value) in zip(jobs, outcomes):
                    self._settle(job, ok, value)

    async def _gather(self) -> None:
        """Wait until the batch is full (jobs or cost) or ``max_wait_s`` after the oldest job arrived."""
        assert self._wake is not None
        while len(self.queue) < self.max_batch and sum(j.cost for j in self.queue) < self.max_batch_cost:
            left = self.queue[0].arrived + self.max_wait_s - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Job]:
        """The oldest jobs that fit in one batch (at least one, whatever its cost)."""
        batch, cost = [], 0
        while self.queue and len(batch) < self.max_batch:
            job = self.queue[0]
            if batch and cost + job.cost > self.max_batch_cost:
                break
            self.queue.pop(0)
            if self._settle_if_gone(job):
                continue
            batch.append(job)
            cost += job.cost
        return batch

    def _drop_gone(self) -> None:
        self.queue = [j for j in self.queue if not self._settle_if_gone(j)]

    def _settle_if_gone(self, job: Job) -> bool:
        if job.gone():
            self._settle(job, False, Cancelled("abandoned before it ran"))
            return True
        return False

    @staticmethod
    def _settle(job: Job, ok: bool, value: Any) -> None:
        if job.future is not None and not job.future.done():
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)

    # ------------------------------------------------------------------------------------------------ calls
    def _call_isolated(self, jobs: list[Job]) -> list[tuple[bool, Any]]:
        """Run ``jobs`` in one call; on failure, in halves (out of memory) or one by one (anything else)."""
        out: dict[Job, tuple[bool, Any]] = {}
        self._call(jobs, out)
        return [out[j] for j in jobs]

    def _call(self, jobs: list[Job], out: dict[Job, tuple[bool, Any]]) -> None:
        live = [j for j in jobs if not j.gone()]
        for j in jobs:
            if j not in live:
                out[j] = (False, Cancelled("abandoned before it ran"))
        if not live:
            return
        try:
            results = list(self.run(live, lambda: all(j.gone() for j in live)))
            if len(results) != len(live):
                raise RuntimeError(f"the runner gave {len(results)} results for {len(live)} jobs")
        except Cancelled as e:
            self.cancelled_calls += 1
            for j in live:
                out[j] = (False, e)
            return
        except Exception as e:  # noqa: BLE001 - every failure is isolated to the jobs that cause it
            if len(live) == 1:
                out[live[0]] = (False, OutOfMemory(str(e).splitlines()[0] if str(e) else "out of memory")
                                if self.is_oom(e) else e)
                return
            self.retried_calls += 1
            if self.is_oom(e):
                half = len(live) // 2
                self._call(live[:half], out)
                self._call(live[half:], out)
            else:
                for j in live:
                    self._call([j], out)
            return
        for j, r in zip(live, results):
            out[j] = (True, r)
