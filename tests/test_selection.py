"""Never worse: per-user choice on validation (pure rules), the `selected` row, and soft tokens that move."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.fitting.selection import (
    PRIOR_WEIGHTS,
    SHRINK_EXAMPLES,
    Choice,
    choose,
    choose_all,
    judge,
    log_prior,
    shrunk,
    task_prior_weights,
    task_strength,
    with_prior,
)

CLS = TaskSpec(name="t", kind="classification", prompt="{input}", labels=["a", "b", "c"])


def test_choose_takes_the_best_and_a_tie_goes_to_the_simpler():
    assert choose("accuracy", {"oppu": 0.8, "base": 0.6, "majority": 0.7}) == "oppu"
    assert choose("accuracy", {"oppu": 0.7, "oppu+prior": 0.7, "majority": 0.7}) == "majority"
    assert choose("accuracy", {"oppu+prior": 0.7, "oppu": 0.7}) == "oppu"
    assert choose("mae", {"oppu": 0.5, "base": 0.4, "global": 0.4}) == "base"  # lower is better
    with pytest.raises(ValueError, match="no candidate"):
        choose("mae", {})


def test_log_prior_counts_the_users_training_labels_smoothed():
    user = UserRecord("u", train=[Example(str(i), "x", lab) for i, lab in enumerate("aab")])
    prior = log_prior(CLS, user)
    assert {k: math.exp(v) for k, v in prior.items()} == pytest.approx({"a": 3 / 6, "b": 2 / 6, "c": 1 / 6})


def _user(uid: str, train: str, val: str) -> UserRecord:
    return UserRecord(uid, train=[Example(f"t{i}", "x", lab) for i, lab in enumerate(train)],
                      val=[Example(f"v{i}", "x", lab) for i, lab in enumerate(val)],
                      test=[Example("q", "x", "a")])


def test_the_prior_weight_is_chosen_on_all_users_validation_together():
    scores = [[-1.0, -0.5, -3.0], [-2.0, -0.1, -3.0], [-0.1, -2.0, -3.0]]  # the model says b, b, a
    habit = _user("habit", "aaaaaaa", "aba")  # prior a 0.8, b 0.1, c 0.1; answers a, b, a
    prior = log_prior(CLS, habit)
    assert with_prior(CLS, scores, prior, 0.0) == ["b", "b", "a"]
    assert with_prior(CLS, scores, prior, 8.0) == ["a", "a", "a"]
    # Alone, the habitual user would take a weight that turns their first answer to "a" but not the second.
    alone = judge(CLS, "base", habit, scores, scores[:1])["base+prior"]
    curve = [at.val["accuracy"] for at in alone.by_weight]
    assert max(curve) == 1.0 and curve[0] == pytest.approx(2 / 3)
    # A user whom the model reads right loses by any weight that flips their "b"s to their usual "a".
    reader = _user("reader", "aaaaaaa", "bba")
    both = {u.user_id: Choice.of_record(
                {"method": "base", "val": {}, "n_val": 3,
                 "prior_curves": {"base+prior": [at.val["accuracy"] for at in
                                                 judge(CLS, "base", u, scores, scores[:1])["base+prior"].by_weight]}})
            for u in (habit, reader)}
    means = [(a + b) / 2 for a, b in zip(*(c.prior_curves["base+prior"] for c in both.values()))]
    weight = task_prior_weights("accuracy", both)["base+prior"]
    assert means[PRIOR_WEIGHTS.index(weight)] == max(means)
    assert weight == PRIOR_WEIGHTS[means.index(max(means))]  # the smallest of the best
    chosen = choose_all("accuracy", both)
    assert all(c.prior_weights == {"base+prior": weight} for c in chosen.values())
    assert chosen["habit"].val["base+prior"] == curve[PRIOR_WEIGHTS.index(weight)]


def test_a_choice_carries_what_choosing_again_needs_and_the_weight_only_when_it_answers():
    plain = Choice("oppu", {"oppu": 1.0}, 3, prior_weights={"oppu+prior": 2.0})
    assert plain.record() == {"method": "oppu", "val": {"oppu": 1.0}, "n_val": 3}  # not a label task: no prior
    labelled = Choice("oppu+prior", {"oppu+prior": 1.0}, 3, {"oppu+prior": [0.5, 1.0]}, {"oppu+prior": 2.0},
                      {"a": -0.1}, answer="a", halves={"oppu": [1.0, 0.5]}, prior_halves={"oppu+prior": [[0.5, 0.5]]})
    rec = labelled.record()
    assert rec["prior_weight"] == 2.0 and rec["log_prior"] == {"a": -0.1} and rec["answer"] == "a"
    assert Choice.of_record(rec) == labelled
    usual = Choice("majority", {"majority": 1.0}, 3, {}, {"oppu+prior": 2.0}, {"a": -0.1}, "a")
    assert "prior_weight" not in usual.record() and usual.record()["answer"] == "a"


def test_few_validation_examples_lean_on_what_wins_for_the_task_many_on_the_users_own():
    # On this task the adapter wins for most users (mae, lower is better).
    crowd = {f"u{i}": Choice("", {"base": 1.0, "oppu": 0.4}, 20) for i in range(9)}
    # Two users whose own split says the base is a little better: one on 2 examples, one on 200.
    few = Choice("", {"base": 0.5, "oppu": 1.0}, 2)
    many = Choice("", {"base": 0.5, "oppu": 1.0}, 200)
    chosen = choose_all("mae", crowd | {"few": few, "many": many})
    assert chosen["few"].method == "oppu" and chosen["many"].method == "base"
    assert all(chosen[u].method == "oppu" for u in crowd)
    # Without shrinking, each user's own split alone decides.
    assert choose_all("mae", crowd | {"few": few}, strength=0)["few"].method == "base"
    means = {"base": (9 * 1.0 + 0.5) / 10, "oppu": (9 * 0.4 + 1.0) / 10}
    assert shrunk(crowd | {"few": few})["few"] == pytest.approx(
        {n: (2 * few.val[n] + SHRINK_EXAMPLES * means[n]) / (2 + SHRINK_EXAMPLES) for n in means})


def _halved(val: dict[str, list[float]], n_val: int) -> Choice:
    """A user's choice from their candidates' metrics on the two halves of their validation split."""
    return Choice("", {name: (a + b) / 2 for name, (a, b) in val.items()}, n_val, halves=val)


def test_the_strength_follows_what_the_validation_halves_say_about_own_splits():
    import random

    rng = random.Random(0)
    # Users who differ: oppu wins for most, the base (by less) for six, and both halves of everyone's
    # split say so: shrunk at the default strength, the six would get oppu.
    differ = {f"u{i}": _halved({"base": [0.6, 0.6], "oppu": [0.5, 0.5]} if i < 6 else
                               {"base": [0.3, 0.35], "oppu": [0.9, 0.85]}, 16) for i in range(20)}
    assert {c.method for u, c in choose_all("accuracy", differ).items()} == {"oppu"}
    assert task_strength("accuracy", differ) == 0.0
    assert all(c.method == ("base" if int(u[1:]) < 6 else "oppu")
               for u, c in choose_all("accuracy", differ, 0.0).items())
    # Users alike: oppu is better for everyone, each half's scores noise around that: the default stays.
    alike = {f"u{i}": _halved({"base": [rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)],
                               "oppu": [rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.8)]}, 4) for i in range(20)}
    assert task_strength("accuracy", alike) == SHRINK_EXAMPLES
    # Too few users with two validation examples to judge by: the default.
    assert task_strength("accuracy", dict(list(differ.items())[:1])) == SHRINK_EXAMPLES
    assert task_strength("accuracy", {u: replace(c, n_val=1) for u, c in differ.items()}) == SHRINK_EXAMPLES


def test_judging_keeps_each_candidates_metric_on_the_even_and_odd_validation_examples():
    user = UserRecord("u", train=[Example("t0", "x", "a")],
                      val=[Example(f"v{i}", "x", lab) for i, lab in enumerate("aabb")],
                      test=[Example("s0", "x", "a")])
    judged = judge(CLS, "base", user, [[0.0, -1.0, -2.0]] * 4, [[0.0, -1.0, -2.0]])  # always "a"
    assert [h["accuracy"] for h in judged["base"].halves] == [0.5, 0.5]  # even: a, b; odd: a, b
    assert all(len(at.halves) == 2 for at in judged["base+prior"].by_weight)
    one = replace(user, val=user.val[:1])
    assert judge(CLS, "base", one, [[0.0, -1.0, -2.0]], [[0.0, -1.0, -2.0]])["base"].halves == []


def test_a_candidate_only_some_users_have_is_pooled_over_those_users():
    scores = shrunk({"a": Choice("", {"base": 0.5, "oppu": 0.9}, 0), "b": Choice("", {"base": 0.7}, 0)})
    assert scores["a"] == pytest.approx({"base": 0.6, "oppu": 0.9}) and scores["b"] == pytest.approx({"base": 0.6})


# --- the `selected` row on a real (tiny) run ---------------------------------------------------------


def test_selected_answers_each_user_with_their_validation_winner(tmp_path, tiny_base):
    from peftu.config import LoraHParams
    from peftu.data.synthetic import generate
    from peftu.quality.context import QualityContext
    from peftu.quality.run import run_quality
    from peftu.store import AdapterStore

    spec, users, _ = generate("synth-rating", 3, seed=0)
    users[0].val = []  # judged on their training split instead
    ctx = QualityContext(spec, users, tiny_base, AdapterStore.open(str(tmp_path / "store")), LoraHParams(epochs=1),
                         progress=False, log=lambda _: None)
    result = run_quality(ctx, ["base", "global", "majority", "oppu", "selected"]).full()
    shrunk_val = shrunk({uid: Choice.of_record(c) for uid, c in result["choices"].items()})
    for user in users:
        choice = result["choices"][user.user_id]
        val, winner = choice["val"], choice["method"]
        assert set(val) >= {"majority", "base", "base+prior", "global", "global+prior", "oppu", "oppu+prior"}
        assert winner == choose("mae", shrunk_val[user.user_id])  # mae: lower is better
        if winner in result["per_user"]:  # a plain row: its test answers are the row's
            assert result["per_user"]["selected"][user.user_id] == result["per_user"][winner][user.user_id]
        else:
            assert winner.endswith("+prior") and choice["prior_weight"] in PRIOR_WEIGHTS


# --- prompt and prefix tuning move off the base -----------------------------------------------------


@pytest.mark.parametrize("name", ["prompt-tuning", "prefix-tuning"])
def test_soft_tokens_move_the_label_scores_at_their_own_learning_rate(tiny_base, name):
    from peftu.config import LoraHParams
    from peftu.data.synthetic import TASKS, generate
    from peftu.fitting.peft_methods import PEFT_METHODS, SOFT_TOKEN_LR
    from peftu.fitting.reference import fit_adapter, release
    from peftu.inference.predict import label_logprobs
    from peftu.model.base import load_base

    spec = TASKS["synth-rating"]
    _, users, _ = generate("synth-rating", 4, seed=0)
    user = max(users, key=lambda u: len(u.train))
    inputs = [e.input for e in user.test + user.val]
    base, tokenizer = load_base(tiny_base)
    before = label_logprobs(base, tokenizer, spec, inputs)
    moved = {}
    for lr in (LoraHParams().lr, SOFT_TOKEN_LR[name]):
        model, _ = fit_adapter(base, tokenizer, spec, user.train, LoraHParams(epochs=2, lr=lr),
                               peft_config=PEFT_METHODS[name]())
        after = label_logprobs(model, tokenizer, spec, inputs)  # the virtual tokens reach the scoring forward
        base = release(model)
        moved[lr] = max(abs(x - y) for a, b in zip(after, before) for x, y in zip(a, b))
    assert moved[SOFT_TOKEN_LR[name]] > 0.2 and moved[SOFT_TOKEN_LR[name]] > 3 * moved[LoraHParams().lr], moved


def test_a_fit_records_who_answers_each_user(tmp_path, tiny_base):
    """After a fit, `select_fitted` publishes every user's validation winner for serving to read."""
    from peftu.config import LoraHParams
    from peftu.data.synthetic import generate
    from peftu.fitting.reference import fit_users
    from peftu.fitting.selection import select_fitted, selected_counts
    from peftu.model.base import base_fingerprint, load_base
    from peftu.store import AdapterStore
    from peftu.store.kinds import SELECTION

    spec, users, _ = generate("synth-cls", 2, seed=1)
    store = AdapterStore.open(str(tmp_path / "store"))
    model, tokenizer = load_base(tiny_base)
    fit_users(model, tokenizer, spec, users, LoraHParams(epochs=1), store, base_fp=base_fingerprint(tiny_base),
              progress=False)
    chosen = select_fitted(tiny_base, store, spec, users)
    record = store.get_record(SELECTION.of(spec.name))
    assert record == {"task": spec.name, "users_base": base_fingerprint(tiny_base), "plug": None,
                      "strength": task_strength("accuracy", {u: Choice.of_record(c) for u, c in chosen.items()}),
                      "users": chosen}
    assert set(chosen) == {u.user_id for u in users}
    for user in users:
        val = chosen[user.user_id]["val"]
        assert set(val) == {"majority", "base", "base+prior", "adapter", "adapter+prior",  # no OPPU: no global
                            "profile+adapter", "profile+adapter+prior", "retrieval+adapter",
                            "retrieval+adapter+prior", "neighbors", "neighbors+prior"}
        assert chosen[user.user_id]["method"] == choose("accuracy", val)
        # only a profile winner's entry carries the profile /v1/score puts before the prompt
        assert ("profile" in chosen[user.user_id]) == chosen[user.user_id]["method"].startswith("profile+")
        if chosen[user.user_id]["method"] == "majority":  # serving answers them with their usual label
            assert chosen[user.user_id]["answer"] == Counter(e.output for e in user.train).most_common(1)[0][0]
            assert set(chosen[user.user_id]["log_prior"]) == set(spec.labels)  # its scores on /v1/score
    assert sum(selected_counts(chosen).values()) == 2

    # A plug of the task for this base makes PPlug a candidate: everyone is scored again (none refitted).
    import torch

    from peftu.config import PPlugConfig
    from peftu.fitting.selection import own_plug
    from peftu.pplug.encoder import HistoryEncoder
    from peftu.pplug.evaluate import evaluate_pplug
    from peftu.pplug.model import PersonaPlug, plug_files
    from peftu.store.kinds import PLUG

    encoder = HistoryEncoder()
    torch.manual_seed(0)
    plug = PersonaPlug(PPlugConfig(projector_hidden=32), encoder.dim, model.config.hidden_size).eval()
    version = store.publish_artifact(PLUG.of(spec.name), plug_files(plug), base_fingerprint=base_fingerprint(tiny_base),
                                     encoder_fingerprint=encoder.fingerprint, data_fingerprint="d", hparams={}).version
    again = select_fitted(tiny_base, store, spec, users, refit=set())
    assert store.get_record(SELECTION.of(spec.name))["plug"] == version
    alone = evaluate_pplug(model, tokenizer, spec, users, plug, encoder, store, split="val", progress=False)
    for user in users:
        val = again[user.user_id]["val"]
        assert {"pplug", "pplug+prior"} <= set(val) and val["pplug"] == alone[user.user_id]["accuracy"]
    # A replica of another base could not serve this plug: no candidate there.
    assert own_plug(spec, model, tokenizer, "another-base", store, spec.name, lambda: encoder) is None


