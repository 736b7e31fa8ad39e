"""The KV cache of a changing set of rows: rows join, leave and grow, each at its own positions.

A `KVRows` holds one DynamicCache `[rows, heads, columns, head_dim]` per layer, an
attention mask `[rows, columns]` (0: a column that is padding for that row) and
each row's next position. Rows are aligned at their newest token, so rows of
different lengths share one tensor: a shorter row is padded on the left, rows
merged from another `KVRows` are padded on the left to the common width, and a
row fed fewer tokens than the others in one forward (the last chunk of its
prompt) is padded in the middle. Positions are per row and explicit, so padding
changes nothing in a row's attention: its answer is the row's alone.
Columns that are padding for every row (left by rows that went) are dropped.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVRows:
    """Some rows' KV cache, attention mask and next positions (see the module docs)."""

    def __init__(self, mask: torch.Tensor, positions: list[int], cache: DynamicCache | None = None):
        self.mask = mask
        self.positions = positions
        self.cache = cache if cache is not None else DynamicCache()

    @classmethod
    def fresh(cls, rows: int, device: torch.device, prefix: DynamicCache | None = None, n_prefix: int = 0
              ) -> KVRows:
        """New rows with nothing cached but `prefix` (prefix tuning's keys and values, `n_prefix` columns)."""
        return cls(torch.ones((rows, n_prefix), dtype=torch.long, device=device), [n_prefix] * rows, prefix)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def held(self) -> int:
        """Token columns held in memory, padding included (rows x width)."""
        return self.rows * self.width

    def _layers(self) -> list:
        return [layer for layer in self.cache.layers if layer.is_initialized] if self.width else []

    def forward(self, model, lengths: list[int], *, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Feed every row its next `lengths[i]` tokens (right-aligned in the `[rows, n]` input, padded
        on the left); the logits `[rows, vocab]` after each row's last token."""
        given = input_ids if input_ids is not None else inputs_embeds
        n = given.shape[1]
        device = self.mask.device
        fed = torch.tensor(lengths, device=device).unsqueeze(-1)
        column = torch.arange(n, device=device).unsqueeze(0)
        real = column >= n - fed  # [rows, n]: this row's own tokens, not padding
        mask = torch.cat([self.mask, real.long()], dim=-1)
        start = torch.tensor(self.positions, device=device).unsqueeze(-1)
        position_ids = (start + column - (n - fed)).clamp(min=0)
        step = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        out = model(**step, attention_mask=mask, position_ids=position_ids, cache=self.cache,
                    use_cache=True, logits_to_keep=1)
        self.mask = mask
        self.positions = [p + k for p, k in zip(self.positions, lengths)]
        return out.logits[:, -1]

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (in this order): the others' memory is freed."""
        if len(keep) == self.rows and keep == list(range(self.rows)):
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.mask = self.mask[index]
        self.positions = [self.positions[i] for i in keep]
        self.compact()

    def take(self, rows: list[int]) -> KVRows:
        """These rows as a `KVRows` of their own; they leave this one."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        cache = _cache_of([(layer.keys[index], layer.values[index]) for layer in self._layers()])
        taken = KVRows(self.mask[index], [self.positions[i] for i in rows], cache)
        taken.compact()
        taking = set(rows)
        self.select([i for i in range(self.rows) if i not in taking])
        return taken

    def merge(self, other: KVRows) -> None:
        """Append `other`'s rows after these (both padded on the left to the wider one's width)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.mask, self.positions, self.cache = other.mask, other.positions, other.cache
            return
        width = max(self.width, other.width)
        mine, theirs = self._layers(), other._layers()
        if mine or theirs:
            n, rows = len(mine or theirs), [self.rows, other.rows]
            self.cache = _cache_of([(_stack([a and a.keys, b and b.keys], rows, width),
                                     _stack([a and a.values, b and b.values], rows, width))
                                    for a, b in zip(mine or [None] * n, theirs or [None] * n, strict=True)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)])
        self.positions = self.positions + other.positions

    def compact(self) -> None:
        """Drop the columns that are padding for every row."""
        if not self.width or not self.rows:
            return
        used = self.mask.any(dim=0)
        if bool(used.all()):
            return
        first = int(used.long().argmax())
        if bool(used[first:].all()):  # padding on the left only: a view, no copy
            cols = slice(first, None)
        else:
            cols = used.nonzero().squeeze(-1)
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
        self.mask = self.mask[:, cols]


def _cache_of(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding these keys and values per layer as they are (no copy)."""
    cache = DynamicCache()
    for keys, values in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], width - mask.shape[1])), mask], dim=-1)


def _stack(parts: list[torch.Tensor | None], rows: list[int], width: int) -> torch.Tensor:
    """Parts `[rows_i, heads, columns_i, dim]` one above the other, each right-aligned in `width` columns,
    written once into one new tensor; a None part: rows with nothing cached yet (zeros)."""
    like = next(p for p in parts if p is not None)
    out = like.new_zeros((sum(rows), like.shape[1], width, like.shape[3]))
    start = 0
    for part, n in zip(parts, rows, strict=True):
        if part is not None:
            out[start:start + n, :, width - part.shape[2]:] = part
        start += n
    return out
