"""The replica's static batcher (`scheduling: static`), and what both schedulers share.

Ray Serve's `@serve.batch` splits batches by multiplexed model id, so with many
users nearly every batch holds one request. Here each queued job carries its
user's bank slot and a batch takes jobs of *any* slot (mode "mixed"); mode
"split" takes only jobs of the head's slot, which is what `@serve.batch` does,
kept for the benchmark. Batches run one at a time in a worker thread, so the
event loop keeps accepting requests (and loading adapters) meanwhile; a batch
runs until its longest row is done. The continuous scheduler
(`peftu.serving.scheduler`, the default) admits rows between decode steps instead.

Both queue `Job`s through `JobQueue.submit`: the queue is bounded (`Overloaded`
past `max_waiting`; a request of several rows holds its places first, so it is
admitted whole or refused whole, see `JobQueue.hold`), a caller that goes away
marks its job cancelled (a waiting job is dropped, a running row stops at its
next step), and `done` runs once the job's row is out of the batch, whether or
not its caller still waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from peftu.errors import PeftuError
from peftu.inference.rows import GenRow

Kind = Literal["generate", "score"]


class Overloaded(PeftuError):
    """The replica's queue of waiting requests is full: refused now rather than queued without bound."""


class TooLarge(PeftuError):
    """A request that could never fit this replica's KV budget: refused, not queued for ever."""


@dataclass(eq=False)
class Job:
    """One request waiting for a batch; `future` gets its result."""

    kind: Kind
    slot: int
    payload: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    """Its caller went away: drop it if it waits, stop its row at the next step if it runs."""


@dataclass
class Seats:
    """Places in the queue held for one request's rows that are not queued yet (see `JobQueue.hold`)."""

    left: int


def settle(job: Job, result: Any = None, error: BaseException | None = None) -> None:
    """Give the job its result (or error) on its event loop; from any thread, at most once."""
    def apply() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.future.get_loop().call_soon_threadsafe(apply)
    except RuntimeError:  # its event loop is closed: nobody is waiting
        pass


class JobQueue:
    """Submission as both schedulers take it: bounded, cancellable, with a hook for when the row is done."""

    max_waiting: int
    _held = 0
    """Places held for rows of admitted requests that are not queued yet (`hold`); a class default, so the
    two schedulers' own `__init__`s need not set it."""

    @property
    def waiting(self) -> int:
        """Jobs queued and not yet in a batch."""
        raise NotImplementedError

    @property
    def error(self) -> BaseException | None:
        """Why the worker stopped, if it did: the replica is then unhealthy."""
        raise NotImplementedError

    def _put(self, job: Job) -> None:
        """Queue the job for the worker (the bound is checked already)."""
        raise NotImplementedError

    def _check(self, job: Job) -> None:
        """Refuse a job before it is queued (a bad request); nothing to refuse by default."""

    def _refuse_if_full(self, rows: int) -> None:
        if self.waiting + self._held + rows > self.max_waiting:
            raise Overloaded(f"the replica's queue is full ({self.max_waiting} requests waiting); "
                             "retry later or raise max_waiting")

    @contextlib.contextmanager
    def hold(self, rows: int) -> Iterator[Seats]:
        """Places for a request's `rows`, held while they are prepared (adapter loads, each an await): taken
        now or refused now (`Overloaded`). Without it the rows of concurrent requests interleave, each
        request gets part of the queue, and every one of them is refused. At most `max_waiting` are held;
        a request of more rows queues the rest one by one."""
        rows = min(rows, self.max_waiting)
        self._refuse_if_full(rows)
        seats = Seats(rows)
        self._held += rows
        try:
            yield seats
        finally:
            self._held -= seats.left
            seats.left = 0

    def enqueue(self, kind: Kind, slot: int, payload: Any, done: Callable[[], None] | None = None,
                seats: Seats | None = None) -> Job:
        """Queue one job (on the event loop); raises at once if it is refused. `done` runs once the job has
        left the batch: answered, failed, refused, or dropped after its caller went away. A job with `seats`
        takes one of its request's held places."""
        job = Job(kind, slot, payload, asyncio.get_running_loop().create_future())
        if isinstance(payload, GenRow):
            own = payload.cancelled
            job.payload = replace(payload, cancelled=lambda: job.cancelled or own())
        if done is not None:
            job.future.add_done_callback(lambda _: done())
        try:
            self._check(job)
            if seats is not None and seats.left > 0:
                seats.left -= 1
                self._held -= 1
            else:
                self._refuse_if_full(1)
            self._put(job)
        except BaseException:
            job.future.cancel()
            raise
        return job

    @staticmethod
    async def wait(job: Job) -> Any:
        """The job's result; a caller that stops waiting (its task cancelled) cancels the job."""
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def submit(self, kind: Kind, slot: int, payload: Any, done: Callable[[], None] | None = None,
                     seats: Seats | None = None) -> Any:
        """Queue one job and wait for its result (`enqueue`, then `wait`)."""
        return await self.wait(self.enqueue(kind, slot, payload, done, seats))


class Batcher(JobQueue):
    """Gathers jobs for up to `wait_s` (or until `max_batch` wait) and runs them together."""

    def __init__(self, run: Callable[[Kind, list[Job]], list[Any]], *, max_batch: int, wait_s: float,
                 mode: Literal["mixed", "split"] = "mixed", max_waiting: int = 1 << 30,
                 on_batch: Callable[[list[Job]], None] = lambda jobs: None):
        self._run = run
        self.max_batch, self.wait_s, self.mode, self.max_waiting = max_batch, wait_s, mode, max_waiting
        self._on_batch = on_batch
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._pending: deque[Job] = deque()
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def _put(self, job: Job) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._queue.put_nowait(job)

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
        for job in batch:
            if job.cancelled:  # its caller went away while it waited
                settle(job)
        return [job for job in batch if not job.cancelled]

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
                    settle(job, error=e)
                continue
            for job, result in zip(batch, results, strict=True):
                settle(job, result)
