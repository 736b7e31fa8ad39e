"""Completions and chat requests as rows of the engine, and their answers as OpenAI sends them.

A request asks for `n` choices of each of its prompts (completions take one
prompt or a list, as text or token ids); each (prompt, choice) is one row of
the replica's running batch, so the choices are written side by side. With a
`seed`, choice j samples with `seed + j`: the choices differ from each other,
and the same request gives the same answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse

from peftu.config import ServeConfig
from peftu.inference.generate import GenResult, Piece
from peftu.inference.sampling import Picked, Sampling
from peftu.serving.adapters import Lease
from peftu.serving.answers import Choice, StreamShape, TokenText, body
from peftu.serving.api import ApiError, CompletionRequest, RequestLimits, SamplingFields, error_body
from peftu.serving.batcher import Seats
from peftu.serving.engine import Engine, RowStream

log = logging.getLogger("peftu.serving")


@dataclass
class Rows:
    """A request's rows: prompt token ids, the echoed text per prompt, and each row's sampling."""

    prompts: list[list[int]]
    echoes: list[str]
    n: int
    sampling: Sampling

    def each(self) -> list[tuple[int, list[int], Sampling]]:
        """(prompt index, prompt ids, sampling) of every row, in OpenAI's choice order."""
        s = self.sampling
        return [(i, ids, s if s.seed is None else dataclasses.replace(s, seed=s.seed + j))
                for i, ids in enumerate(self.prompts) for j in range(self.n)]

    @property
    def jobs(self) -> int:
        """Jobs the rows queue: one generation each, and a prompt scoring each with echo and logprobs."""
        scored = self.sampling.logprobs is not None
        return sum(1 + bool(scored and self.echoes[i]) for i, _, _ in self.each())

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)


