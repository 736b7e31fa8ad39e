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


class RowState:
    """Tokens and text of one row as it decodes; decides when it is done."""

    def __init__(self, row: GenRow, eos_id: int, decode: Callable[[list[int]], str]):
        self.row, self.eos_id, self.decode = row, eos_id, decode
        self.picker = Picker(row.sampling)
        self.ids: list[int] = []
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
        if picked.token == self.eos_id:
            finish = "stop"
        else:
            self.ids.append(picked.token)
        text = self.decode(self.ids)
        cuts = [text.find(x) for x in s.stop if x and x in text]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        elif finish is None and len(self.ids) >= s.max_tokens:
            finish = "length"
        elif finish is None and self.row.cancelled():
            finish = "cancelled"
        # Hold back what could be the start of a stop string or a half-decoded character.
        safe = text if finish else text[:len(text) - self.hold].rstrip("\ufffd")
        self._send(safe, text, finish)

    def cancel(self) -> None:
        """The caller went away before the row finished: it ends now, with what it has."""
        text = self.decode(self.ids)
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
            self.result = GenResult(text, finish, len(self.ids), self.picked)
