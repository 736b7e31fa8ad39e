"""One generation request as the decode loop sees it: its input, slot and sampling, and its text as it grows.

`GenRow` is what a caller hands in, `RowState` follows one row from its first
token to its finish reason (token budget, EOS, a stop string, or its caller
gone), streaming `Piece`s through the row's `emit` as text becomes safe to send.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from peftu.bank import AdapterBank
from peftu.inference.sampling import Picked, Picker, Sampling

log = logging.getLogger("peftu.inference")

BASE_SLOT = 0
"""The bank slot kept at zero: rows of users without an adapter."""


@dataclass
class GenRow:
    """One request in a generation batch."""

    prompt_ids: list[int]
    slot: int
    sampling: Sampling
    emit: Callable[[Piece], None] = lambda piece: None
    """Called (from the batch's thread) with each new piece of text; the last one has the finish reason."""
    cancelled: Callable[[], bool] = lambda: False
    soft: torch.Tensor | None = None
    """Soft tokens `[n, hidden]` after the prompt (PPlug's); None: the prompt alone."""


@dataclass
class Piece:
    """New text of a row as it streams, the tokens written since the last piece, and at the end why it stopped."""

    text: str
    finish: str | None
    tokens: list[Picked]


@dataclass
class GenResult:
    text: str
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"."""
    tokens: int
    picked: list[Picked] = field(default_factory=list)
    """Every token the row wrote (EOS included), with log-probabilities where the row asked for them."""


def slots_context(bank: AdapterBank | None, slots: list[int], gathered: dict | None = None,
                  runs: list[tuple[int, int, int]] | None = None):
    """bank.rows over these slots (and, in a packed forward, these runs of tokens: `SlotContext.runs`);
    the plain base when no row has an adapter. `gathered`: the rows' weights kept while they run
    (`peftu.bank.rows.RowWeights`); None: each layer gathers them at the forward."""
    if all(s == BASE_SLOT for s in slots) and all(slot == BASE_SLOT for _, _, slot in runs or []):
        return contextlib.nullcontext()
    return bank.rows(torch.tensor(slots, dtype=torch.long), gathered=gathered, runs=runs)


class RowText:
    """A row's text as its tokens come, each token decoding only what it adds.

    Decoding every token the whole output again costs a row time quadratic in its length (42 us a token at
    256 tokens on the tiny base's tokenizer); tokenizers' `DecodeStream` decodes the new token alone (under
    1 us) and holds back half a character until its last byte comes. A tokenizer without that backend, or
    one that tidies spaces at decode, decodes everything each time, as its `decode` is the truth.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        streams = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if streams else None
        self._stream = DecodeStream(skip_special_tokens=True) if streams else None
        self.ids: list[int] = []
        self.text = ""
        """The text of `ids`, short of a character whose last byte has not come."""

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self._stream is None:
            self.text = self.whole().rstrip("\ufffd")
        else:
            self.text += self._stream.step(self._backend, token) or ""

    def whole(self) -> str:
        """The text of every token, a half-written last character as U+FFFD: the row's answer."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class RowState:
    """Tokens and text of one row as it decodes; decides when it is done."""

    def __init__(self, row: GenRow, eos_id: int, tokenizer):
        self.row, self.eos_id = row, eos_id
        self.out = RowText(tokenizer)
        self.picker = Picker(row.sampling)
        self.picked: list[Picked] = []
        self.unsent: list[Picked] = []
        self.sent = ""
        self.result: GenResult | None = None
        self.hold = max((len(x) for x in row.sampling.stop), default=1) - 1
        self.token_times: list[float] = []
        """When each token was written (time.monotonic), for time to first token and inter-token latency."""

    def push(self, picked: Picked) -> None:
        s = self.row.sampling
        finish = None
        self.token_times.append(time.monotonic())
        self.picked.append(picked)
        self.unsent.append(picked)
        before = len(self.out.text)
        if picked.token == self.eos_id:
            finish = "stop"
        else:
            self.out.add(picked.token)
        text = self.out.text
        # A stop string can only end in the new text: earlier text was searched when it came.
        cuts = [at for x in s.stop if x and (at := text.find(x, max(0, before - len(x) + 1))) >= 0]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif finish is None and len(self.out.ids) >= s.max_tokens:
            finish = "length"
        elif finish is None and self.row.cancelled():
            finish = "cancelled"
        if finish and not cuts:  # the answer: every token, a half-written last character included
            text = self.out.whole()
        # Hold back what could be the start of a stop string.
        safe = text if finish else text[:len(text) - self.hold]
        self._send(safe, text, finish)

    def cancel(self) -> None:
        """The caller went away before the row finished: it ends now, with what it has."""
        text = self.out.whole()
        self._send(text, text, "cancelled")

    def _send(self, safe: str, text: str, finish: str | None) -> None:
        delta = safe[len(self.sent):] if len(safe) > len(self.sent) else ""
        if delta or finish:
            try:
                self.row.emit(Piece(delta, finish, self.unsent))
            except Exception:  # noqa: BLE001 - whoever read this row is gone: it ends, the batch goes on
                log.warning("a row's reader failed; the row ends", exc_info=True)
                finish = finish or "cancelled"
            self.unsent = []
            self.sent = safe if len(safe) > len(self.sent) else self.sent
        if finish:
            self.result = GenResult(text, finish, len(self.out.ids), self.picked)
