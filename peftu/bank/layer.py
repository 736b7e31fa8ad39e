"""A linear layer with the LoRA weights of many users stacked beside it.

`base(x) + scale[slot] * B[slot] @ (A[slot] @ x)` for every row at once, each
row with its own user's slot: the BGMV idea of Punica, S-LoRA and vLLM, written
with a gather and two batched matmuls so that autograd trains every slot in
one backward. The rows' slots come from a `SlotContext` shared by all banked
layers of a model, set once per forward by the bank.

The scale is per slot so that one bank can hold adapters of different rank and
alpha (serving): a smaller rank is zero-padded to the bank's rank, which
changes nothing in the product, and its own alpha / r goes into its scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SlotContext:
    """Which adapter the forward about to run uses: one slot per batch row (a
    tensor), one slot for the whole batch (an int), or None for the base alone."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | int | None = None
        self.gathered: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        """Per layer, A and scale * B of the rows on `slots`, kept row by row while they run
        (`peftu.bank.rows.RowWeights`); None: gathered at the forward."""
        self.runs: list[tuple[int, int, int]] | None = None
        """A packed forward (`peftu.inference.kv`): the batch is one sequence whose first
        `len(slots)` tokens are one row each, on `slots`, and each run (start, end, slot)
        of tokens after them is one more row; None: one batch row per slot."""


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a GPT-2 style Conv1D (weight stored transposed)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        d_in, d_out = base.weight.shape
        return d_in, d_out
    raise TypeError(f"cannot bank a {type(base).__name__}; only Linear and Conv1D layers")


class BankedLoraLinear(nn.Module):
    """A frozen linear layer plus `n_slots` LoRA adapters of rank up to `r`."""

    def __init__(self, base: nn.Module, n_slots: int, r: int, scale: float, ctx: SlotContext):
        super().__init__()
        self.base = base
        self.d_in, self.d_out = linear_shape(base)
        self.ctx = ctx
        weight = base.weight
        # Like PEFT: adapters of a half-precision base train in fp32, otherwise in the base's dtype.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(n_slots, r, self.d_in, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n_slots, self.d_out, r, dtype=dtype, device=weight.device))
        self.register_buffer("scales", torch.full((n_slots,), float(scale), dtype=dtype, device=weight.device))
        for slot in range(n_slots):
            nn.init.kaiming_uniform_(self.lora_A.data[slot], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        slots = self.ctx.slots
        if slots is None:
            return out
        if isinstance(slots, int):
            return out + self._slot_delta(x, slots).to(out.dtype)
        if self.ctx.runs is None:
            return out + self._rows_delta(x, slots).to(out.dtype)
        # Packed (inference only): the rows' deltas are added in place, token range by token range.
        tokens, rows = x[0], len(slots)
        if rows:
            out[0, :rows] += self._rows_delta(tokens[:rows].unsqueeze(1), slots).squeeze(1).to(out.dtype)
        for start, end, slot in self.ctx.runs:
            out[0, start:end] += self._slot_delta(tokens[start:end], slot).to(out.dtype)
        return out

    def _slot_delta(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """`scale * B @ A @ x` of every row of `x` on one slot."""
        delta = (x.to(self.lora_A.dtype) @ self.lora_A[slot].T) @ self.lora_B[slot].T
        return self.scales[slot] * delta

    def _rows_delta(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`scale * B @ A @ x` of every batch row `x[i]` `[n, d_in]` on its slot `slots[i]`."""
        a, b = self.ctx.gathered[self] if self.ctx.gathered is not None else self.weights_of(slots)
        return torch.bmm(torch.bmm(x.to(a.dtype), a), b)

    def weights_of(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A `[rows, d_in, r]` and scale * B `[rows, r, d_out]` of these slots, as a batched matmul takes them."""
        # index_select rather than A[slots]: its backward is a plain index_add, much
        # faster than advanced indexing's when many rows share a slot.
        a = torch.index_select(self.lora_A, 0, slots).transpose(1, 2)
        scale = torch.index_select(self.scales, 0, slots).view(-1, 1, 1)
        return a, (torch.index_select(self.lora_B, 0, slots) * scale).transpose(1, 2)
