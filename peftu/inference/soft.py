"""Soft tokens (PPlug's personal embeddings) written into a batch's input embeddings."""

from __future__ import annotations

import torch

from peftu.model.encode import collate


def soft_len(soft: torch.Tensor | None) -> int:
    return 0 if soft is None else len(soft)


def write_soft_tokens(embeds: torch.Tensor, starts: list[int], soft: list[torch.Tensor | None]) -> torch.Tensor:
    """`embeds` with row i's soft tokens written over its placeholder tokens from `starts[i]` on."""
    for i, (start, p) in enumerate(zip(starts, soft, strict=True)):
        if p is not None:
            embeds[i, start:start + len(p)] = p.to(embeds.dtype)
    return embeds


def plugged_forward(model, encoded: list[tuple[list[int], int]], soft: list[torch.Tensor | None], pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a batch of encoded examples with row i's soft tokens between its prompt and
    its answer, and the labels in that layout (soft positions carry none)."""
    spaced = [(ids[:n] + [pad_id] * soft_len(p) + ids[n:], n + soft_len(p)) for (ids, n), p in zip(encoded, soft)]
    batch = {k: v.to(model.device) for k, v in collate(spaced, pad_id).items()}
    embeds = model.get_input_embeddings()(batch["input_ids"])
    embeds = write_soft_tokens(embeds, [n for _, n in encoded], soft)
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits, batch["labels"]
