"""A user's labelled texts as vectors, and the label scores of their nearest ones."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from peftu.data.schema import TaskSpec, UserRecord
from peftu.errors import StoreError
from peftu.pplug.encoder import HistoryEncoder, cached_vectors, embedded
from peftu.store import AdapterStore
from peftu.store.kinds import NEIGHBORS

K = 5
"""How many of the user's labelled texts vote on a new one."""
TEMPERATURE = 0.1
"""A vote weighs ``exp(cosine similarity / TEMPERATURE)``: the nearest texts count most."""
SMOOTHING = 0.01
"""Added to every label's vote share before the log, so a label no neighbour gave stays possible."""
SHOWN = 4
"""How many of the user's nearest labelled texts `retrieved` puts in front of a prompt."""


@dataclass
class LabelIndex:
    """One user's labelled texts: row i of `vectors` (unit norm) was labelled `labels[i]`, and is the
    embedding of `texts[i]` (empty in an index stored before texts were kept)."""

    vectors: torch.Tensor
    labels: list[str]
    texts: list[str] = field(default_factory=list)

    def _nearest(self, queries: torch.Tensor, k: int, leave_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query, the similarities and rows of its `k` nearest texts, best first. `leave_self`: a text
        identical to the query is never one (the query's own, where a user is judged on the texts they
        trained on)."""
        sims = queries @ self.vectors.T
        if leave_self:
            sims[sims > 1 - 1e-5] = -math.inf
        return sims.topk(min(k, len(self.labels)), dim=1)

    def retrieved(self, spec: TaskSpec, queries: torch.Tensor, k: int = SHOWN, leave_self: bool = False
                  ) -> list[str]:
        """Per query vector, the user's `k` nearest labelled texts as the task asks them, each with its
        label, least similar first (a prompt cut to the model's length loses those first); "" without
        texts. What the `retrieval+` candidates put in front of the prompt."""
        if not self.texts:
            return [""] * len(queries)
        top, at = self._nearest(queries, k, leave_self)
        return ["\n".join(f"{spec.render(self.texts[i])} {self.labels[i]}"
                          for s, i in reversed(list(zip(row_sims, row))) if s > -math.inf)
                for row_sims, row in zip(top.tolist(), at.tolist())]

    def scores(self, queries: torch.Tensor, labels: list[str], k: int = K, leave_self: bool = False
               ) -> list[list[float]]:
        """Per query vector, each of `labels`' log vote share among the `k` nearest texts (`leave_self` as
        in `_nearest`)."""
        if not self.labels:
            return [[-math.log(len(labels))] * len(labels) for _ in range(len(queries))]
        top, at = self._nearest(queries, k, leave_self)
        weights = torch.exp((top - top[:, :1]) / TEMPERATURE)  # shifted by the best: no overflow
        weights = torch.nan_to_num(weights)  # every neighbour left out: no votes
        out = []
        for w, idx in zip(weights.tolist(), at.tolist()):
            votes = dict.fromkeys(labels, 0.0)
            for weight, i in zip(w, idx):
                if self.labels[i] in votes:
                    votes[self.labels[i]] += weight
            total = sum(votes.values()) + SMOOTHING * len(labels)
            out.append([math.log((votes[lab] + SMOOTHING) / total) for lab in labels])
        return out


def user_index(store: AdapterStore, encoder: HistoryEncoder, task: str, user: UserRecord) -> LabelIndex:
    """The user's training texts embedded with their labels; published to the store (kind `NEIGHBORS`),
    or read from it where this encoder already embedded these texts and labels."""
    labelled = [h for h in user.history if h.output.strip()]
    texts = [h.text for h in labelled]
    meta, vectors, _ = embedded(store, encoder, NEIGHBORS.of(task, user.user_id), texts,
                                {"labels": [h.output for h in labelled], "texts": texts})
    return LabelIndex(vectors, list(meta["labels"]), list(meta["texts"]))


def stored_index(store: AdapterStore, encoder_fp: str, task: str, user_id: str) -> LabelIndex | None:
    """A user's latest index from the store (None if there is none): what a replica answers them with."""
    found = cached_vectors(store, encoder_fp, NEIGHBORS.of(task, user_id))
    if found is None:
        return None
    meta, vectors = found
    labels, texts = meta.get("labels"), meta.get("texts", [])

    def strings(xs: object, may_be_empty: bool) -> bool:
        return (isinstance(xs, list) and (len(xs) == len(vectors) or (may_be_empty and not xs))
                and all(isinstance(x, str) for x in xs))

    if not strings(labels, False) or not strings(texts, True):
        raise StoreError(f"the {NEIGHBORS.of(task, user_id)} is corrupt: {len(vectors)} vectors, labels "
                         f"{labels!r:.80}, texts {texts!r:.80}")
    return LabelIndex(vectors, labels, texts)
