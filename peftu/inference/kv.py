"""The KV cache of a changing set of rows, and one forward that feeds them all: their tokens packed in one sequence.

A `KVSlots` holds, per layer, keys and values `[slots, heads, width, head_dim]`:
one slot per row, its tokens at columns 0, 1, ... in order, so a token's column
is also its position. Rows join in the next free slots (prefix tuning's keys
and values written at their first columns). The caller keeps its rows in
groups of neighbouring slots (the generating rows, then the rows reading their
prompts); `keep` says which rows stay and in which groups, and moves the fewest
rows it can (a leaving row's slot takes a row from the end; one row's columns
copied, never the batch's). With a budget the allocation itself stays within
it: slots x width <= budget tokens per layer. `fits` says whether rows of given
needs could join, the width is the widest row's (rounded up to 64 columns
while the budget allows) and the slots are as many as the budget leaves,
at most the hint; a row that does not fit the slots there are makes them
reallocated (one layer at a time, so the peak is the budget and one layer's
share).

`packed_forward` runs one model forward for groups of rows at once (the
decoding rows' next tokens and the reading rows' prompt chunks): every row's
new tokens go into one sequence `[1, tokens]`, one after another, so the
linear layers see no padding and the step pays the model's fixed cost once.
Each token's keys and values are written at its row's next column (an indexed
write). Attention is the only part that must know the rows: `packed_attention`
(registered with transformers' `AttentionInterface`) takes each group's rows
back into a `[rows, heads, n, head_dim]` layout, padded on the left where rows
fed different numbers of tokens, and runs the model's own attention over their
slots with a mask per row (a row sees its own columns only), so every row's
answer is its alone (docs/serving.md, "Scheduling").
"""

from __future__ import annotations

import functools
import sys

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_WIDTH_STEP = 64
"""Slot widths grow in steps of this many columns (while a budget allows), so a slightly longer row does not
reallocate."""


class _SlotLayer:
    """One layer's keys and values `[slots, heads, width, head_dim]` (allocated at the first write)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def init(self, like: torch.Tensor, slots: int, width: int) -> None:
        """Allocate as `like` `[any, heads, any, head_dim]` (its dtype and device), if not yet."""
        if self.keys is None:
            shape = (slots, like.shape[1], width, like.shape[3])
            self.keys, self.values = like.new_zeros(shape), like.new_zeros(shape)

    def resize(self, rows: int, written: int, slots: int, width: int) -> None:
        """`slots` x `width` now, keeping the first `rows` slots' first `written` columns."""
        self.keys = _resized(self.keys, rows, written, slots, width)
        self.values = _resized(self.values, rows, written, slots, width)


def _resized(t: torch.Tensor, rows: int, written: int, slots: int, width: int) -> torch.Tensor:
    out = t.new_zeros((slots, t.shape[1], width, t.shape[3]))
    out[:rows, :, :written] = t[:rows, :, :written]
    return out


