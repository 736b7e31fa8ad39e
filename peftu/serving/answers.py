"""The HTTP API's answers: OpenAI's completion and chat bodies, stream chunks and log-probabilities.

A request becomes one row per (prompt, choice); each row's `GenResult` becomes
one choice, indexed as OpenAI does (`prompt * n + choice`). Log-probabilities
come in the two shapes OpenAI uses: completions' parallel lists (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and chat's list of token
objects (`token`, `logprob`, `bytes`, `top_logprobs`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from peftu.inference.sampling import Picked


@dataclass
class Choice:
    """One row's answer: the text (after the echoed prompt, if any), why it ended, its tokens."""

    text: str
    finish_reason: str
    picked: list[Picked] = field(default_factory=list)
    echo: str = ""
    echo_picked: list[Picked] = field(default_factory=list)
    """The prompt's tokens, each with its log-probability (the first has none), when echo asks for them."""


def new_id(chat: bool) -> tuple[str, int]:
    """A response id and creation time, as OpenAI makes them."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Token ids as the text pieces OpenAI's log-probabilities name them by."""

    def __init__(self, tokenizer, eos_id: int | None):
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __call__(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def written(self, picked: list[Picked], text: str) -> list[Picked]:
        """The tokens that make up `text`: without EOS and without any after a stop string's cut."""
        tokens = [p for p in picked if p.token != self.eos_id]
        ids: list[int] = []
        for i, p in enumerate(tokens):
            if ids and len(self.tokenizer.decode(ids, skip_special_tokens=True)) >= len(text):
                return tokens[:i]
            ids.append(p.token)
        return tokens

    def completion_logprobs(self, picked: list[Picked]) -> dict:
        """Completions' shape; a token without a log-probability (an echoed prompt's first) has nulls."""
        tokens, logprobs, tops, offsets = [], [], [], []
        offset = 0
        for p in picked:
            piece = self(p.token)
            tokens.append(piece)
            logprobs.append(p.logprob)
            tops.append({self(t): lp for t, lp in p.top} if p.logprob is not None else None)
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, picked: list[Picked]) -> dict:
        """Chat's shape: a token object per written token."""
        def entry(token: int, logprob: float) -> dict:
            piece = self(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(t, lp) for t, lp in p.top]}
                            for p in picked],
                "refusal": None}


def _choice_logprobs(choice: Choice, texts: TokenText, chat: bool, wanted: bool) -> dict | None:
    if not wanted:
        return None
    written = texts.written(choice.picked, choice.text)
    if chat:
        return texts.chat_logprobs(written)
    return texts.completion_logprobs([*choice.echo_picked, *written] if choice.echo_picked else written)


def body(chat: bool, model: str, choices: list[Choice], prompt_tokens: int, texts: TokenText,
         logprobs: bool) -> dict:
    """A whole (non-streamed) answer."""
    rid, created = new_id(chat)
    completion_tokens = sum(len([p for p in c.picked if p.token != texts.eos_id]) for c in choices)
    if chat:
        out = [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "finish_reason": c.finish_reason, "logprobs": _choice_logprobs(c, texts, True, logprobs)}
               for i, c in enumerate(choices)]
        kind = "chat.completion"
    else:
        out = [{"index": i, "text": c.echo + c.text, "finish_reason": c.finish_reason,
                "logprobs": _choice_logprobs(c, texts, False, logprobs)} for i, c in enumerate(choices)]
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": out,
            "usage": usage(prompt_tokens, completion_tokens)}


@dataclass
class StreamShape:
    """What every chunk of one streamed answer shares."""

    chat: bool
    model: str
    logprobs: bool
    include_usage: bool
    texts: TokenText
    rid: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.rid, self.created = new_id(self.chat)

    def chunk(self, index: int, text: str | None, finish: str | None, picked: list[Picked] | None = None,
              role: bool = False) -> dict:
        """One choice's piece; `role`: chat's opening delta that names the assistant."""
        written = [p for p in picked or [] if p.token != self.texts.eos_id]
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            logprobs = self.texts.chat_logprobs(written) if self.logprobs and written else None
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            out = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [choice]}
        else:
            logprobs = self.texts.completion_logprobs(written) if self.logprobs and written else None
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            out = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model,
                   "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk stream_options.include_usage asks for: no choices, the request's usage."""
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