# --- serving: each user answered by their winner ----------------------------------------------------


def test_calibrated_adds_the_weighted_prior_and_only_for_labels_it_knows():
    from peftu.store.selection import calibrated

    prior = {"a": math.log(0.2), "b": math.log(0.8)}
    assert calibrated(["b", "a"], [-1.0, -2.0], prior, 2.0) == pytest.approx([-1 + 2 * math.log(0.8),
                                                                               -2 + 2 * math.log(0.2)])
    assert calibrated(["a", "yes"], [-1.0, -2.0], prior, 2.0) is None


class FakeEngine:
    """`score` as the engine's: the user's adapter (version "v1") answers those in `adapters` unless it is
    not to be loaded, else the base, with PPlug's soft tokens (scores under "plug:<user>") for `plugged`;
    a context in front of the prompt adds 0.5 to the first label's score."""

    spec = TaskSpec(name="t", kind="classification", prompt="{input}", labels=["a", "b", "c"])

    def __init__(self, scores: dict[str | None, list[float]], adapters: set[str], plugged: set[str] = frozenset()):
        self.scores, self.adapters, self.plugged, self.asked, self.contexts = scores, adapters, plugged, [], []

    async def score(self, user, text, labels, adapter=True, context=""):
        self.asked.append(user)
        self.contexts.append(context)
        scored, lease = self._score(user, labels, adapter)
        return ([scored[0] + 0.5, *scored[1:]] if context else scored), lease

    def _score(self, user, labels, adapter):
        from peftu.serving.adapters import Lease

        own = adapter and user in self.adapters
        if not own and user in self.plugged:
            return self.scores[f"plug:{user}"][:len(labels)], Lease(0, None, pplug=True)
        return self.scores[user if own else None][:len(labels)], Lease(1 if own else 0, "v1" if own else None)