class KVSlots:
    """Some rows' keys and values, one slot each, within a budget if one is given (see the module docs)."""

    def __init__(self, slots: int = 0, budget: int | None = None):
        if budget is not None and budget < 1:
            raise ValueError(f"a KV budget must be at least 1 token, got {budget}")
        self.layers: list[_SlotLayer] = []
        self.lengths: list[int] = []
        """Columns each row has written (its prefix included): the next token's column and position."""
        self.needs: list[int] = []
        """Columns each row may come to hold: its slot is at least this wide."""
        self.hint, self.budget = slots, budget
        self.capacity = (0, 0)
        """(slots, width) of every layer."""

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Columns written by the rows (no padding: a row holds its own tokens only)."""
        return sum(self.lengths)

    @property
    def allocated(self) -> int:
        """Tokens allocated per layer (slots x width; 0 before the first write)."""
        return self.capacity[0] * self.capacity[1] if self._ready() else 0

    def fits(self, needs: list[int]) -> bool:
        """Whether rows of these needs could join the rows here: always without a budget; with one, when all
        of them given the widest row's columns stay within it."""
        if self.budget is None or not needs:
            return True
        return (self.rows + len(needs)) * max(self.needs + needs) <= self.budget

    def layer(self, i: int) -> _SlotLayer:
        while len(self.layers) <= i:
            self.layers.append(_SlotLayer())
        return self.layers[i]

    def _ready(self) -> list[_SlotLayer]:
        return [layer for layer in self.layers if layer.keys is not None]

    def _make_room(self, stored: int) -> None:
        """Slots for every row, each as wide as the widest need; `stored`: rows whose columns are written."""
        rows, widest = self.rows, max(self.needs, default=0)
        slots, width = self.capacity
        if rows <= slots and widest <= width:
            return
        rounded = -(-widest // _WIDTH_STEP) * _WIDTH_STEP
        if self.budget is None:
            slots, width = max(slots, rows, self.hint), max(width, rounded)
        else:  # `fits` held, so rows x widest <= budget: so are slots x width
            width = max(widest, min(rounded, self.budget // rows))
            slots = max(rows, min(self.hint, self.budget // width))
        written = max(self.lengths[:stored], default=0)
        for layer in self._ready():
            layer.resize(stored, written, slots, width)
        self.capacity = (slots, width)

    def add(self, needs: list[int], prefix: DynamicCache | None = None, n_prefix: int = 0) -> None:
        """New rows after these, each to hold at most `needs[i]` columns; `prefix`: prefix tuning's keys and
        values `[rows, heads, n_prefix, dim]` per layer, written at the new rows' first columns."""
        if not self.fits(needs):
            raise ValueError(f"{len(needs)} rows needing up to {max(needs)} KV columns do not fit beside "
                             f"{self.rows} rows within the budget of {self.budget} tokens")
        first = self.rows
        self.lengths += [n_prefix] * len(needs)
        self.needs += needs
        self._make_room(first)
        if prefix is not None and n_prefix:
            end = first + len(needs)
            for i, given in enumerate(prefix.layers):
                layer = self.layer(i)
                layer.init(given.keys, *self.capacity)
                layer.keys[first:end, :, :n_prefix] = given.keys
                layer.values[first:end, :, :n_prefix] = given.values

    def keep(self, groups: list[list[int]]) -> list[int]:
        """The rows in `groups` (their slots now) stay, the others leave; each group takes the slots after
        the one before, in any order within it. The slot each row came from, in slot order; the rows moved
        are the fewest: a row already in its group's slots stays, the others fill the holes."""
        order, start = [], 0
        for group in groups:
            stop = start + len(group)
            movers = iter([i for i in group if not start <= i < stop])
            inside = set(group)
            order += [slot if slot in inside else next(movers) for slot in range(start, stop)]
            start = stop
        self._arrange(order)
        return order

    def _arrange(self, order: list[int]) -> None:
        """Slot k takes the row of slot `order[k]`: rows move into free slots first, and a cycle of rows
        (each waiting for the next one's slot) is broken by holding one row in a copy."""
        lengths = self.lengths
        moves = {dst: src for dst, src in enumerate(order) if dst != src}
        held: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        while moves:
            sources = set(moves.values())
            free = [dst for dst in moves if dst not in sources]
            if not free:  # only cycles are left
                slot = next(iter(moves))
                held = (slot, [(layer.keys[slot, :, :lengths[slot]].clone(),
                                layer.values[slot, :, :lengths[slot]].clone()) for layer in self._ready()])
                free = [slot]
            for dst in free:
                src = moves.pop(dst)
                n = lengths[src]
                if held is not None and held[0] == src:  # its slot was overwritten: the copy
                    for layer, (k, v) in zip(self._ready(), held[1], strict=True):
                        layer.keys[dst, :, :n], layer.values[dst, :, :n] = k, v
                    held = None
                    continue
                for layer in self._ready():
                    layer.keys[dst, :, :n] = layer.keys[src, :, :n]
                    layer.values[dst, :, :n] = layer.values[src, :, :n]
        self.lengths = [lengths[i] for i in order]
        self.needs = [self.needs[i] for i in order]


class _Part:
    """A group of neighbouring slots' rows in a packed forward: which of the sequence's tokens are theirs,
    where each is written, and the `[rows, n]` layout (padded on the left) their attention runs in."""

    def __init__(self, kv: KVSlots, first: int, fed: list[int], offset: int, device: torch.device):
        self.rows = len(fed)
        lengths, needs = kv.lengths[first:first + self.rows], kv.needs[first:first + self.rows]
        ends = [length + k for length, k in zip(lengths, fed)]
        if any(end > need for end, need in zip(ends, needs)):
            raise ValueError(f"a row was fed past the columns it was given: ends {ends}, needs {needs}")
        self.first, self.fed, self.ends = first, fed, ends
        self.n, self.view = max(fed), max(ends)
        self.start, self.stop = offset, offset + sum(fed)
        fed_t = torch.tensor(fed, device=device).unsqueeze(-1)
        start = torch.tensor(lengths, device=device).unsqueeze(-1)
        column = torch.arange(self.n, device=device).unsqueeze(0)
        pad = self.n - fed_t
        self.padded = min(fed) < self.n
        """Some rows feed fewer tokens than others: the layout has padding places."""
        self.real = (column >= pad).flatten()
        """Which places of the `[rows, n]` layout hold a token (row-major: the sequence's order)."""
        # A padding place stands at its row's first new column, so its attention sees something.
        positions = torch.maximum(start + column - pad, start)
        first_token = offset + torch.cumsum(fed_t, 0) - fed_t
        self.gather = (first_token + (column - pad).clamp(min=0)).flatten()
        """The sequence's token at each place of the layout (a padding place: its row's first)."""
        self.positions = positions.flatten()[self.real]
        self.slots = torch.arange(first, first + self.rows, device=device).repeat_interleave(fed_t.squeeze(-1))
        self.seen = (torch.arange(self.view, device=device).view(1, 1, 1, -1)
                     <= positions.unsqueeze(1).unsqueeze(-1))
        """`[rows, 1, n, view]`: a place sees its row's columns up to its own."""

    def write(self, layer: _SlotLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The sequence's new keys and values `[1, heads, tokens, dim]`: this part's at their columns."""
        layer.keys[self.slots, :, self.positions] = keys[0, :, self.start:self.stop].transpose(0, 1)
        layer.values[self.slots, :, self.positions] = values[0, :, self.start:self.stop].transpose(0, 1)

    def attended(self, layer: _SlotLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values `[rows, heads, view, dim]` this part's rows attend."""
        rows = slice(self.first, self.first + self.rows)
        return layer.keys[rows, :, :self.view], layer.values[rows, :, :self.view]


class _Written:
    """What a packed forward's layer hands its attention instead of keys: the parts' slots to attend."""

    def __init__(self, layer: _SlotLayer, parts: list[_Part]):
        self.layer, self.parts = layer, parts


class _Packed(Cache):
    """The cache a packed forward runs with: it writes each token's keys and values into its row's slot."""

    def __init__(self, kv: KVSlots, parts: list[_Part]):
        super().__init__(layers=[])
        self.kv, self.parts = kv, parts

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.kv.layer(layer_idx)
        layer.init(key_states, *self.kv.capacity)
        for part in self.parts:
            part.write(layer, key_states, value_states)
        return _Written(layer, self.parts), None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def packed_attention(name: str, module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed forward (`key` is `_Written`): each part's rows over their own slots, by
    transformers' SDPA attention with a mask per row; any other forward of the model goes to its own
    attention (`name`) as before."""
    if not isinstance(key, _Written):
        inner = ALL_ATTENTION_FUNCTIONS.get(name) or sys.modules[type(module).__module__].eager_attention_forward
        return inner(module, query, key, value, attention_mask, **kwargs)
    outs = []
    heads, dim = query.shape[1], query.shape[3]
    for part in key.parts:
        q = query[0][:, part.gather] if part.padded else query[0, :, part.start:part.stop]
        q = q.reshape(heads, part.rows, part.n, dim).transpose(0, 1)
        out, _ = sdpa_attention_forward(module, q, *part.attended(key.layer), part.seen, **kwargs)
        out = out.reshape(part.rows * part.n, heads, dim)
        outs.append(out[part.real] if part.padded else out)
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).unsqueeze(0), None


_PREFIX = "peftu-packed:"


def use_packed_attention(model) -> None:
    """Have the model's attention take packed forwards too (`packed_attention` in front of its own)."""
    name = model.config._attn_implementation or "eager"
    if name.startswith(_PREFIX):
        return
    if not model._can_set_attn_implementation():
        raise ValueError(f"cannot generate with {type(model).__name__}: its attention does not go through "
                         "transformers' AttentionInterface, which peftu's packed decode steps need")
    packed = _PREFIX + name
    AttentionInterface.register(packed, functools.partial(packed_attention, name))
    AttentionMaskInterface.register(packed, ALL_MASK_ATTENTION_FUNCTIONS[name])
    model.set_attn_implementation(packed)


def packed_forward(model, kv: KVSlots, parts: list[tuple[int, list[int]]], *, input_ids: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """One forward for groups of `kv`'s rows, each `(first, fed)`: the rows in slots `first`, `first + 1`,
    ... fed their next `fed[i]` tokens. The sequence `[1, tokens]` holds them row after row, group after
    group; the logits `[rows, vocab]` after each row's last token, in the same order."""
    given = input_ids if input_ids is not None else inputs_embeds
    device, offset, packed = given.device, 0, []
    for first, fed in parts:
        if fed:
            packed.append(_Part(kv, first, fed, offset, device))
            offset = packed[-1].stop
    if offset != given.shape[1]:
        raise ValueError(f"the parts feed {offset} tokens, the input holds {given.shape[1]}")
    last = torch.cat([p.start + torch.cumsum(torch.tensor(p.fed, device=device), 0) - 1 for p in packed])
    positions = torch.cat([p.positions for p in packed]).unsqueeze(0)
    step = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    placeholder = torch.ones((1, 1, offset, 1), dtype=torch.bool, device=device)  # the masks are per part
    out = model(**step, attention_mask=placeholder, position_ids=positions, cache=_Packed(kv, packed),
                use_cache=True, logits_to_keep=last)
    for part in packed:
        kv.lengths[part.first:part.first + part.rows] = part.ends
    return out.logits[0]
