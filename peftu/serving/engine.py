"""One replica's model: the base, its bank of users' adapters, the scheduler.

Everything a request needs beyond HTTP: which slot answers a user
(`AdapterManager`), generation and scoring with users mixed in one batch (the
continuous `Scheduler`, or the static `Batcher` with `scheduling: static`, both
over `peftu.inference`), and the task whose prompt and labels `/v1/score`
uses. The Ray Serve deployment (`server.py`) is a thin HTTP layer over this.

A replica only reads: the base must be there already (`peftu base build`
makes the tiny one), the users' base (plain or OPPU's merged one) is the one
`peftu.model.bases` finds their adapters fitted on, and the task's prompt and
labels come from its data set, the store (written by its fit runs) or the
synthetic generator, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from peftu.bank import AdapterBank
from peftu.config import ServeConfig
from peftu.data.schema import TaskSpec
from peftu.data.synthetic import TASKS
from peftu.errors import PeftuError
from peftu.inference.echo import PromptRow
from peftu.inference.generate import GenResult, GenRow, Piece, ScoreRow, generate_batch, read_batch
from peftu.inference.sampling import Picked, Sampling
from peftu.model.base import default_base_dir
from peftu.model.bases import load_users_base
from peftu.model.encode import encode
from peftu.paths import peftu_home
from peftu.serving.adapters import AdapterManager, Lease
from peftu.serving.batcher import Batcher, Job, JobQueue, Kind, Seats
from peftu.serving.metrics import Metrics
from peftu.serving.pplug import PlugServer
from peftu.serving.scheduler import Scheduler
from peftu.store import AdapterStore
from peftu.store.task_spec import load_task_spec

log = logging.getLogger("peftu.serving")


def base_path(base: str) -> str:
    """The configured base, or the tiny base where `peftu base build` puts it; a replica never builds one."""
    path = base or str(default_base_dir())
    if not base and not Path(path).is_dir():
        raise PeftuError(f"no base model at {path}: build the tiny base with `peftu base build` "
                         "(`peftu serve` builds it before it starts), or set base to a model folder or Hugging Face id")
    return path


def served_spec(cfg: ServeConfig, store: AdapterStore) -> TaskSpec:
    """The served task's prompt and labels: its data set's, else the store's, else the synthetic generator's."""
    if cfg.data:
        from peftu.data.io import load_spec

        spec = load_spec(cfg.data, endpoint_url=cfg.endpoint_url)
        if spec.name != cfg.task:
            raise PeftuError(f"data set {cfg.data} holds task {spec.name!r}, but the served task is {cfg.task!r}")
        return spec
    spec = load_task_spec(store, cfg.task)
    if spec is None:
        spec = TASKS.get(cfg.task)
    if spec is None:
        raise PeftuError(f"no prompt and labels for task {cfg.task!r}: {store} has no task spec of it (a "
                         f"`peftu fit` of the task writes one) and it is no synthetic task; set data to its data set")
    return spec


@dataclass
class Completion:
    """A finished generation and which adapter made it."""

    result: GenResult
    prompt_tokens: int
    lease: Lease


class RowStream:
    """A streamed row's pieces. Closing it cancels the row at its next step, even if it was never read
    (a request whose later rows were refused)."""

    def __init__(self, job: Job, pieces: AsyncIterator[Piece]):
        self.job, self._pieces = job, pieces

    def __aiter__(self) -> AsyncIterator[Piece]:
        return self._pieces

    async def aclose(self) -> None:
        self.job.cancelled = True
        await self._pieces.aclose()


class Engine:
    """Base model + adapter bank + scheduler of one replica."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        base = base_path(cfg.base)
        self.model_name = cfg.model_name or Path(base.rstrip("/")).name
        store = AdapterStore.open(cfg.store or str(peftu_home() / "store"), endpoint_url=cfg.endpoint_url)
        self.spec = served_spec(cfg, store)
        oppu = None if cfg.oppu == "auto" else cfg.oppu
        self.model, self.tokenizer, base_fp = load_users_base(base, store, cfg.task, oppu=oppu,
                                                              dtype=getattr(torch, cfg.dtype))
        self.model.to(cfg.device)
        lora = LoraConfig(r=cfg.max_rank, lora_alpha=cfg.max_rank, target_modules=list(cfg.target_modules))
        probe = AdapterBank(self.model, 1, lora)
        per_slot = probe.slot_bytes()
        probe.remove()
        capacity = min(cfg.max_adapters, cfg.max_adapter_bytes // per_slot)
        if capacity < 1:
            raise ValueError(f"max_adapter_bytes={cfg.max_adapter_bytes} holds no adapter "
                             f"(one slot takes {per_slot} bytes)")
        self.bank = AdapterBank(self.model, capacity + 1, lora)
        self.adapters = AdapterManager(self.bank, store, cfg.task, base_fp,
                                       max_bytes=cfg.max_adapter_bytes, ttl_s=cfg.version_ttl_s,
                                       metrics=self.metrics)
        self.plug = PlugServer(store, cfg.task, base_fp, device=cfg.device, ttl_s=cfg.version_ttl_s) \
            if cfg.pplug else None
        largest = cfg.max_prompt_tokens + cfg.max_tokens_limit
        if cfg.scheduling == "continuous" and cfg.kv_budget_tokens < largest:
            raise ValueError(f"kv_budget_tokens={cfg.kv_budget_tokens} cannot hold one request of max_prompt_tokens "
                             f"+ max_tokens_limit = {largest} tokens")
        self.scheduler: JobQueue = (
            Scheduler(self.model, self.bank, self.tokenizer, max_batch=cfg.max_batch,
                      kv_budget_tokens=cfg.kv_budget_tokens, max_waiting=cfg.max_waiting,
                      prefill_chunk_tokens=cfg.prefill_chunk_tokens, metrics=self.metrics)
            if cfg.scheduling == "continuous" else
            Batcher(self._run, max_batch=cfg.max_batch, wait_s=cfg.batch_wait_ms / 1000, mode=cfg.batching,
                    max_waiting=cfg.max_waiting, on_batch=self._count_batch))
        log.info("serving %s with %d adapter slots of %d bytes from %s (task %s, %s scheduling%s)",
                 self.model_name, capacity, per_slot, store, cfg.task,
                 cfg.scheduling if cfg.scheduling == "continuous" else f"static {cfg.batching}",
                 f", PPlug {self.plug.version}" if self.plug else "")

    # --- the static batch worker (runs in the batcher's thread) ------------------

    def _run(self, kind: Kind, jobs: list[Job]) -> list:
        if kind == "generate":
            return generate_batch(self.model, self.bank, self.tokenizer, [j.payload for j in jobs])
        return read_batch(self.model, self.bank, self.tokenizer, [j.payload for j in jobs])

    def _count_batch(self, jobs: list[Job]) -> None:
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.batch_users.observe(len({j.slot for j in jobs}))

    # --- requests ------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _text(self, prompt_ids: list[int]) -> str:
        """The prompt as text again: PPlug's query."""
        return self.tokenizer.decode(prompt_ids, skip_special_tokens=True)

    async def _plugged(self, lease: Lease, user: str | None, query: str) -> torch.Tensor | None:
        """PPlug's soft tokens for a user the base would answer, if they have cached history."""
        if self.plug is None or user is None or lease.version is not None:
            return None
        soft = await self.plug.soft_tokens(user, query)
        lease.pplug = soft is not None
        return soft

    async def lease(self, user: str | None, adapter: bool = True) -> Lease:
        """A pinned lease on the user's adapter; `adapter` False: on the base's slot (a base, global or PPlug
        winner: PPlug still reads the user's history)."""
        return await self.adapters.acquire(user if adapter else None)

    def hold(self, rows: int) -> contextlib.AbstractContextManager[Seats]:
        """Queue places for a request's generation rows, held or refused now (`JobQueue.hold`)."""
        return self.scheduler.hold(rows)

    def _enqueue(self, lease: Lease, kind: Kind, payload, seats: Seats | None = None) -> Job:
        """Queue a job on the lease's slot; the slot stays pinned until the job has left the batch, even if
        the caller goes away first (its row may be running)."""
        return self.scheduler.enqueue(kind, lease.slot, payload, done=lambda: self.adapters.release(lease),
                                      seats=seats)

    async def _submit(self, lease: Lease, kind: Kind, payload, seats: Seats | None = None) -> object:
        """The job's result; a caller that goes away cancels its row at the next step."""
        return await self.scheduler.wait(self._enqueue(lease, kind, payload, seats))

    async def complete(self, user: str | None, prompt_ids: list[int], sampling: Sampling,
                       seats: Seats | None = None, adapter: bool = True) -> Completion:
        """Generate one row in whatever batch it lands in (in a place of `seats`, if given); `adapter` as in
        `lease`."""
        lease = await self.lease(user, adapter)
        soft = await self._plugged(lease, user, self._text(prompt_ids))
        result = await self._submit(lease, "generate", GenRow(prompt_ids, lease.slot, sampling, soft=soft), seats)
        self._count_tokens(len(prompt_ids), result.tokens)
        return Completion(result, len(prompt_ids), lease)

    async def stream(self, user: str | None, prompt_ids: list[int], sampling: Sampling,
                     seats: Seats | None = None, adapter: bool = True) -> tuple[Lease, RowStream]:
        """The lease (for the response headers) and an iterator of the row's pieces, the last with its finish
        reason; `adapter` as in `lease`."""
        lease = await self.lease(user, adapter)
        soft = await self._plugged(lease, user, self._text(prompt_ids))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Piece | BaseException] = asyncio.Queue()
        gone = False

        def emit(piece: Piece) -> None:
            loop.call_soon_threadsafe(events.put_nowait, piece)

        row = GenRow(prompt_ids, lease.slot, sampling, emit=emit, cancelled=lambda: gone, soft=soft)
        job = self._enqueue(lease, "generate", row, seats)  # a full queue is refused now, before any header is sent

        def failed(future: asyncio.Future) -> None:  # the batch failed: after the pieces it sent, the error
            if not future.cancelled() and future.exception() is not None:
                events.put_nowait(future.exception())

        job.future.add_done_callback(failed)

        async def pieces() -> AsyncIterator[Piece]:
            nonlocal gone
            try:
                while True:
                    piece = await events.get()  # a finished row always sent its last piece
                    if isinstance(piece, BaseException):
                        raise piece
                    yield piece
                    if piece.finish:
                        self._count_tokens(len(prompt_ids), (await job.future).tokens)
                        return
            finally:
                gone = True  # a client that left stops its row at the next step

        return lease, RowStream(job, pieces())

    async def score(self, user: str | None, text: str, labels: list[str], adapter: bool = True, context: str = ""
                    ) -> tuple[list[float], Lease]:
        """Log-likelihood of each label as the answer to `text` under the task's prompt, `context` (a
        user's profile or nearest texts) in front of it; `adapter` as in `lease`."""
        spec = self.score_spec(labels)
        if context:
            text, spec = spec.render_with(text, context), spec.rendered()
        encoded = [encode(self.tokenizer, spec, text, label, self.cfg.max_prompt_tokens) for label in labels]
        lease = await self.lease(user, adapter)
        soft = await self._plugged(lease, user, spec.render(text))
        scores = await self._submit(lease, "score", ScoreRow(encoded, lease.slot, soft=soft))
        self._count_tokens(sum(len(ids) for ids, _ in encoded), 0)
        return scores, lease

    async def prompt_logprobs(self, user: str | None, prompt_ids: list[int], top: int,
                              seats: Seats | None = None, adapter: bool = True) -> tuple[list[Picked], Lease]:
        """Each prompt token's log-probability under the user's adapter (echo with logprobs), between steps;
        `adapter` as in `lease`."""
        lease = await self.lease(user, adapter)
        picked = await self._submit(lease, "score", PromptRow(prompt_ids, lease.slot, top), seats)
        self._count_tokens(len(prompt_ids), 0)
        return picked, lease

    def score_spec(self, labels: list[str]) -> TaskSpec:
        """The served task's prompt with these labels."""
        return TaskSpec(name=self.cfg.task, kind="classification", prompt=self.spec.prompt, labels=labels)

    def _count_tokens(self, prompt: int, completion: int) -> None:
        self.metrics.tokens.labels(kind="prompt").inc(prompt)
        self.metrics.tokens.labels(kind="completion").inc(completion)
