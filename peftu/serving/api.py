"""The HTTP API's shapes: OpenAI-compatible requests and answers, and errors.

Requests are pydantic models that refuse unknown fields, so a misspelt option
is an error rather than silently ignored. Every error answer has OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
and a message that names what was wrong.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from peftu.errors import InvalidIdError
from peftu.inference.sampling import Sampling
from peftu.store import validate_id

MAX_PROMPT_CHARS = 64_000
MAX_STOPS = 4


class ApiError(Exception):
    """An answer other than 200, with a message for the client."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
            continue
        where = ".".join(loc) or "body"
        param = param or where
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err["msg"]
        problems.append(f"{where}: {msg}")
    return "; ".join(problems) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """400 for bad bodies, our ApiErrors as they are, the router's 404/405s: all in OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """The router's and body parser's own errors (unknown path, wrong method, unreadable body)."""
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        message = (f"the body is not valid JSON ({detail})" if exc.status_code == 400 else
                   f"{request.method} {request.url.path}: {detail}")
        return JSONResponse(error_body(message, "not_found_error" if exc.status_code == 404 else
                                       "invalid_request_error"), status_code=exc.status_code, headers=exc.headers)


# --- requests ----------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """OpenAI's sampling options (n and user are accepted for compatibility)."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, description="OpenAI's end-user tag; ignored (the model names the adapter)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop sequences must be 1 to 64 characters")
        return stops

    def sampling(self, limit: int) -> Sampling:
        if self.max_tokens > limit:
            raise ApiError(400, f"max_tokens is {self.max_tokens}, this server allows at most {limit}",
                           "max_tokens")
        return Sampling(self.max_tokens, self.temperature, self.top_p, list(self.stop or []), self.seed)


class CompletionRequest(SamplingFields):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)


class ScoreRequest(_Strict):
    """Label scoring: which of `labels` is the likeliest answer to `input` under the task's prompt."""

    model: str = Field(min_length=1, max_length=512)
    input: str = Field(max_length=MAX_PROMPT_CHARS)
    labels: list[str] | None = Field(None, min_length=2, max_length=64)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(set(value)) != len(value) or any(not x for x in value)):
            raise ValueError("labels must be distinct and non-empty")
        return value


def chat_prompt(messages: list[ChatMessage], tokenizer) -> str:
    """The tokenizer's chat template if it has one, else `role: content` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content  # a bare prompt, as the tiny base was trained on
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def resolve_user(model: str, header: str | None, model_name: str) -> str | None:
    """The user whose adapter a request asks for (None: the base model).

    `model` is `<model_name>` or `<model_name>:<user_id>`; the multiplex header,
    if any, is `<model_name>:<user_id>` too and must agree with the body.
    """
    def parse(value: str, what: str) -> str | None:
        if value == model_name:
            return None
        name, sep, user = value.partition(":")
        if not sep or name != model_name:
            raise ApiError(404, f"{what} {value!r} is not served here; use {model_name!r} or "
                           f"'{model_name}:<user_id>'", "model", "not_found_error")
        try:
            return validate_id(user, "user id")
        except InvalidIdError as e:
            raise ApiError(400, str(e), "model") from None

    user = parse(model, "model")
    if header:
        from_header = parse(header, "serve_multiplexed_model_id header")
        if user is not None and from_header != user:
            raise ApiError(400, f"the model names user {user!r} but the serve_multiplexed_model_id "
                           f"header names {from_header!r}", "model")
        user = from_header
    return user


# --- answers ------------------------------------------------------------------------


def _ids(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())


def completion_body(model: str, text: str, finish: str, prompt_tokens: int, tokens: int) -> dict:
    rid, created = _ids("cmpl")
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens}}


def chat_body(model: str, text: str, finish: str, prompt_tokens: int, tokens: int) -> dict:
    rid, created = _ids("chatcmpl")
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens}}


def stream_chunk(chat: bool, rid: str, created: int, model: str, delta: str, finish: str | None) -> dict:
    """One server-sent event's data, as OpenAI streams it."""
    if chat:
        choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]}
