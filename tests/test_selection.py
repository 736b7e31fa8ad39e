"""Never worse: per-user choice on validation (pure rules), the `selected` row, and soft tokens that move."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from peftu.data.schema import Example, TaskSpec, UserRecord
from peftu.fitting.selection import PRIOR_WEIGHTS, Choice, best_prior_weight, choose, log_prior, with_prior

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


def test_the_prior_weight_is_chosen_on_validation():
    prior = {"a": math.log(0.8), "b": math.log(0.1), "c": math.log(0.1)}
    scores = [[-1.0, -0.5, -3.0], [-2.0, -0.1, -3.0], [-0.1, -2.0, -3.0]]  # the model says b, b, a
    assert with_prior(CLS, scores, prior, 0.0) == ["b", "b", "a"]
    assert with_prior(CLS, scores, prior, 8.0) == ["a", "a", "a"]
    # The user answers a, b, a: a weight that turns the first answer to "a" but not the second wins.
    weight, metrics = best_prior_weight(CLS, scores, ["a", "b", "a"], prior)
    assert metrics["accuracy"] == 1.0 and with_prior(CLS, scores, prior, weight) == ["a", "b", "a"]
    assert weight == min(w for w in PRIOR_WEIGHTS if with_prior(CLS, scores, prior, w) == ["a", "b", "a"])
    # Nothing to gain: the model alone (weight 0).
    assert best_prior_weight(CLS, scores, ["b", "b", "a"], prior)[0] == 0.0


def test_a_choice_carries_the_prior_only_when_it_answers():
    assert Choice("oppu", {"oppu": 1.0}, 2.0, {"a": -0.1}).record() == {"method": "oppu", "val": {"oppu": 1.0}}
    rec = Choice("oppu+prior", {"oppu+prior": 1.0}, 2.0, {"a": -0.1}, answer="a").record()
    assert rec["prior_weight"] == 2.0 and rec["log_prior"] == {"a": -0.1} and "answer" not in rec
    assert Choice("majority", {"majority": 1.0}, None, {}, answer="b").record()["answer"] == "b"


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
    for user in users:
        choice = result["choices"][user.user_id]
        val, winner = choice["val"], choice["method"]
        assert set(val) >= {"majority", "base", "base+prior", "global", "global+prior", "oppu", "oppu+prior"}
        assert val[winner] == min(val.values())  # mae: lower is better; never worse than majority or base on val
        assert winner == choose("mae", val)
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
    assert record == {"task": spec.name, "users_base": base_fingerprint(tiny_base), "users": chosen}
    assert set(chosen) == {u.user_id for u in users}
    for user in users:
        val = chosen[user.user_id]["val"]
        assert set(val) == {"majority", "base", "base+prior", "adapter", "adapter+prior"}  # no OPPU: no global
        assert chosen[user.user_id]["method"] == choose("accuracy", val)
        if chosen[user.user_id]["method"] == "majority":  # serving answers them with their usual label
            assert chosen[user.user_id]["answer"] == Counter(e.output for e in user.train).most_common(1)[0][0]
            assert set(chosen[user.user_id]["log_prior"]) == set(spec.labels)  # its scores on /v1/score
    assert sum(selected_counts(chosen).values()) == 2


# --- serving: each user answered by their winner ----------------------------------------------------


def test_calibrated_adds_the_weighted_prior_and_only_for_labels_it_knows():
    from peftu.store.selection import calibrated

    prior = {"a": math.log(0.2), "b": math.log(0.8)}
    assert calibrated(["b", "a"], [-1.0, -2.0], prior, 2.0) == pytest.approx([-1 + 2 * math.log(0.8),
                                                                               -2 + 2 * math.log(0.2)])
    assert calibrated(["a", "yes"], [-1.0, -2.0], prior, 2.0) is None


class FakeEngine:
    """`score` as the engine's: the user's adapter (version "v1") answers those in `adapters`, else the base."""

    def __init__(self, scores: dict[str | None, list[float]], adapters: set[str]):
        self.scores, self.adapters, self.asked = scores, adapters, []

    async def score(self, user, text, labels):
        from peftu.serving.adapters import Lease

        self.asked.append(user)
        own = user in self.adapters
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
