"""The replica's own batcher: requests of different users share one forward.

Ray Serve's `@serve.batch` splits batches by multiplexed model id, so with many
users nearly every batch holds one request. Here each queued job carries its
user's bank slot and a batch takes jobs of *any* slot (mode "mixed"); mode
"split" takes only jobs of the head's slot, which is what `@serve.batch` does,
kept for the benchmark. Batches run one at a time in a worker thread, so the
event loop keeps accepting requests (and loading adapters) meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["generate", "score"]


@dataclass(eq=False)
class Job:
    """One request waiting for a batch; `future` gets its result."""

    kind: Kind
    slot: int
    payload: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Gathers jobs for up to `wait_s` (or until `max_batch` wait) and runs them together."""

    def __init__(self, run: Callable[[Kind, list[Job]], list[Any]], *, max_batch: int, wait_s: float,
                 mode: Literal["mixed", "split"] = "mixed",
                 on_batch: Callable[[list[Job]], None] = lambda jobs: None):
        self._run = run
        self.max_batch, self.wait_s, self.mode = max_batch, wait_s, mode
        self._on_batch = on_batch
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._pending: deque[Job] = deque()
        self._task: asyncio.Task | None = None

    async def submit(self, kind: Kind, slot: int, payload: Any) -> Any:
        """Queue one job and wait for its result."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        job = Job(kind, slot, payload, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    @property
    def error(self) -> BaseException | None:
        """Why the batch loop stopped, if it did (a failed batch does not stop it)."""
        task = self._task
        return task.exception() if task is not None and task.done() and not task.cancelled() else None

    def _fits(self, head: Job, job: Job) -> bool:
        return job.kind == head.kind and (self.mode == "mixed" or job.slot == head.slot)

    async def _gather(self) -> list[Job]:
        if not self._pending:
            self._pending.append(await self._queue.get())
        deadline = time.monotonic() + self.wait_s
        while len(self._pending) < self.max_batch:
            while not self._queue.empty() and len(self._pending) < self.max_batch:
                self._pending.append(self._queue.get_nowait())
            left = deadline - time.monotonic()
            if len(self._pending) >= self.max_batch or left <= 0:
                break
            try:
                self._pending.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        head = self._pending[0]
        batch = [job for job in self._pending if self._fits(head, job)][: self.max_batch]
        taken = set(map(id, batch))
        self._pending = deque(job for job in self._pending if id(job) not in taken)
        return [job for job in batch if not job.future.done()]  # drop jobs whose caller went away

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self._on_batch(batch)
            try:
                results = await asyncio.to_thread(self._run, batch[0].kind, batch)
            except Exception as e:  # noqa: BLE001 - the whole batch failed: every caller hears why
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, result in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)
