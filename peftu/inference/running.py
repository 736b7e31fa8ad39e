"""A running batch: generation rows join and leave between decode steps, each on its own bank slot.

Every `step()` is one forward (`peftu.inference.kv.packed_forward`: every row's
new tokens packed in one sequence) that holds the next token of every row that
is generating and one chunk of prefill for the rows that joined (`add`) and are
still reading their prompts, at most `chunk` tokens each, so a long prompt does
not hold up everyone's next token. A row whose prompt is read picks its first
token from that chunk's logits and starts generating; a row
that is done (token budget, EOS, stop string) or whose caller went away
(`GenRow.cancelled`) leaves at once and frees its KV slot. All rows share one
`KVSlots`, the generating rows in its first slots and the reading ones after
them, so a row that starts generating stays where it is or swaps with a
reading row, and a leave moves one row, never the batch. With a KV budget the
slots stay within it; `fits` says whether rows could join. All rows
joining at step 0 with no chunk limit is the static batch `generate_batch`
runs: one prefill, then decode to the last row.

A PEFT prompt-learning model puts its virtual tokens before every prompt as in
its training: prompt tuning's embeddings are read with the prompt, prefix
tuning's keys and values start each joining row's cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from peftu.bank import AdapterBank
from peftu.bank.rows import RowWeights
from peftu.inference.kv import KVSlots, packed_forward, use_packed_attention
from peftu.inference.rows import GenRow, RowState, slots_context
from peftu.inference.sampling import pick_batch
from peftu.inference.soft import soft_len


class PromptLearning:
    """What a PEFT prompt-learning model (prompt or prefix tuning) puts before every prompt; nothing for
    any other model. `model` is the model the forwards run on (the one under a prompt-learning model)."""

    def __init__(self, model):
        config = getattr(model, "active_peft_config", None)
        self.kind: str | None = None
        self.n = 0
        self.model = model
        self.virtual: torch.Tensor | None = None
        """Prompt tuning's virtual-token embeddings `[n, hidden]`."""
        if config is None or not config.is_prompt_learning:
            return
        if config.peft_type not in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
            raise ValueError(f"cannot generate with a {config.peft_type} model")
        self.peft, self.n, self.model = model, config.num_virtual_tokens, model.get_base_model()
        self.kind = "prefix" if config.peft_type == "PREFIX_TUNING" else "virtual"
        if self.kind == "virtual":
            self.virtual = model.get_prompt(batch_size=1)[0].detach()

    def prefix(self, rows: int) -> tuple[DynamicCache | None, int]:
        """Prefix tuning's keys and values for `rows` new rows, and their columns."""
        if self.kind != "prefix":
            return None, 0
        return self.peft.get_prompt(rows), self.n


class _Reading:
    """A row still reading its input: token ids (placeholders where embeddings go) and, for rows with
    soft or virtual tokens, the whole input's embeddings."""

    def __init__(self, state: RowState, ids: list[int], embeds: torch.Tensor | None):
        self.state, self.ids, self.embeds = state, ids, embeds
        self.done = 0

    def next_len(self, chunk: int | None) -> int:
        left = len(self.ids) - self.done
        return left if chunk is None else min(chunk, left)


