"""The `neighbors` candidate: votes of a user's nearest labelled texts, its index in the store, and the choice."""

from __future__ import annotations

import math

import pytest
import torch

from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord
from peftu.neighbors.index import SMOOTHING, LabelIndex

SPEC = TaskSpec(name="t", kind="classification", prompt="{input}", labels=["pet", "money", "other"])


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_the_nearest_texts_vote_weighted_by_similarity_and_a_text_can_leave_itself_out():
    index = LabelIndex(_unit([1, 0], [0.9, 0.1], [0, 1]), ["pet", "pet", "money"])
    near_pets, near_money = _unit([1, 0.05]), _unit([0.05, 1])
    pets = index.scores(near_pets, SPEC.labels, k=3)[0]
    assert pets[0] > pets[1] > pets[2]  # the money text votes too, if faintly
    assert sum(math.exp(s) for s in pets) == pytest.approx(1.0)  # log vote shares
    money = index.scores(near_money, SPEC.labels, k=1)[0]
    assert money[1] == pytest.approx(math.log((1 + SMOOTHING) / (1 + 3 * SMOOTHING)))
    assert money[0] == money[2] == pytest.approx(math.log(SMOOTHING / (1 + 3 * SMOOTHING)))
    # Judged on its own training texts, a text's own label does not vote for it.
    itself = index.scores(_unit([0, 1]), SPEC.labels, k=1, leave_self=True)[0]
    assert max(range(3), key=itself.__getitem__) == 0  # its nearest other text is a pet
    assert index.scores(_unit([0, 1]), ["yes", "no"], k=2)[0] == pytest.approx([-math.log(2)] * 2)  # unknown labels


def test_retrieved_shows_the_nearest_texts_as_the_task_asks_them_least_similar_first():
    spec = TaskSpec(name="t", kind="classification", prompt="Text: {input} Topic:", labels=SPEC.labels)
    index = LabelIndex(_unit([1, 0], [0.9, 0.1], [0, 1]), ["pet", "pet", "money"], ["cat", "kitten", "bank"])
    [shown] = index.retrieved(spec, _unit([1, 0.05]), k=2)
    assert shown == "Text: kitten Topic: pet\nText: cat Topic: pet"  # the nearest last, next to the question
    [alone] = index.retrieved(spec, _unit([0, 1]), k=2, leave_self=True)  # its own text is not shown
    assert "bank" not in alone and alone.endswith("Text: kitten Topic: pet")
    assert LabelIndex(index.vectors, index.labels).retrieved(spec, _unit([1, 0])) == [""]  # stored without texts


TEXTS = {"pet": ["my cat sleeps on the sofa", "the puppy chewed my shoes", "we adopted a kitten today",
                 "my dog loves long walks", "the parrot learned a new word"],
         "money": ["the bank raised interest rates", "stocks fell sharply this morning",
                   "my salary went up this year", "inflation makes groceries expensive", "I paid my taxes late"]}


def _labeller(uid: str) -> UserRecord:
    """A user who labels pets `pet` and money `money`, and as many of each: their prior knows nothing."""
    items = [(text, label) for label, texts in TEXTS.items() for text in texts]
    train = [Example(f"{uid}-{i}", text, label) for i, (text, label) in enumerate(items[:3] + items[5:8])]
    val = [Example(f"{uid}-v{i}", text, label) for i, (text, label) in enumerate([items[3], items[8]])]
    test = [Example(f"{uid}-t{i}", text, label) for i, (text, label) in enumerate([items[4], items[9]])]
    return UserRecord(uid, [HistoryItem(e.id, e.input, e.output) for e in train], train, val, test)


