"""A running batch: generation rows join and leave between decode steps, each on its own bank slot.

Every `step()` is one forward (`peftu.inference.kv.packed_forward`: every row's
new tokens packed in one sequence) that holds the next token of every row that
is generating and one chunk of prefill for the rows that joined (`add`) and are
still reading their prompts, at most `chunk` tokens each, so a long prompt does
not hold up everyone's next token. A row whose prompt is read picks its first
token from that chunk's logits and moves into the decoding rows' cache; a row
that is done (token budget, EOS, stop string) or whose caller went away
(`GenRow.cancelled`) leaves at once and frees its KV slot (one preallocated
slot per row, so a join or a leave copies one row, never the batch). All rows
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

    def __init__(self, model, bank: AdapterBank | None, tokenizer, *, chunk: int | None = None, slots: int = 0):
        if chunk is not None and chunk < 1:
            raise ValueError(f"prefill chunk must be at least 1 token, got {chunk}")
        self.learning = PromptLearning(model)
        self.model, self.bank, self.tokenizer, self.chunk = self.learning.model, bank, tokenizer, chunk
        use_packed_attention(self.model)
        self.device = self.model.device
        self.decoding: list[RowState] = []
        self.next_tokens: list[int] = []
        self.kv = KVSlots(slots)
        """The generating rows' slots (`slots`: how many to allocate at the first forward)."""
        self.reading: list[_Reading] = []
        self.read_kv = KVSlots()
        self.weights = RowWeights(list(bank.layers.values())) if bank is not None else None
        """The generating rows' adapter weights, kept per row."""

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def rows(self) -> int:
        """Rows in the batch: reading their prompts or generating."""
        return len(self.decoding) + len(self.reading)

    @property
    def kv_tokens(self) -> int:
        """KV cache columns the rows have written (the slots allocated for them may be wider)."""
        return self.kv.tokens + self.read_kv.tokens

    @torch.no_grad()
    def add(self, rows: list[GenRow]) -> list[RowState]:
        """Rows join: they read their prompts from the next step on."""
        if not rows:
            return []
        pad_id = self.tokenizer.pad_token_id
        states, needs = [], []
        embed = self.model.get_input_embeddings()
        prefix, n_prefix = self.learning.prefix(len(rows))
        for row in rows:
            if not row.prompt_ids:
                raise ValueError("a generation row needs at least one prompt token")
            state = RowState(row, self.tokenizer.eos_token_id, self._decode)
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
            needs.append(n_prefix + len(ids) + row.sampling.max_tokens)
        self.read_kv.add(needs, prefix, n_prefix)
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
        if decoded:
            finished += self._decoded(logits[:decoded])
        if self.reading:
            finished += self._read(logits[decoded:], lengths)
        return finished

    def _drop_cancelled(self) -> list[RowState]:
        gone = [st for st in self.decoding if st.row.cancelled()]
        gone_reading = [r for r in self.reading if r.state.row.cancelled()]
        for st in gone + [r.state for r in gone_reading]:
            st.cancel()
        if gone:
            self._leave_decoding()
        if gone_reading:
            order = self.read_kv.drop([i for i, r in enumerate(self.reading) if r.state.result is not None])
            self.reading = [self.reading[i] for i in order]
        return gone + [r.state for r in gone_reading]

    def _leave_decoding(self) -> None:
        """The decoding rows with a result leave (their slots are free again)."""
        order = self.kv.drop([i for i, st in enumerate(self.decoding) if st.result is not None])
        self.decoding = [self.decoding[i] for i in order]
        self.next_tokens = [self.next_tokens[i] for i in order]

    def _forward(self, lengths: list[int]) -> torch.Tensor:
        """The packed forward: each generating row's next token, then each reading row's next `lengths[i]`
        tokens of its input; the logits after each row's last token (generating rows first)."""
        slots = [st.row.slot for st in self.decoding]
        weights = self.weights.follow(self.decoding, slots) if self.weights is not None else None
        ids, runs = list(self.next_tokens), []
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
            return packed_forward(self.model, [(self.kv, [1] * len(slots)), (self.read_kv, lengths)], **step)

    def _decoded(self, logits: torch.Tensor) -> list[RowState]:
        """The generating rows pick their next tokens; those that are done leave."""
        picked = pick_batch(logits, [st.picker for st in self.decoding])
        for st, p in zip(self.decoding, picked):
            st.push(p)
        self.next_tokens = [p.token for p in picked]
        done = [st for st in self.decoding if st.result is not None]
        if done:
            self._leave_decoding()
        return done

    def _read(self, logits: torch.Tensor, lengths: list[int]) -> list[RowState]:
        """The reading rows are `lengths` further; those whose input is read pick their first token and
        move to the generating rows (or leave, if done already)."""
        for r, k in zip(self.reading, lengths):
            r.done += k
        ready = [i for i, r in enumerate(self.reading) if r.done == len(r.ids)]
        if not ready:
            return []
        states = [self.reading[i].state for i in ready]
        picked = pick_batch(logits[ready], [st.picker for st in states])
        for st, p in zip(states, picked):
            st.push(p)
        going = [i for i in ready if self.reading[i].state.result is None]  # on to decoding
        self.read_kv.copy_to(going, self.kv)
        self.decoding += [self.reading[i].state for i in going]
        self.next_tokens += [p.token for i, p in zip(ready, picked) if i in going]
        self.reading = [self.reading[i] for i in self.read_kv.drop(ready)]
        return [st for st in states if st.result is not None]
