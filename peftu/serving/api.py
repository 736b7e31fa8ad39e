"""The HTTP API's shapes: OpenAI-compatible requests and answers, and errors.

Requests are pydantic models that refuse unknown fields, so a misspelt option
is an error rather than silently ignored. Every error answer has OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
and a message that names what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException

from peftu.errors import InvalidIdError
from peftu.inference.sampling import Sampling
from peftu.serving.batcher import Overloaded, TooLarge
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
        msg = "unknown field" if err.get("type") == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return "; ".join(problems) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """400 for bad bodies, our ApiErrors as they are, the router's 404/405s: all in OpenAI's error shape."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        """A full queue says no at once; the client may come back in a second."""
        return JSONResponse(error_body(str(exc), "rate_limit_error"), status_code=429, headers={"Retry-After": "1"})

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse(error_body(str(exc), param="max_tokens"), status_code=400)

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


def _nothing(value: Any) -> bool:
    return value is None or value == [] or value == {}


# Fields OpenAI's SDK may send that have no meaning on this server, each with the values that ask
# for nothing (those are accepted). Any other value is a 400 naming the field; a field that is in
# neither the request models nor here is an unknown field, also a 400, as OpenAI answers.
_NOT_SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "tools": _nothing, "functions": _nothing, "parallel_tool_calls": _nothing, "audio": _nothing,
    "prediction": _nothing, "reasoning_effort": _nothing, "web_search_options": _nothing,
    "verbosity": _nothing, "moderation": _nothing, "prompt_cache_options": _nothing,
    "prompt_cache_retention": _nothing,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v in (None, ["text"]),
    "store": lambda v: not v,
    "service_tier": lambda v: v in (None, "auto", "default"),
    "suffix": lambda v: not v,
}
_CHAT_NOT_SUPPORTED = [k for k in _NOT_SUPPORTED if k != "suffix"]


def _refuse_unless_neutral(value: Any, info: ValidationInfo) -> Any:
    if not _NOT_SUPPORTED[info.field_name](value):
        raise ValueError(f"not supported by this server (it has no meaning here): {value!r:.80}")
    return value


class StreamOptions(_Strict):
    include_usage: bool = False
    """A last chunk with the request's usage (and no choices) before [DONE]."""
    include_obfuscation: bool | None = Field(None, description="accepted; no padding is added")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of this server (from ServeConfig)."""

    max_tokens: int
    max_choices: int
    max_logprobs: int


class SamplingFields(_Strict):
    """OpenAI's sampling options, common to completions and chat."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="choices per prompt, each its own row")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    user: str | None = Field(None, max_length=512, description="OpenAI's end-user tag; ignored "
                             "(the model names the adapter)")
    safety_identifier: str | None = Field(None, max_length=512, description="ignored, like user")
    prompt_cache_key: str | None = Field(None, max_length=512, description="a caching hint; ignored")
    metadata: dict[str, str] | None = Field(None, description="ignored (nothing is stored)")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop sequences must be 1 to 64 characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, {key!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {key}: a bias is between -100 and 100, got {bias}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def token_budget(self) -> int | None:
        """max_completion_tokens (chat's current name) or max_tokens; None when neither is given."""
        return self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """How many alternatives to report per token; None: no log-probabilities."""
        return None

    def sampling(self, limits: RequestLimits, vocab_size: int) -> Sampling:
        """This request's sampling of one row, checked against the server's limits."""
        budget = self.token_budget()
        budget = limits.max_tokens if budget is None else budget
        if budget > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {budget}, this server allows at most {limits.max_tokens}",
                           "max_tokens")
        top = self.top_logprobs_count()
        if top is not None and top > limits.max_logprobs:
            raise ApiError(400, f"logprobs: at most {limits.max_logprobs} alternatives per token here, "
                           f"got {top}", "logprobs")
        bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if any(k >= vocab_size for k in bias):
            raise ApiError(400, f"logit_bias names token {max(bias)}, the vocabulary has {vocab_size} tokens",
                           "logit_bias")
        return Sampling(budget, self.temperature, self.top_p, list(self.stop or []), self.seed,
                        self.presence_penalty, self.frequency_penalty, bias, top)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    """The prompt before each choice's text (and, with logprobs, its tokens' log-probabilities)."""
    logprobs: int | None = Field(None, ge=0)
    """The picked token's log-probability and this many likeliest alternatives, per token."""
    best_of: int | None = Field(None, ge=1)
    suffix: Any = None

    refuse_unsupported = field_validator("suffix", mode="before")(_refuse_unless_neutral)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list holds no prompt")
        texts = [value] if isinstance(value, str) else [p for p in value if isinstance(p, str)]
        if any(len(t) > MAX_PROMPT_CHARS for t in texts):
            raise ValueError(f"a prompt is over {MAX_PROMPT_CHARS} characters")
        if any(isinstance(p, list) and not p for p in value):
            raise ValueError("an empty list of token ids is no prompt")
        return value

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of other than n is not supported by this server (best_of={self.best_of}, "
                             f"n={self.n}): ask for n choices and pick")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 writes nothing: it is only meaningful with echo")
        return self

    def token_budget(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One prompt or several, each text or token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(p, int) for p in value):
            return [value]
        return list(value)


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(None, max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=256, description="accepted; not shown to the model")
    refusal: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(None, ge=1)
    """The SDK's current name for max_tokens (if both are given they must agree)."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: Any = None
    functions: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    store: Any = None
    service_tier: Any = None

    refuse_unsupported = field_validator(*_CHAT_NOT_SUPPORTED, mode="before")(_refuse_unless_neutral)

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) disagree: give one")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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
    """The tokenizer's chat template if it has one, else `role: content` lines (developer is system)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if len(turns) == 1 and turns[0]["role"] == "user":
        return turns[0]["content"]  # a bare prompt, as the tiny base was trained on
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"


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