def _route(choice: dict | None, merged: bool = False, user: str = "u"):
    from peftu.serving.selection import Route
    from peftu.store.selection import UserChoice

    return Route(user, None if choice is None else UserChoice.model_validate(choice), merged)


def test_a_route_answers_each_winner_and_says_what_answered():
    import asyncio

    labels = ["a", "b", "c"]
    engine = FakeEngine({None: [-1.0, -2.0, -3.0], "u": [-3.0, -1.0, -2.0]}, {"u"})
    prior = {"a": math.log(0.1), "b": math.log(0.1), "c": math.log(0.8)}

    def score(route, asked=labels):
        return asyncio.run(route.score(engine, "text", asked))

    plain = score(_route(None))  # no record: today's answer, named
    assert (plain.label, plain.headers, engine.asked[-1]) == ("b", {"x-peftu-method": "adapter"}, "u")
    assert plain.scores == [{"label": lab, "logprob": s} for lab, s in zip(labels, engine.scores["u"])]
    base = score(_route({"method": "base"}))  # the adapter is not asked for
    assert (base.label, base.headers, engine.asked[-1]) == ("a", {"x-peftu-method": "base"}, None)
    merged = score(_route({"method": "base"}, merged=True))  # an OPPU replica holds the merged base only
    assert merged.headers == {"x-peftu-method": "global", "x-peftu-selected": "base"}

    with_prior = _route({"method": "adapter+prior", "prior_weight": 2.0, "log_prior": prior})
    calibrated = score(with_prior)
    want = [s + 2.0 * prior[lab] for lab, s in zip(labels, engine.scores["u"])]
    assert [e["score"] for e in calibrated.scores] == pytest.approx(want)
    assert [e["logprob"] for e in calibrated.scores] == engine.scores["u"]  # the model's part, as it was
    assert calibrated.label == "c" != plain.label and calibrated.headers == {"x-peftu-method": "adapter+prior"}
    unknown = score(with_prior, ["yes", "no"])  # labels the prior never saw: the model alone
    assert unknown.headers == {"x-peftu-method": "adapter", "x-peftu-selected": "adapter+prior"}
    assert "score" not in unknown.scores[0]
    lost = score(_route({"method": "adapter+prior", "prior_weight": 2.0, "log_prior": prior}, user="gone"))
    assert lost.headers == {"x-peftu-method": "base", "x-peftu-selected": "adapter+prior"}  # its adapter is gone
    assert lost.label == "a"  # the prior was tuned for the adapter: not added to the base's scores

    asked = len(engine.asked)
    majority = _route({"method": "majority", "answer": "c", "log_prior": prior})
    usual = score(majority)
    assert len(engine.asked) == asked  # no model runs
    assert (usual.label, usual.headers) == ("c", {"x-peftu-method": "majority"})
    assert [e["logprob"] for e in usual.scores] == [prior[lab] for lab in labels]
    assert score(majority, ["a", "b"]).headers == {"x-peftu-method": "adapter", "x-peftu-selected": "majority"}
    from peftu.serving.adapters import Lease

    assert majority.user == "u" and majority.generation_headers(Lease(1, "v1")) == {
        "x-peftu-method": "adapter", "x-peftu-selected": "majority"}


