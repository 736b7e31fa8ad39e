"""How one row picks its next token: OpenAI's sampling options over a row of logits.

Each row carries its own `Sampling` and its own `Picker` (its seeded random
generator and the counts of the tokens it has written), so a row's tokens do not
depend on which other rows share its batch: a seeded request gives the same text
alone or in a crowd. Order of the work, as OpenAI documents it: `logit_bias` is
added, the presence and frequency penalties are subtracted, then greedy argmax at
temperature 0, else temperature and nucleus (`top_p`) sampling. Log-probabilities
are the model's own (a log-softmax of the raw logits, before bias and penalties),
as vLLM reports them by default.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """How one row picks its tokens and when it stops."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the picked token's and the k likeliest tokens'."""


@dataclass
class Picked:
    """One written token, with its log-probability and the likeliest alternatives when asked."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class Picker:
    """One row's token choice: its sampling, random generator and the tokens it wrote so far."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.counts: Counter[int] = Counter()
        """Tokens written so far, counted for the penalties (only where the row has any)."""
        self.penalized = bool(sampling.presence_penalty or sampling.frequency_penalty)
        bias = sampling.logit_bias
        # float64: one rounding to the logits' dtype, as from a Python float; cast once per dtype (`_cast`).
        self._bias = (torch.tensor(list(bias), dtype=torch.long), torch.tensor(list(bias.values()),
                                                                                dtype=torch.float64)) if bias else None
        self._cast = self._bias

    def shifts(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        """What to add to the row's logits, as (token ids, amounts) each with no id twice: logit_bias, then
        minus the presence / frequency penalties of the tokens written so far (None: nothing)."""
        s = self.sampling
        if self._cast is not None and self._cast[1].dtype != dtype:
            self._cast = (self._bias[0], self._bias[1].to(dtype))
        if not (self.penalized and self.counts):
            return self._cast, None
        seen = torch.tensor(list(self.counts.values()), dtype=dtype)
        return self._cast, (torch.tensor(list(self.counts), dtype=torch.long),
                            -(seen * s.frequency_penalty + s.presence_penalty))

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from already adjusted logits of one row."""
        s = self.sampling
        if s.temperature <= 0:
            return int(logits.argmax())
        row = logits.float()
        probs = torch.softmax((row - row.max()) / s.temperature, dim=-1)  # no inf/inf at tiny temperatures
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set reaching top_p
            sorted_p[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> Picked:
        """Choose, report and remember one row's next token (`pick_batch` of one row)."""
        return pick_batch(logits.unsqueeze(0), [self])[0]

    def report(self, logits: torch.Tensor, token: int) -> Picked:
        """The token with its raw log-probability and the top alternatives (a row that asks for them)."""
        k = self.sampling.logprobs
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if k > 0:
            values, ids = logp.topk(min(k, logp.numel()))
            top = list(zip(ids.tolist(), values.tolist()))
        return Picked(token, float(logp[token]), top)


def adjusted_batch(logits: torch.Tensor, pickers: list[Picker]) -> torch.Tensor:
    """Every row's logits `[rows, vocab]` after its logit_bias and penalties (`logits` itself where no row has
    any): one indexed add for all rows' biases, then one for their penalties, each row's sums as it alone
    would make them (no id twice in one add), so a row's choice does not depend on its neighbours."""
    shifts = [picker.shifts(logits.dtype) for picker in pickers]
    if all(bias is None and penalty is None for bias, penalty in shifts):
        return logits
    adjusted = logits.clone()
    for k in range(2):
        part = [(i, shift[k]) for i, shift in enumerate(shifts) if shift[k] is not None]
        if part:
            at = torch.repeat_interleave(torch.tensor([i for i, _ in part]), torch.tensor([len(s[0]) for _, s in part]))
            ids, amounts = torch.cat([s[0] for _, s in part]), torch.cat([s[1] for _, s in part])
            adjusted.index_put_((at.to(logits.device), ids.to(logits.device)), amounts.to(logits.device),
                                accumulate=True)
    return adjusted


def pick_batch(logits: torch.Tensor, pickers: list[Picker]) -> list[Picked]:
    """The next token of every row of `logits` `[rows, vocab]`, each by its own picker: the adjustments and
    the greedy rows' argmax batched, sampled rows each with its own generator."""
    adjusted = adjusted_batch(logits, pickers)
    argmax = adjusted.argmax(-1).tolist()
    out = []
    for i, picker in enumerate(pickers):
        s = picker.sampling
        token = argmax[i] if s.temperature <= 0 else picker.choose(adjusted[i])
        if picker.penalized:
            picker.counts[token] += 1
        out.append(Picked(token) if s.logprobs is None else picker.report(logits[i], token))
    return out