class Completions:
    """Turns `/v1/completions` and `/v1/chat/completions` bodies into rows and rows into answers."""

    def __init__(self, engine: Engine, cfg: ServeConfig, headers):
        self.engine, self.cfg, self.headers = engine, cfg, headers
        self.limits = RequestLimits(cfg.max_tokens_limit, cfg.max_choices, cfg.max_logprobs)
        self.vocab_size = len(engine.tokenizer)
        self.texts = TokenText(engine.tokenizer, engine.tokenizer.eos_token_id)

    # --- requests -----------------------------------------------------------------------

    def checked(self, ids: list[int]) -> list[int]:
        """A prompt's ids: at least one, within `max_prompt_tokens` and the vocabulary (a 400 naming which, else)."""
        if not ids:
            raise ApiError(400, "the prompt has no tokens: give at least one", "prompt")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, this server allows at most "
                           f"{self.cfg.max_prompt_tokens}", "prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ApiError(400, f"prompt: token id {bad[0]} is not in the vocabulary (0..{self.vocab_size - 1})",
                           "prompt")
        return ids

    def rows(self, request: SamplingFields, prompts: list[str | list[int]]) -> Rows:
        """Check a request against the server's limits and tokenize its prompts."""
        if len(prompts) * request.n > self.limits.max_choices:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={request.n} is {len(prompts) * request.n} "
                           f"choices, this server allows at most {self.limits.max_choices} per request", "n")
        sampling = request.sampling(self.limits, self.vocab_size)
        ids = [self.checked(self.engine.encode_prompt(p) if isinstance(p, str) else list(p)) for p in prompts]
        echo = isinstance(request, CompletionRequest) and request.echo
        echoes = [(p if isinstance(p, str) else self.engine.tokenizer.decode(p, skip_special_tokens=True))
                  if echo else "" for p in prompts]
        return Rows(ids, echoes, request.n, sampling)

    # --- answers ------------------------------------------------------------------------

    async def answer(self, request: SamplingFields, rows: Rows, user: str | None, chat: bool,
                     headers: Callable[[Lease], dict[str, str]] | None = None, adapter: bool = True) -> Response:
        """The rows' answers as OpenAI sends them; `headers(lease)` (default: the adapter's) go with them.
        `adapter` False: the user's adapter is not loaded (`Engine.lease`)."""
        logprobs = rows.sampling.logprobs is not None
        headers = headers or self.headers
        if request.stream:
            shape = StreamShape(chat, request.model, logprobs, request.include_usage, self.texts)
            streams: list[tuple[Lease, RowStream]] = []
            try:
                with self.engine.hold(rows.jobs) as seats:
                    for _, ids, s in rows.each():
                        streams.append(await self.engine.stream(user, ids, s, seats, adapter=adapter))
            except BaseException:  # a later row refused (a full queue): the earlier ones stop too
                for _, pieces in streams:
                    await pieces.aclose()
                raise
            return StreamingResponse(self._sse(shape, rows, [pieces for _, pieces in streams]),
                                     media_type="text/event-stream", headers=headers(streams[0][0]))
        with self.engine.hold(rows.jobs) as seats:  # refused whole now, or every row gets a place
            tasks = [asyncio.create_task(self._one(user, ids, s, bool(rows.echoes[i]), seats, adapter))
                     for i, ids, s in rows.each()]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:  # one row failed or was refused: the others stop at their next step
                for task in tasks:
                    task.cancel()
                raise
        choices = [Choice(r.text, r.finish_reason, r.picked, rows.echoes[i], echoed)
                   for (i, _, _), (r, _, echoed) in zip(rows.each(), results)]
        return JSONResponse(body(chat, request.model, choices, rows.prompt_tokens, self.texts, logprobs),
                            headers=headers(results[0][1]))

    async def _one(self, user: str | None, ids: list[int], sampling: Sampling, echo: bool, seats: Seats,
                   adapter: bool) -> tuple[GenResult, Lease, list[Picked]]:
        """One row's result, its lease, and with echo and logprobs the prompt's own tokens."""
        echoed, lease = [], None
        if echo and sampling.logprobs is not None:
            echoed, lease = await self.engine.prompt_logprobs(user, ids, sampling.logprobs, seats, adapter=adapter)
        if sampling.max_tokens == 0:  # echo alone: nothing to write
            if lease is None:
                lease = await self.engine.lease(user, adapter)
                self.engine.adapters.release(lease)
            return GenResult("", "length", 0), lease, echoed
        done = await self.engine.complete(user, ids, sampling, seats, adapter=adapter)
        return done.result, done.lease, echoed

    async def _sse(self, shape: StreamShape, rows: Rows, streams: list[RowStream]) -> AsyncIterator[str]:
        """Every row's pieces as they come, tagged with their choice index, then usage and [DONE]."""
        queue: asyncio.Queue[tuple[int, Piece | BaseException]] = asyncio.Queue()

        async def pump(index: int, pieces: RowStream) -> None:
            try:
                async for piece in pieces:
                    await queue.put((index, piece))
            except Exception as e:  # noqa: BLE001 - reported in the stream below
                await queue.put((index, e))
            finally:
                with contextlib.suppress(Exception):
                    await pieces.aclose()

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        pumps = [asyncio.create_task(pump(i, pieces)) for i, pieces in enumerate(streams)]
        written, left = 0, len(streams)
        try:
            for index, (i, _, _) in enumerate(rows.each()):
                if shape.chat:
                    yield event(shape.chunk(index, None, None, role=True))
                elif rows.echoes[i]:
                    yield event(shape.chunk(index, rows.echoes[i], None))
            while left:
                index, piece = await queue.get()
                if isinstance(piece, BaseException):  # headers are gone already: report in the stream
                    log.error("stream failed: %s", piece)
                    yield event(error_body(f"generation failed: {piece}", "server_error"))
                    left -= 1
                    continue
                written += len([p for p in piece.tokens if p.token != self.texts.eos_id])
                yield event(shape.chunk(index, piece.text, piece.finish, piece.tokens))
                left -= piece.finish is not None
            if shape.include_usage:
                yield event(shape.usage_chunk(rows.prompt_tokens, written))
            yield "data: [DONE]\n\n"
        finally:
            for task in pumps:
                task.cancel()