def test_a_profile_winner_is_scored_with_their_profile_and_a_user_without_one_with_none():
    import asyncio

    labels = ["a", "b"]
    engine = FakeEngine({None: [-1.0, -2.0], "u": [-1.2, -1.0]}, {"u"})
    prior = {"a": math.log(0.5), "b": math.log(0.5)}

    def score(choice: dict, user: str = "u"):
        return asyncio.run(_route(choice, user=user).score(engine, "text", labels))

    profiled = score({"method": "profile+adapter", "profile": "User profile: labels a 90%."})
    assert engine.contexts[-1] == "User profile: labels a 90%." and engine.asked[-1] == "u"
    assert (profiled.label, profiled.headers) == ("a", {"x-peftu-method": "profile+adapter"})
    with_prior = score({"method": "profile+adapter+prior", "profile": "p", "prior_weight": 1.0, "log_prior": prior})
    assert with_prior.headers == {"x-peftu-method": "profile+adapter+prior"} and "score" in with_prior.scores[0]
    score({"method": "adapter", "profile": "p"})  # a profile another winner left in the entry is not used
    assert engine.contexts[-1] == ""
    lost = score({"method": "profile+adapter", "profile": "p"}, user="gone")  # no adapter: says what answered
    assert lost.headers == {"x-peftu-method": "profile+base", "x-peftu-selected": "profile+adapter"}


