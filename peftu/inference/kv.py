"""The KV cache of a changing set of rows, and one forward that feeds them all: their tokens packed in one sequence.

A `KVSlots` holds, per layer, keys and values `[slots, heads, width, head_dim]`
allocated once (and grown only when more rows, or a longer row, come than ever
before). Row i lives in slot i with its tokens at columns 0, 1, ... in order, so
a token's column is also its position. Rows join in the next free slots (prefix
tuning's keys and values written at their first columns); a leaving row's slot
takes the last row (one row's columns copied, not the batch's), and a row moves
to another `KVSlots` by copying its own columns.

`packed_forward` runs one model forward for the rows of several `KVSlots` at
once (the decoding rows' next tokens and the reading rows' prompt chunks): every
row's new tokens go into one sequence `[1, tokens]`, one after another, so the
linear layers see no padding and the step pays the model's fixed cost once. Each
token's keys and values are written at its row's next column (an indexed
write). Attention is the only part that must know the rows: `packed_attention`
(registered with transformers' `AttentionInterface`) takes each `KVSlots`' rows
back into a `[rows, heads, n, head_dim]` layout, padded on the left where rows
fed different numbers of tokens, and runs the model's own attention over their
slots with a mask per row (a row sees its own columns only), so every row's
answer is its alone. Before, the decoding and the reading rows had a forward
each, and the reading rows' was padded (docs/serving.md, "Scheduling").
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
"""Slot widths grow in steps of this many columns, so a slightly longer row does not reallocate."""


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

    def fit(self, slots: int, width: int) -> None:
        """At least `slots` x `width` (what is there is kept)."""
        if self.keys is None:
            return
        have_slots, _, have_width, _ = self.keys.shape
        if have_slots >= slots and have_width >= width:
            return
        shape = (max(slots, have_slots), max(width, have_width))
        self.keys, self.values = (_grown(t, *shape) for t in (self.keys, self.values))


def _grown(t: torch.Tensor, slots: int, width: int) -> torch.Tensor:
    out = t.new_zeros((slots, t.shape[1], width, t.shape[3]))
    out[:t.shape[0], :, :t.shape[2]] = t
    return out


class KVSlots:
    """Some rows' keys and values, one slot each (see the module docs)."""

    def __init__(self, slots: int = 0):
        self.layers: list[_SlotLayer] = []
        self.lengths: list[int] = []
        """Columns each row has written (its prefix included): the next token's column and position."""
        self.needs: list[int] = []
        """Columns each row may come to hold: its slot is at least this wide."""
        self.capacity = (slots, 0)
        """(slots, width) every layer is grown to."""

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        """Columns written by the rows (no padding: a row holds its own tokens only)."""
        return sum(self.lengths)

    def layer(self, i: int) -> _SlotLayer:
        while len(self.layers) <= i:
            self.layers.append(_SlotLayer())
        return self.layers[i]

    def _ready(self) -> list[_SlotLayer]:
        return [layer for layer in self.layers if layer.keys is not None]

    def _fit(self) -> None:
        slots = max(self.capacity[0], self.rows)
        widest = max(self.needs, default=0)
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
        self._fit()
        if prefix is not None and n_prefix:
            end = first + len(needs)
            for i, given in enumerate(prefix.layers):
                layer = self.layer(i)
                layer.init(given.keys, *self.capacity)
                layer.keys[first:end, :, :n_prefix] = given.keys
                layer.values[first:end, :, :n_prefix] = given.values

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
        to._fit()
        for i, mine in enumerate(self.layers):
            if mine.keys is not None:
                to.layer(i).init(mine.keys, *to.capacity)
        for k, i in enumerate(rows):
            self._copy(to, i, start + k)

    def _copy(self, to: KVSlots, src: int, dst: int) -> None:
        """Row `src`'s written columns into slot `dst` of `to`."""
        n = self.lengths[src]
        for mine, theirs in zip(self._ready(), to._ready(), strict=True):
            theirs.keys[dst, :, :n] = mine.keys[src, :, :n]
            theirs.values[dst, :, :n] = mine.values[src, :, :n]


