"""Personalized prompts: a user's own history (BM25 top-k) or profile in front of the query.

Both ways follow LaMP: the model is the same for everyone, only the prompt
carries the user. What is added is built from the user's *own* history and
never from the item being answered: a training example's own history item is
left out when its prompt is made, so a model trained on augmented prompts
cannot learn to copy the answer.

Where it goes: the context comes first and the task's own prompt of the query
last, so when a prompt is longer than the model's `max_len`, the cut (which
takes tokens from the beginning, see `peftu.model.encode.encode`) eats the
context, never the question. Retrieved items are ordered least similar first, so the
cut drops the weakest ones.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord

AUGMENTATIONS = ("retrieval", "profile")
_WORD = re.compile(r"[a-z0-9']+")
_SHORT_WORD = 3
"""Words this short or shorter ("the", "and", "was") say little about a user; profiles skip them."""


def words(text: str) -> list[str]:
    """Lower-cased word tokens: what BM25 and the profile count."""
    return _WORD.findall(text.lower())


def bm25_top_k(history: list[HistoryItem], query: str, k: int, exclude_id: str | None = None
               ) -> list[HistoryItem]:
    """The `k` history items most similar to `query` under BM25 (`rank_bm25.BM25Okapi`), best first.

    Only items with an output are candidates (an item without one shows the
    model nothing about the user's answers); `exclude_id` is the item being
    answered, which must not retrieve itself.
    """
    from rank_bm25 import BM25Okapi

    pool = [h for h in history if h.output.strip() and h.text.strip() and h.id != exclude_id]
    if not pool or k <= 0:
        return []
    scores = BM25Okapi([words(h.text) or [""] for h in pool]).get_scores(words(query))
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
    return [pool[i] for i in order[:k]]


def retrieval_context(spec: TaskSpec, user: UserRecord, example: Example, k: int) -> str:
    """The user's top-k own past answers to similar inputs, each in the task's prompt format."""
    items = bm25_top_k(user.history, example.input, k, exclude_id=example.id)
    return "\n".join(f"{spec.render(h.text)} {h.output}" for h in reversed(items))


def profile_text(spec: TaskSpec, user: UserRecord, top_words: int = 3) -> str:
    """A short description of the user from their history: how they answer, and about what.

    Classification: the share of each label and, per label, the words most
    typical of the inputs they gave it. Rating: the mean and the spread of their
    ratings. Generation: the words they use most in their outputs.
    """
    items = [h for h in user.history if h.output.strip()]
    if not items:
        return "User profile: no history."
    if spec.kind == "classification":
        counts = Counter(h.output for h in items)
        share = ", ".join(f"{lab} {100 * n / len(items):.0f}%" for lab, n in counts.most_common())
        texts = [h.text for h in items]
        topics = "; ".join(
            f"{lab}: {' '.join(_frequent([h.text for h in items if h.output == lab], top_words, texts))}"
            for lab, _ in counts.most_common())
        return f"User profile: labels {share}. Typical words per label - {topics}."
    if spec.kind == "rating":
        scale = spec.level_values()
        rated = sorted((scale[h.output], h.output) for h in items if h.output in scale)
        if not rated:
            return "User profile: no ratings."
        mean = sum(v for v, _ in rated) / len(rated)
        typical = f"{mean:.1f}" if spec.numeric_scale else spec.nearest_level(mean)
        return (f"User profile: mean rating {typical}, lowest {rated[0][1]}, highest {rated[-1][1]} "
                f"over {len(rated)} ratings.")
    return f"User profile: often writes {' '.join(_frequent([h.output for h in items], 2 * top_words))}."


def _frequent(texts: list[str], n: int, among: list[str] | None = None) -> list[str]:
    """The `n` words most frequent in `texts`; with `among` (all the user's texts), weighted by how
    much of a word's use falls in `texts`, so words the user uses everywhere do not name a label."""
    counts = Counter(w for t in texts for w in words(t) if len(w) > _SHORT_WORD)
    total = Counter(w for t in among for w in words(t)) if among is not None else counts
    score = {w: c * c / total[w] for w, c in counts.items()}
    return [w for w, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def augmented_spec(spec: TaskSpec, how: str) -> TaskSpec:
    """The task with already-rendered inputs: augmented inputs carry the task's prompt inside."""
    return spec.rendered().model_copy(update={"name": f"{spec.name}.{how}"})


def augment_example(spec: TaskSpec, user: UserRecord, example: Example, how: str, k: int = 4,
                    profile: str | None = None) -> Example:
    """The example with the user's context in front of the task's prompt of its input."""
    if how == "retrieval":
        context = retrieval_context(spec, user, example, k)
    elif how == "profile":
        context = profile if profile is not None else profile_text(spec, user)
    else:
        raise ValueError(f"unknown augmentation {how!r}; choose one of {list(AUGMENTATIONS)}")
    return replace(example, input=spec.render_with(example.input, context))


def augment_users(spec: TaskSpec, users: list[UserRecord], how: str, k: int = 4
                  ) -> tuple[TaskSpec, list[UserRecord]]:
    """Every user's train/val/test examples with augmented prompts, and the task to judge them with.

    History stays as it is: it is what the context is made from.
    """
    out = []
    for user in users:
        profile = profile_text(spec, user) if how == "profile" else None
        out.append(replace(user, **{split: [augment_example(spec, user, e, how, k, profile)
                                            for e in getattr(user, split)]
                                    for split in ("train", "val", "test")}))
    return augmented_spec(spec, how), out
