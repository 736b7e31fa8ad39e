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

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits is the answer: nothing to adjust, nothing to report."""
        return (self.temperature <= 0 and not self.logit_bias and self.logprobs is None
                and not self.presence_penalty and not self.frequency_penalty)


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

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits after logit_bias and the presence / frequency penalties."""
        s = self.sampling
        if not (s.logit_bias or (self.counts and (s.presence_penalty or s.frequency_penalty))):
            return logits
        logits = logits.clone()
        if s.logit_bias:
            ids = torch.tensor(list(s.logit_bias), dtype=torch.long, device=logits.device)
            logits[ids] += torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
            seen = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= seen * s.frequency_penalty + s.presence_penalty
        return logits

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
        """Choose, report and remember one row's next token."""
        token = self.choose(self.adjusted(logits))
        self.counts[token] += 1
        return self.report(logits, token)

    def report(self, logits: torch.Tensor, token: int) -> Picked:
        """The token with its raw log-probability and the top alternatives, if this row asks for them."""
        k = self.sampling.logprobs
        if k is None:
            return Picked(token)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if k > 0:
            values, ids = logp.topk(min(k, logp.numel()))
            top = list(zip(ids.tolist(), values.tolist()))
        return Picked(token, float(logp[token]), top)


def pick_batch(logits: torch.Tensor, pickers: list[Picker]) -> list[Picked]:
    """The next token of every row of `logits` `[rows, vocab]`, each by its own picker.

    Rows that only want plain greedy argmax share one batched argmax.
    """
    argmax = logits.argmax(-1).tolist()
    out = []
    for i, picker in enumerate(pickers):
        if picker.sampling.plain_greedy:
            out.append(Picked(argmax[i]))
        else:
            out.append(picker.pick(logits[i]))
    return out