class _Part:
    """One `KVSlots`' rows in a packed forward: which of the sequence's tokens are theirs, where each is
    written, and the `[rows, n]` layout (padded on the left) their attention runs in."""

    def __init__(self, kv: KVSlots, fed: list[int], offset: int, device: torch.device):
        ends = [length + k for length, k in zip(kv.lengths, fed)]
        if any(end > need for end, need in zip(ends, kv.needs)):
            raise ValueError(f"a row was fed past the columns it was given: ends {ends}, needs {kv.needs}")
        self.kv, self.fed, self.ends = kv, fed, ends
        self.rows, self.n, self.view = kv.rows, max(fed), max(ends)
        self.start, self.stop = offset, offset + sum(fed)
        fed_t = torch.tensor(fed, device=device).unsqueeze(-1)
        start = torch.tensor(kv.lengths, device=device).unsqueeze(-1)
        column = torch.arange(self.n, device=device).unsqueeze(0)
        pad = self.n - fed_t
        self.padded = min(fed) < self.n
        """Some rows feed fewer tokens than others: the layout has padding places."""
        self.real = (column >= pad).flatten()
        """Which places of the `[rows, n]` layout hold a token (row-major: the sequence's order)."""
        # A padding place stands at its row's first new column, so its attention sees something.
        positions = torch.maximum(start + column - pad, start)
        first = offset + torch.cumsum(fed_t, 0) - fed_t
        self.gather = (first + (column - pad).clamp(min=0)).flatten()
        """The sequence's token at each place of the layout (a padding place: its row's first)."""
        self.positions = positions.flatten()[self.real]
        self.slots = torch.arange(self.rows, device=device).repeat_interleave(fed_t.squeeze(-1))
        self.seen = (torch.arange(self.view, device=device).view(1, 1, 1, -1)
                     <= positions.unsqueeze(1).unsqueeze(-1))
        """`[rows, 1, n, view]`: a place sees its row's columns up to its own."""

    def write(self, layer: _SlotLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The sequence's new keys and values `[1, heads, tokens, dim]`: this part's at their columns."""
        layer.keys[self.slots, :, self.positions] = keys[0, :, self.start:self.stop].transpose(0, 1)
        layer.values[self.slots, :, self.positions] = values[0, :, self.start:self.stop].transpose(0, 1)


class _Written:
    """What a packed forward's layer hands its attention instead of keys: every part's slots to attend."""

    def __init__(self, parts: list[_Part], layer: int):
        self.parts, self.layer = parts, layer


class _Packed(Cache):
    """The cache a packed forward runs with: it writes each token's keys and values into its row's slot."""

    def __init__(self, parts: list[_Part]):
        super().__init__(layers=[])
        self.parts = parts

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for part in self.parts:
            layer = part.kv.layer(layer_idx)
            layer.init(key_states, *part.kv.capacity)
            part.write(layer, key_states, value_states)
        return _Written(self.parts, layer_idx), None

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
        layer = part.kv.layers[key.layer]
        q = query[0][:, part.gather] if part.padded else query[0, :, part.start:part.stop]
        q = q.reshape(heads, part.rows, part.n, dim).transpose(0, 1)
        out, _ = sdpa_attention_forward(module, q, layer.keys[:part.rows, :, :part.view],
                                        layer.values[:part.rows, :, :part.view], part.seen, **kwargs)
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


def packed_forward(model, parts: list[tuple[KVSlots, list[int]]], *, input_ids: torch.Tensor | None = None,
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """One forward for the rows of every `KVSlots` in `parts`, each row fed its next `fed[i]` tokens: the
    sequence `[1, tokens]` holds them row after row, part after part. The logits `[rows, vocab]` after
    each row's last token, in the same order."""
    given = input_ids if input_ids is not None else inputs_embeds
    device, offset, packed = given.device, 0, []
    for kv, fed in parts:
        if fed:
            packed.append(_Part(kv, fed, offset, device))
            offset = packed[-1].stop
    if offset != given.shape[1]:
        raise ValueError(f"the parts feed {offset} tokens, the input holds {given.shape[1]}")
    last = torch.cat([p.start + torch.cumsum(torch.tensor(p.fed, device=device), 0) - 1 for p in packed])
    positions = torch.cat([p.positions for p in packed]).unsqueeze(0)
    step = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
    placeholder = torch.ones((1, 1, offset, 1), dtype=torch.bool, device=device)  # the masks are per part
    out = model(**step, attention_mask=placeholder, position_ids=positions, cache=_Packed(packed),
                use_cache=True, logits_to_keep=last)
    for part in packed:
        part.kv.lengths = part.ends
    return out.logits[0]