class RunningBatch:
    """Rows of any users generating together; rows join (`add`) and leave between steps (`step`)."""

    def __init__(self, model, bank: AdapterBank | None, tokenizer, *, chunk: int | None = None, slots: int = 0,
                 kv_budget: int | None = None):
        if chunk is not None and chunk < 1:
            raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
        self.learning = PromptLearning(model)
        self.model, self.bank, self.tokenizer, self.chunk = self.learning.model, bank, tokenizer, chunk
        use_packed_attention(self.model)
        self.device = self.model.device
        self.decoding: list[RowState] = []
        self.reading: list[_Reading] = []
        self.kv = KVSlots(slots, kv_budget)
        """Every row's keys and values: the generating rows in its first slots, then the reading rows
        (`slots`: how many to allocate while the budget allows)."""
        self.weights = RowWeights(list(bank.layers.values())) if bank is not None else None
        """The generating rows' adapter weights, kept per row."""

    @property
    def rows(self) -> int:
        """Rows in the batch: reading their prompts or generating."""
        return len(self.decoding) + len(self.reading)

    @property
    def kv_tokens(self) -> int:
        """KV cache columns the rows have written (the slots allocated for them are wider: `kv.allocated`)."""
        return self.kv.tokens

    def need(self, row: GenRow) -> int:
        """KV columns a row may come to hold: virtual or prefix tokens, prompt, soft tokens and max_tokens."""
        return self.learning.n + len(row.prompt_ids) + soft_len(row.soft) + row.sampling.max_tokens

    def fits(self, rows: list[GenRow]) -> bool:
        """Whether these rows could join now within the KV budget."""
        return self.kv.fits([self.need(row) for row in rows])

    @torch.no_grad()
    def add(self, rows: list[GenRow]) -> list[RowState]:
        """Rows join: they read their prompts from the next step on."""
        if not rows:
            return []
        pad_id = self.tokenizer.pad_token_id
        states = []
        embed = self.model.get_input_embeddings()
        prefix, n_prefix = self.learning.prefix(len(rows))
        for row in rows:
            if not row.prompt_ids:
                raise ValueError("a generation row needs at least one prompt token")
            state = RowState(row, self.tokenizer.eos_token_id, self.tokenizer)
            lead = self.learning.n if self.learning.kind == "virtual" else 0
            ids = [pad_id] * lead + row.prompt_ids + [pad_id] * soft_len(row.soft)  # room for soft tokens at the end
            embeds = None
            if lead or row.soft is not None:
                embeds = embed(torch.tensor(ids, device=self.device))
                if lead:
                    embeds[:lead] = self.learning.virtual.to(embeds)
                if row.soft is not None:
                    embeds[len(ids) - len(row.soft):] = row.soft.to(embeds)
            self.reading.append(_Reading(state, ids, embeds))
            states.append(state)
        self.kv.add([self.need(row) for row in rows], prefix, n_prefix)
        return states

    @torch.no_grad()
    def step(self) -> list[RowState]:
        """One forward: the next token of the generating rows and a prefill chunk of the reading ones; the
        rows that finished (each has its `result`)."""
        finished = self._drop_cancelled()
        if not self.rows:
            return finished
        lengths = [r.next_len(self.chunk) for r in self.reading]
        logits = self._forward(lengths)
        decoded = len(self.decoding)
        for st, p in zip(self.decoding, self._pick(self.decoding, logits[:decoded])):
            st.push(p)
        for r, k in zip(self.reading, lengths):
            r.done += k
        ready = [i for i, r in enumerate(self.reading) if r.done == len(r.ids)]
        read = [self.reading[i].state for i in ready]
        for st, p in zip(read, self._pick(read, logits[decoded:][ready])):
            st.push(p)  # its first token: on to generating, or done already
        done = [st for st in self.decoding + read if st.result is not None]
        if done or ready:
            self._regroup()
        return finished + done

    def _pick(self, states: list[RowState], logits: torch.Tensor) -> list:
        return pick_batch(logits, [st.picker for st in states]) if states else []

    def _drop_cancelled(self) -> list[RowState]:
        gone = [st for st in self.decoding + [r.state for r in self.reading] if st.row.cancelled()]
        for st in gone:
            st.cancel()
        if gone:
            self._regroup()
        return gone

    def _regroup(self) -> None:
        """Rows with a result leave (freeing their slots); reading rows that picked their first token (their
        input is read) join the generating rows after them; the other reading rows stay reading."""
        states = self.decoding + [r.state for r in self.reading]
        readers: list[_Reading | None] = [None] * len(self.decoding) + self.reading
        decoded = len(self.decoding)
        staying = [(decoded + i, bool(r.state.picked)) for i, r in enumerate(self.reading) if r.state.result is None]
        decoding = [i for i, st in enumerate(self.decoding) if st.result is None] + [i for i, on in staying if on]
        reading = [i for i, on in staying if not on]
        order = self.kv.keep([decoding, reading])
        self.decoding = [states[i] for i in order[:len(decoding)]]
        self.reading = [readers[i] for i in order[len(decoding):]]

    def _forward(self, lengths: list[int]) -> torch.Tensor:
        """The packed forward: each generating row's next token, then each reading row's next `lengths[i]`
        tokens of its input; the logits after each row's last token (generating rows first)."""
        slots = [st.row.slot for st in self.decoding]
        weights = self.weights.follow(self.decoding, slots) if self.weights is not None else None
        ids, runs = [st.picked[-1].token for st in self.decoding], []
        for r, k in zip(self.reading, lengths):
            runs.append((len(ids), len(ids) + k, r.state.row.slot))
            ids += r.ids[r.done:r.done + k]
        ids = torch.tensor([ids], device=self.device)
        step = {"input_ids": ids}
        if any(r.embeds is not None for r in self.reading):
            embeds = self.model.get_input_embeddings()(ids)
            for r, (start, end, _) in zip(self.reading, runs):
                if r.embeds is not None:
                    embeds[0, start:end] = r.embeds[r.done:r.done + end - start]
            step = {"inputs_embeds": embeds}
        with slots_context(self.bank, slots, weights, runs):
            return packed_forward(self.model, self.kv, [(0, [1] * len(slots)), (len(slots), lengths)], **step)
