"""How an example becomes tokens: the prompt, the answer, and the loss mask.

Training, label scoring and the later banked fit all encode the same way, so a
label's log-likelihood at evaluation is exactly the loss the fit minimised:
`prompt tokens` (with the tokenizer's own special tokens, e.g. a BOS) followed
by `" " + answer` and EOS. Only the answer tokens carry labels; the prompt is
masked with -100.
"""

from __future__ import annotations

import torch

from peftu.data.schema import TaskSpec

IGNORE = -100


def encode(tokenizer, spec: TaskSpec, text: str, answer: str, max_len: int
           ) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and how many of them are the prompt.

    A prompt too long for `max_len` loses its beginning (the end holds the
    question); an answer longer than `max_len // 2` is cut.
    """
    prompt = tokenizer(spec.render(text), add_special_tokens=True)["input_ids"]
    target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    target = target[: max_len // 2] + [tokenizer.eos_token_id]
    prompt = prompt[-(max_len - len(target)):]
    return prompt + target, len(prompt)


def collate(encoded: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask and labels on answer tokens only."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order a user's examples are visited in one epoch (seeded, per epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def minibatches(n: int, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """Every mini-batch of a fit, in order: what the reference and the bank both follow."""
    batches = []
    for epoch in range(epochs):
        order = epoch_order(n, seed, epoch)
        batches += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches
