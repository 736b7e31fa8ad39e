"""Continuous batching (`scheduling: continuous`, the default): rows join and leave the running batch at every step.

One worker thread owns the replica's `RunningBatch` (`peftu.inference.running`)
and loops: take the waiting score jobs and answer them in one forward (so a
score never waits for a generation to end), admit waiting generation rows,
run one step (a decode step for every generating row, a prefill chunk of
`prefill_chunk_tokens` for the rows that joined), hand finished rows their
results. A row of any user joins on its own bank slot; a finished or cancelled
row leaves at once and frees its KV memory.

KV memory is bounded by `kv_budget_tokens`, allocated memory included: the
batch's slots are as wide as its widest row may grow (prompt, soft or virtual
tokens and max_tokens), so a row is admitted only while the rows running,
plus this one, each given the widest one's columns, stay within the budget
(`RunningBatch.fits`); rows are admitted in arrival order, so a long one is
not passed over for ever. One that could never fit is refused at once with a
message. At most `max_waiting` requests
wait (generation and score together); past that `submit` raises `Overloaded`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from peftu.bank import AdapterBank
from peftu.inference.generate import read_batch
from peftu.inference.rows import RowState
from peftu.inference.running import RunningBatch
from peftu.serving.batcher import Job, JobQueue, TooLarge, settle
from peftu.serving.metrics import Metrics

log = logging.getLogger("peftu.serving")


class Scheduler(JobQueue):
    """The replica's step loop over one running batch (see the module docs)."""

    def __init__(self, model, bank: AdapterBank | None, tokenizer, *, max_batch: int, kv_budget_tokens: int,
                 max_waiting: int, prefill_chunk_tokens: int, metrics: Metrics | None = None):
        self.model, self.bank, self.tokenizer = model, bank, tokenizer
        self.max_batch, self.kv_budget, self.max_waiting = max_batch, kv_budget_tokens, max_waiting
        self.metrics = metrics or Metrics()
        self.prefill_chunk = prefill_chunk_tokens
        self.batch = self._new_batch()
        self._queue: deque[Job] = deque()
        self._lock = threading.Condition()
        self._rows: dict[RowState, Job] = {}
        """Rows in the batch and their jobs."""
        self._seen: dict[RowState, int] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = False

    # --- the event loop's side ----------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def error(self) -> BaseException | None:
        """Why the step loop stopped, if it did (a failed step does not stop it)."""
        return self._error

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.bank, self.tokenizer, chunk=self.prefill_chunk, slots=self.max_batch,
                            kv_budget=self.kv_budget)

    def _check(self, job: Job) -> None:
        if self._error is not None:
            raise RuntimeError(f"the step loop stopped: {self._error!r}")
        if job.kind != "generate":
            return
        row = job.payload
        need = self.batch.need(row)
        if need > self.kv_budget:
            raise TooLarge(f"the prompt ({len(row.prompt_ids)} tokens) and max_tokens ({row.sampling.max_tokens}) "
                           f"need {need} KV tokens, more than this replica's kv_budget_tokens ({self.kv_budget})")

    def _put(self, job: Job) -> None:
        with self._lock:
            self._queue.append(job)
            self.metrics.waiting.set(len(self._queue))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="peftu-scheduler", daemon=True)
                self._thread.start()
            self._lock.notify()

    def close(self) -> None:
        """Stop the worker after its current step (rows still running are not answered)."""
        with self._lock:
            self._stop = True
            self._lock.notify()

    # --- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                scores, admitted = self._take()
                if scores is None:
                    return
                if scores:
                    self._score(scores)
                if admitted:
                    self._admit(admitted)
                if self.batch.rows:
                    self._step()
        except BaseException as e:  # a bug in the loop itself: fail what is left, say why in `error`
            log.exception("the scheduler's step loop stopped")
            self._error = e
            with self._lock:
                jobs = list(self._queue) + list(self._rows.values())
                self._queue.clear()
            for job in jobs:
                settle(job, error=RuntimeError(f"the step loop stopped: {e!r}"))

    def _take(self) -> tuple[list[Job] | None, list[Job]]:
        """Waiting score jobs and the generation jobs admitted now; (None, []) to stop."""
        with self._lock:
            while not self._queue and not self.batch.rows and not self._stop:
                self._lock.wait()
            if self._stop:
                return None, []
            scores, admitted, left = [], [], deque()
            room = self.max_batch - self.batch.rows
            blocked = False
            for job in self._queue:
                if job.cancelled:
                    self._cancelled(job, 0)
                    settle(job)
                elif job.kind == "score":
                    scores.append(job)
                elif not blocked and room > 0 and self.batch.fits([j.payload for j in admitted] + [job.payload]):
                    admitted.append(job)
                    room -= 1
                else:
                    blocked = True  # first come, first served: nobody passes a row that waits for room
                    left.append(job)
            self._queue = left
            self.metrics.waiting.set(len(left))
            return scores, admitted

    def _score(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for i in range(0, len(jobs), self.max_batch):
            chunk = jobs[i:i + self.max_batch]
            for job in chunk:
                self.metrics.queue_wait.observe(now - job.queued_at)
            try:
                results = read_batch(self.model, self.bank, self.tokenizer, [j.payload for j in chunk])
            except Exception as e:  # noqa: BLE001 - these scores failed: their callers hear why
                for job in chunk:
                    settle(job, error=e)
                continue
            for job, result in zip(chunk, results, strict=True):
                settle(job, result)

    def _admit(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        states = self.batch.add([job.payload for job in jobs])
        for job, state in zip(jobs, states, strict=True):
            self.metrics.queue_wait.observe(now - job.queued_at)
            self._rows[state] = job
            self._seen[state] = 0
        self.metrics.batch_size.observe(self.batch.rows)
        self.metrics.batch_users.observe(len({job.slot for job in self._rows.values()}))

    def _step(self) -> None:
        try:
            finished = self.batch.step()
        except Exception as e:  # noqa: BLE001 - the step failed: every row in it hears why, the loop goes on
            log.exception("a decode step failed; its %d rows are answered with the error", len(self._rows))
            for job in self._rows.values():
                settle(job, error=e)
            self._rows.clear()
            self._seen.clear()
            self.batch = self._new_batch()
            self._gauges()
            return
        self._observe_tokens()
        done = []
        for state in finished:
            job = self._rows.pop(state)
            self._seen.pop(state, None)
            if state.result.finish_reason == "cancelled":
                self._cancelled(job, state.result.tokens)
            done.append((job, state.result))
        self._gauges()  # before the callers hear: what they look at next is the batch without their rows
        for job, result in done:
            settle(job, result)

    def _observe_tokens(self) -> None:
        """Time to first token and inter-token latency of every row that wrote a token in this step."""
        for state, seen in self._seen.items():
            times = state.token_times
            if len(times) == seen:
                continue
            job = self._rows[state]
            previous = job.queued_at if seen == 0 else times[seen - 1]
            for k in range(seen, len(times)):
                (self.metrics.ttft if k == 0 else self.metrics.itl).observe(times[k] - previous)
                previous = times[k]
            self._seen[state] = len(times)

    def _cancelled(self, job: Job, tokens: int) -> None:
        """A client that went away is no error: counted, and logged at info."""
        self.metrics.cancelled.inc()
        self.metrics.cancelled_tokens.inc(tokens)
        log.info("a %s request on slot %d was cancelled after %d tokens: its client went away",
                 job.kind, job.slot, tokens)

    def _gauges(self) -> None:
        self.metrics.running.set(self.batch.rows)
        self.metrics.kv_tokens.set(self.batch.kv_tokens)
        self.metrics.kv_allocated.set(self.batch.kv.allocated)