def test_a_retrieval_winner_is_scored_with_their_nearest_texts_and_without_an_index_as_their_adapter():
    import asyncio

    from peftu.serving.selection import Route
    from peftu.store.selection import UserChoice

    labels = ["a", "b"]
    engine = FakeEngine({None: [-1.0, -2.0], "u": [-1.2, -1.0], "v": [-1.2, -1.0]}, {"u", "v"})
    near = FakeNeighbors({"u": [0.0, 0.0]})

    def score(user: str):
        choice = UserChoice.model_validate({"method": "retrieval+adapter"})
        return asyncio.run(Route(user, choice, False, near).score(engine, "text", labels))

    shown = score("u")
    assert engine.contexts[-1] == "nearest of u a" and (shown.label, shown.headers) == (
        "a", {"x-peftu-method": "retrieval+adapter"})
    plain = score("v")  # no index in the store: their adapter alone, and the header says so
    assert engine.contexts[-1] == "" and (plain.label, plain.headers) == (
        "b", {"x-peftu-method": "adapter", "x-peftu-selected": "retrieval+adapter"})


class FakeNeighbors:
    """`scores` and `retrieved` as `NeighborsServer`'s: fixed vote shares, and a line naming the user's
    nearest text, for the users who have an index."""

    def __init__(self, votes: dict[str, list[float]]):
        self.votes = votes

    async def scores(self, user, text, labels):
        return self.votes[user][:len(labels)] if user in self.votes else None

    async def retrieved(self, user, text, spec):
        return f"{spec.render('nearest of ' + user)} a" if user in self.votes else None


