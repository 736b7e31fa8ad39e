"""The KV cache of a changing set of rows: one preallocated slot per row, so joining and leaving copy one row.

A `KVSlots` holds, per layer, keys and values `[slots, heads, width, head_dim]`
allocated once (and grown only when more rows, or a longer row, come than ever
before). Row i of the batch lives in slot i with its tokens at columns 0, 1, ...
in order, so a token's column is also its position. A forward writes each row's
new keys and values at its next columns (an indexed write, no concatenation) and
attends over the first `rows` slots up to the longest row's end, with a mask
per row: a row sees its own columns only, so its answer is the row's alone.

Rows join in the next free slots (prefix tuning's keys and values written at
their first columns); a leaving row's slot takes the last row (one row's
columns copied, not the batch's), and a row moves to another `KVSlots` by
copying its own columns. A row fed fewer tokens than the others in one forward
(the last chunk of its prompt) is padded on the left of the input; the
padding's keys and values go to a scratch column past every row's end, which
no row ever sees. Before, every step concatenated each layer's whole cache
and every join or leave copied the batch (docs/serving.md, "Scheduling").
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

_WIDTH_STEP = 64
"""Slot widths grow in steps of this many columns, so a slightly longer row does not reallocate."""


class _Plan:
    """Where the forward about to run writes (slot and column of each input token) and what it attends to."""

    def __init__(self, rows: int, columns: torch.Tensor, view: int):
        self.rows, self.columns, self.view = rows, columns, view
        self.slots = torch.arange(rows, device=columns.device).unsqueeze(-1)


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values `[slots, heads, width, head_dim]`."""

    is_sliding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys = key_states.new_zeros((0, key_states.shape[1], 0, key_states.shape[3]))
        self.values = value_states.new_zeros((0, value_states.shape[1], 0, value_states.shape[3]))
        self.is_initialized = True

    def fit(self, slots: int, width: int) -> None:
        """At least `slots` x `width` (what is there is kept)."""
        have_slots, _, have_width, _ = self.keys.shape
        if have_slots >= slots and have_width >= width:
            return
        shape = (max(slots, have_slots), max(width, have_width))
        self.keys, self.values = (_grown(t, *shape) for t in (self.keys, self.values))

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, plan: _Plan
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the forward's keys and values `[rows, heads, n, dim]` at the plan's columns; the slots to attend."""
        self.keys[plan.slots, :, plan.columns] = key_states.transpose(1, 2)
        self.values[plan.slots, :, plan.columns] = value_states.transpose(1, 2)
        return self.keys[:plan.rows, :, :plan.view], self.values[:plan.rows, :, :plan.view]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise NotImplementedError("a slot layer is written through KVSlots.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.keys.shape[2] if self.is_initialized else 0


def _grown(t: torch.Tensor, slots: int, width: int) -> torch.Tensor:
    out = t.new_zeros((slots, t.shape[1], width, t.shape[3]))
    out[:t.shape[0], :, :t.shape[2]] = t
    return out


class KVSlots(Cache):
    """Some rows' keys and values, one slot each (see the module docs)."""

    def __init__(self, slots: int = 0):
        super().__init__(layers=[])
        self.lengths: list[int] = []
        """Columns each row has written (its prefix included): the next token's column and position."""
        self.needs: list[int] = []
        """Columns each row may come to hold: its slot is at least this wide (plus the scratch column)."""
        self.capacity = (slots, 0)
        """(slots, width) every layer is grown to."""
        self._plan: _Plan | None = None

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Columns written by the rows (no padding: a row holds its own tokens only)."""
        return sum(self.lengths)

    def _ready(self) -> list[_SlotLayer]:
        return [layer for layer in self.layers if layer.is_initialized]

    def _fit(self) -> None:
        slots = max(self.capacity[0], self.rows)
        widest = max(self.needs, default=0) + 1  # + the scratch column
        width = self.capacity[1]
        if widest > width:
            width = -(-widest // _WIDTH_STEP) * _WIDTH_STEP
        self.capacity = (slots, width)
        for layer in self._ready():
            layer.fit(slots, width)

    def add(self, needs: list[int], prefix: DynamicCache | None = None, n_prefix: int = 0) -> None:
        """New rows after these, each to hold at most `needs[i]` columns; `prefix`: prefix tuning's keys and
        values `[rows, heads, n_prefix, dim]` per layer, written at the new rows' first columns."""
        first = self.rows
        self.lengths += [n_prefix] * len(needs)
        self.needs += needs
        if prefix is not None and n_prefix:
            while len(self.layers) < len(prefix.layers):
                self.layers.append(_SlotLayer())
            for layer, given in zip(self.layers, prefix.layers, strict=True):
                if not layer.is_initialized:
                    layer.lazy_initialization(given.keys, given.values)
        self._fit()
        if prefix is not None and n_prefix:
            end = first + len(needs)
            for layer, given in zip(self.layers, prefix.layers, strict=True):
                layer.keys[first:end, :, :n_prefix] = given.keys
                layer.values[first:end, :, :n_prefix] = given.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's attention writes its new keys and values here (as in any transformers Cache)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(_SlotLayer())
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
            layer.fit(*self.capacity)
        return layer.write(key_states, value_states, self._plan)

    def forward(self, model, fed: list[int], *, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Feed every row its next `fed[i]` tokens (right-aligned in the `[rows, n]` input, padded on the
        left); the logits `[rows, vocab]` after each row's last token."""
        given = input_ids if input_ids is not None else inputs_embeds
        n, device = given.shape[1], given.device
        start = torch.tensor(self.lengths, device=device).unsqueeze(-1)
        pad = n - torch.tensor(fed, device=device).unsqueeze(-1)
        column = torch.arange(n, device=device).unsqueeze(0)
        real = column >= pad
        ends = [length + k for length, k in zip(self.lengths, fed)]
        if any(end > need for end, need in zip(ends, self.needs)):
            raise ValueError(f"a row was fed past the columns it was given: ends {ends}, needs {self.needs}")
        # A padding token stands at its row's first new column (so its attention has something to see)
        # and writes to the scratch column; a real one at its own column.
        positions = torch.maximum(start + column - pad, start)
        scratch = self.capacity[1] - 1
        self._plan = _Plan(self.rows, torch.where(real, positions, scratch), max(ends))
        seen = torch.arange(self._plan.view, device=device).view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1)
        step = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        try:
            out = model(**step, attention_mask=_mask(seen, model, given), position_ids=positions, cache=self,
                        use_cache=True, logits_to_keep=1)
        finally:
            self._plan = None
        self.lengths = ends
        return out.logits[:, -1]

    def drop(self, gone: list[int]) -> list[int]:
        """These rows leave (their slots are free again); the rest, as the old indices in their new order
        (each freed slot takes the last row)."""
        order = list(range(self.rows))
        for i in sorted(set(gone), reverse=True):  # the last row is never one still to drop
            last = len(order) - 1
            if i != last:
                self._copy(self, last, i)
                order[i], self.lengths[i], self.needs[i] = order[last], self.lengths[last], self.needs[last]
            order.pop()
            self.lengths.pop()
            self.needs.pop()
        return order

    def copy_to(self, rows: list[int], to: KVSlots) -> None:
        """These rows join `to` at its end (their columns copied; they stay here until dropped)."""
        start = to.rows
        to.lengths += [self.lengths[i] for i in rows]
        to.needs += [self.needs[i] for i in rows]
        while len(to.layers) < len(self.layers):
            to.layers.append(_SlotLayer())
        for mine, theirs in zip(self._ready(), to.layers):
            if not theirs.is_initialized:
                theirs.lazy_initialization(mine.keys, mine.values)
        to._fit()
        for k, i in enumerate(rows):
            self._copy(to, i, start + k)

    def _copy(self, to: KVSlots, src: int, dst: int) -> None:
        """Row `src`'s written columns into slot `dst` of `to`."""
        n = self.lengths[src]
        for mine, theirs in zip(self._ready(), to._ready(), strict=True):
            theirs.keys[dst, :, :n] = mine.keys[src, :, :n]
            theirs.values[dst, :, :n] = mine.values[src, :, :n]


def _mask(seen: torch.Tensor, model, like: torch.Tensor) -> torch.Tensor:
    """The 4D mask `[rows, 1, n, columns]` as the model's attention takes it: SDPA and flash a bool
    (True: attend), eager an additive float mask."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        dtype = like.dtype if like.is_floating_point() else model.dtype
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, torch.finfo(dtype).min)
    return seen