def test_a_user_whose_labels_follow_the_text_is_answered_by_their_neighbours(tmp_path):
    """Real encoder: `neighbors` reads the texts, wins over the user's prior on validation, and its index
    is in the store for serving (read back as it was, embedded once)."""
    from peftu.fitting.selection import choose_all, own_neighbors, score_users
    from peftu.neighbors.index import stored_index
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.store import AdapterStore
    from peftu.store.kinds import NEIGHBORS

    store = AdapterStore.open(str(tmp_path / "store"))
    users = [_labeller(f"u{i}") for i in range(3)]
    scored = score_users(SPEC, users, {}, {"neighbors": own_neighbors(SPEC, store, "t")})
    chosen = choose_all(SPEC.metric, {uid: c for uid, (c, _) in scored.items()})
    for uid, (_, scores) in scored.items():
        assert scores["neighbors"].val["accuracy"] == scores["neighbors"].test["accuracy"] == 1.0
        assert scores["majority"].test["accuracy"] == 0.5
        assert chosen[uid].method == "neighbors"
    encoder = HistoryEncoder()
    kept = stored_index(store, encoder.fingerprint, "t", "u0")
    assert kept.labels == [e.output for e in users[0].train] and kept.vectors.shape == (6, encoder.dim)
    assert kept.texts == [e.input for e in users[0].train]  # what `retrieval+` candidates show
    assert len(store.artifact_versions(NEIGHBORS.of("t", "u0"))) == 1
    score_users(SPEC, users[:1], {}, {"neighbors": own_neighbors(SPEC, store, "t")})  # same texts: read, not embedded
    assert len(store.artifact_versions(NEIGHBORS.of("t", "u0"))) == 1
    assert stored_index(store, encoder.fingerprint, "t", "nobody") is None


def test_judged_on_their_training_split_a_user_does_not_see_their_own_labels(tmp_path):
    from peftu.fitting.selection import own_neighbors, score_users
    from peftu.store import AdapterStore

    user = _labeller("u")
    mixed = [Example(e.id, e.input, ["pet", "money"][i % 2]) for i, e in enumerate(user.train)]  # not by topic
    user = UserRecord("u", [HistoryItem(e.id, e.input, e.output) for e in mixed], mixed, [], user.test)
    store = AdapterStore.open(str(tmp_path / "store"))
    (_, scores), = score_users(SPEC, [user], {}, {"neighbors": own_neighbors(SPEC, store, "t")}).values()
    # Its own label would make every training text right; the others' labels do not follow the text.
    assert scores["neighbors"].val["accuracy"] < 1.0


def test_a_corrupt_index_is_a_store_error_naming_it(tmp_path):
    import json

    from safetensors.torch import save

    from peftu.errors import StoreError
    from peftu.neighbors.index import stored_index
    from peftu.store import AdapterStore
    from peftu.store.kinds import NEIGHBORS

    store = AdapterStore.open(str(tmp_path / "store"))
    store.publish_artifact(NEIGHBORS.of("t", "u"), {"neighbors.json": json.dumps({"labels": ["pet"]}).encode(),
                                                    "neighbors.safetensors": save({"vectors": torch.zeros(2, 4)})},
                           encoder_fingerprint="enc", data_fingerprint="d")
    with pytest.raises(StoreError, match="labelled neighbours of user 'u' in task 't' is corrupt"):
        stored_index(store, "enc", "t", "u")
    two = save({"vectors": torch.zeros(2, 4)})
    store.publish_artifact(NEIGHBORS.of("t", "u"), {"neighbors.json": json.dumps({"labels": ["pet", "pet"],
                                                                                  "texts": ["a"]}).encode(),
                                                    "neighbors.safetensors": two},
                           encoder_fingerprint="enc", data_fingerprint="d2")
    with pytest.raises(StoreError, match="texts"):
        stored_index(store, "enc", "t", "u")
    store.publish_artifact(NEIGHBORS.of("t", "u"), {"neighbors.json": json.dumps({"labels": ["pet", "pet"]}).encode(),
                                                    "neighbors.safetensors": two},
                           encoder_fingerprint="enc", data_fingerprint="d3")
    assert stored_index(store, "enc", "t", "u").texts == []  # stored before texts were kept: still votes