def test_a_neighbors_winner_is_scored_by_its_votes_and_the_model_answers_without_an_index():
    import asyncio

    from peftu.serving.selection import Route
    from peftu.store.selection import UserChoice

    labels = ["a", "b", "c"]
    engine = FakeEngine({None: [-1.0, -2.0, -3.0], "u": [-3.0, -1.0, -2.0]}, {"u"})
    votes = FakeNeighbors({"u": [-4.0, -4.0, -0.1]})
    prior = {"a": math.log(0.8), "b": math.log(0.1), "c": math.log(0.1)}

    def score(choice: dict, user: str = "u"):
        return asyncio.run(Route(user, UserChoice.model_validate(choice), False, votes).score(engine, "t", labels))

    asked = len(engine.asked)
    voted = score({"method": "neighbors"})
    assert len(engine.asked) == asked  # no model runs
    assert (voted.label, voted.headers) == ("c", {"x-peftu-method": "neighbors"})
    assert [e["logprob"] for e in voted.scores] == votes.votes["u"]
    calibrated = score({"method": "neighbors+prior", "prior_weight": 2.0, "log_prior": prior})
    assert calibrated.label == "a" and calibrated.headers == {"x-peftu-method": "neighbors+prior"}
    assert [e["score"] for e in calibrated.scores] == pytest.approx(
        [v + 2.0 * prior[lab] for lab, v in zip(labels, votes.votes["u"])])
    lost = score({"method": "neighbors"}, user="no-index")  # nothing in the store: the model answers
    assert lost.label == "a" and lost.headers == {"x-peftu-method": "base", "x-peftu-selected": "neighbors"}
    lost_prior = score({"method": "neighbors+prior", "prior_weight": 2.0, "log_prior": prior}, user="no-index")
    assert "score" not in lost_prior.scores[0]  # the weight was chosen for the votes, not for the model


def test_a_pplug_winner_gets_the_plug_without_their_adapter_and_the_base_where_the_replica_has_none():
    import asyncio

    labels = ["a", "b", "c"]
    prior = {"a": math.log(0.1), "b": math.log(0.1), "c": math.log(0.8)}
    scores = {None: [-1.0, -2.0, -3.0], "u": [-3.0, -1.0, -2.0], "plug:u": [-2.0, -3.0, -1.5]}
    plugged, plain = FakeEngine(scores, {"u"}, plugged={"u"}), FakeEngine(scores, {"u"})

    def score(engine, choice):
        route = _route(choice)
        assert (route.user, route.adapter) == ("u", False)  # PPlug reads their history; their adapter stays out
        return asyncio.run(route.score(engine, "text", labels))

    served = score(plugged, {"method": "pplug"})
    assert (served.label, served.headers) == ("c", {"x-peftu-method": "pplug"})
    assert [e["logprob"] for e in served.scores] == scores["plug:u"]
    with_prior = score(plugged, {"method": "pplug+prior", "prior_weight": 1.0, "log_prior": prior})
    assert with_prior.headers == {"x-peftu-method": "pplug+prior"}
    assert [e["score"] for e in with_prior.scores] == pytest.approx([s + prior[lab] for lab, s in zip(labels,
                                                                                                   scores["plug:u"])])
    no_plug = score(plain, {"method": "pplug"})  # a replica without PPlug on: the base, not their adapter
    assert (no_plug.label, no_plug.headers) == ("a", {"x-peftu-method": "base", "x-peftu-selected": "pplug"})
    assert _route({"method": "adapter"}).adapter and _route(None).adapter and not _route({"method": "base"}).adapter


def test_a_replica_reads_the_record_again_after_an_invalidate_and_not_one_for_another_base(tmp_path):
    import asyncio

    from peftu.serving.selection import Selections
    from peftu.store import AdapterStore
    from peftu.store.kinds import SELECTION

    store = AdapterStore.open(str(tmp_path / "store"))

    def publish(users_base: str, method: str) -> None:
        store.put_record(SELECTION.of("t"), {"task": "t", "users_base": users_base,
                                             "users": {"u": {"method": method, "val": {method: 1.0}}}})

    async def run() -> list:
        selections = Selections(store, "t", "fp", ttl_s=3600)
        seen = [(await selections.route("u")).choice]
        publish("fp", "base")
        seen.append((await selections.route("u")).choice)  # within the TTL: the copy it has
        selections.invalidate()
        seen.append((await selections.route("u")).choice.method)
        publish("another-fp", "majority")
        selections.invalidate()
        seen.append((await selections.route("u")).choice)
        seen.append(selections.merged)
        return seen

    assert asyncio.run(run()) == [None, None, "base", None, False]


def test_a_replica_with_pplugs_encoder_lends_it_to_neighbours_instead_of_loading_a_second(tmp_path):
    from peftu.serving.selection import Selections
    from peftu.store import AdapterStore

    store = AdapterStore.open(str(tmp_path / "store"))
    loaded = object()  # stands for PPlug's HistoryEncoder: never called here
    assert Selections(store, "t", "fp", ttl_s=1.0, encoder=loaded).neighbors.encoder() is loaded
    assert Selections(store, "t", "fp", ttl_s=1.0).neighbors._encoder is None  # loaded at the first request
