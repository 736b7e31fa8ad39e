"""Metrics against hand-computed values, and per-user macro averaging."""

from __future__ import annotations

import math

import pytest

from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord
from peftu.evaluation.metrics import Scale, accuracy, better, macro_average, macro_f1, mae, rmse, rouge, task_metrics


def test_accuracy():
    assert accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)


def test_macro_f1_by_hand():
    # label a: tp 1, fp 1, fn 0 -> F1 2/3; label b: tp 2, fp 0, fn 1 -> F1 4/5.
    assert macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # A label that never occurs in golds or predictions does not count.
    assert macro_f1(["a", "a"], ["a", "a"], labels=["a", "b", "c"]) == 1.0
    # A gold label never predicted scores 0.
    assert macro_f1(["a", "a"], ["a", "b"], labels=["a", "b"]) == pytest.approx((2 / 3 + 0) / 2)


def test_mae_rmse_score_a_non_number_as_the_worse_extreme():
    scale = Scale(TaskSpec(name="r", kind="rating", prompt="{input}", labels=["1", "2", "3", "4", "5"]))
    preds, golds = ["2", "five", "3"], ["1", "5", "3"]
    # "five" against gold 5: the extreme farther from 5 is 1, so the error is 4.
    assert mae(preds, golds, scale) == pytest.approx((1 + 4 + 0) / 3)
    assert rmse(preds, golds, scale) == pytest.approx(math.sqrt((1 + 16 + 0) / 3))
    assert mae(["nan"], ["2"], scale) == pytest.approx(3.0)  # 5 is farther from 2 than 1


def test_rouge_by_hand():
    # 3 of 3 predicted unigrams match, 3 of 6 reference ones: P 1, R 1/2, F 2/3; the LCS is the same.
    scores = rouge(["the cat sat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    assert rouge(["a b c d"], ["d c b a"])["rougeL"] == pytest.approx(0.25)


def test_task_metrics_follow_the_kind():
    cls = TaskSpec(name="c", kind="classification", prompt="{input}", labels=["x", "y"])
    assert task_metrics(cls, ["x", "y"], ["x", "x"]) == {"accuracy": 0.5, "f1": pytest.approx((2 / 3) / 2)}
    rating = TaskSpec(name="r", kind="rating", prompt="{input}", labels=["1", "2", "3"])
    assert set(task_metrics(rating, ["1"], ["3"])) == {"mae", "rmse", "accuracy"}
    assert task_metrics(cls, [], []) == {}


LEVELS = ["very-negative", "negative", "neutral", "positive", "very-positive"]


def test_named_levels_are_scored_by_position():
    spec = TaskSpec(name="s", kind="rating", prompt="{input}", labels=LEVELS)
    assert not spec.numeric_scale and spec.level_values()["neutral"] == 2.0
    m = task_metrics(spec, ["negative", "very-positive", "neutral"], ["very-negative", "negative", "neutral"])
    assert m["mae"] == pytest.approx((1 + 3 + 0) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 9 + 0) / 3))
    assert m["accuracy"] == pytest.approx(1 / 3)
    # Not a level: the extreme farther from the gold ("2" is no number on a named scale).
    assert task_metrics(spec, ["2"], ["negative"])["mae"] == pytest.approx(3.0)
    assert spec.nearest_level(2.4) == "neutral" and spec.nearest_level(2.5) == "neutral"
    with pytest.raises(ValueError, match="not a level"):
        task_metrics(spec, ["neutral"], ["meh"])


def test_several_golds_count_a_prediction_right_if_it_is_one_of_them():
    cls = TaskSpec(name="c", kind="classification", prompt="{input}", labels=["x", "y", "z"])
    assert task_metrics(cls, ["y", "z"], [["x", "y"], ["x", "y"]])["accuracy"] == 0.5
    rating = TaskSpec(name="s", kind="rating", prompt="{input}", labels=LEVELS)
    # Wrong either way: the error is to the nearest of the golds.
    m = task_metrics(rating, ["very-positive", "neutral"], [["negative", "positive"], ["neutral", "negative"]])
    assert m["mae"] == pytest.approx((1 + 0) / 2) and m["accuracy"] == 0.5
    # Examples carry their golds, output first.
    assert Example("1", "t", "x", also=["y"]).golds == ["x", "y"]


def _user(uid: str, n_history: int) -> UserRecord:
    return UserRecord(uid, history=[HistoryItem(str(i), "t") for i in range(n_history)],
                      test=[Example("1", "i", "o")])


def test_macro_average_overall_and_by_activity_bucket():
    users = [_user("a", 10), _user("b", 10), _user("c", 200)]
    per_user = {"a": {"accuracy": 1.0}, "b": {"accuracy": 0.0}, "c": {"accuracy": 0.5}}
    avg = macro_average(per_user, users)
    assert avg["all"] == {"accuracy": pytest.approx(0.5), "n": 3}
    assert avg["few"] == {"accuracy": pytest.approx(0.5), "n": 2}
    assert avg["many"] == {"accuracy": 0.5, "n": 1}
    assert "some" not in avg


def test_better_knows_which_metrics_are_errors():
    assert better("mae", 0.2, 0.3) and not better("mae", 0.3, 0.2)
    assert better("accuracy", 0.8, 0.7)


# --- one inference layer: an evaluated answer is the server's answer -------------------------


def _served_answers(engine, spec: TaskSpec, asked: dict[str, list[str]]) -> dict[str, list[str]]:
    """Every user's inputs sent to the engine at once (mixed batches, as a replica runs them),
    the way a client asks: /v1/score with the task's labels, or a completion with `answer_sampling`."""
    import asyncio

    from peftu.inference.predict import answer_sampling, answer_text

    async def one(user: str, text: str) -> str:
        if spec.kind == "generation":
            done = await engine.complete(user, engine.encode_prompt(spec.render(text)), answer_sampling(spec))
            return answer_text(done.result)
        scores, _ = await engine.score(user, text, spec.labels)
        return spec.labels[max(range(len(scores)), key=scores.__getitem__)]

    async def every() -> list[list[str]]:
        return await asyncio.gather(*(asyncio.gather(*(one(u, t) for t in texts)) for u, texts in asked.items()))

    return dict(zip(asked, asyncio.run(every()), strict=True))


@pytest.mark.parametrize("task", ["synth-cls", "synth-gen"])
def test_an_evaluated_answer_is_the_answer_the_server_gives(tiny_base, tmp_path, task):
    from peftu.bench.fake_adapters import publish_random_adapters
    from peftu.config import ServeConfig
    from peftu.data.synthetic import generate
    from peftu.evaluation.evaluate import predict_user
    from peftu.inference.predict import predict
    from peftu.model.base import base_fingerprint, load_base
    from peftu.serving.engine import Engine
    from peftu.store import AdapterStore

    spec, users, _ = generate(task, 3, seed=2)
    store = AdapterStore.open(str(tmp_path / "store"))
    publish_random_adapters(store, task, [u.user_id for u in users[:2]], tiny_base, r=4, std=0.3, seed=5)
    model, tok = load_base(tiny_base)
    asked = {u.user_id: [e.input for e in u.test[:4]] for u in users}
    evaluated, own = {}, {}
    for user, texts in asked.items():
        evaluated[user], own[user] = predict_user(model, tok, spec, store, task, user, texts,
                                                  base_fp=base_fingerprint(tiny_base))
    assert list(own.values()) == [True, True, False]
    engine = Engine(ServeConfig(base=tiny_base, store=str(tmp_path / "store"), task=task, max_adapters=4))
    assert _served_answers(engine, spec, asked) == evaluated
    if spec.kind == "generation":  # a random adapter surely changes free text
        first = users[0].user_id
        assert evaluated[first] != predict(model, tok, spec, asked[first])


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix-tuning"])
def test_prompt_learning_answers_are_the_greedy_decode_of_its_training_forward(tiny_base, method):
    """Prompt and prefix tuning put virtual tokens before every prompt; the KV-cached decode of a
    padded batch gives what step-by-step argmax over the model's own (training) forward gives."""
    import torch
    from peft import get_peft_model

    from peftu.fitting.peft_methods import PEFT_METHODS
    from peftu.inference.generate import GenRow, generate_batch
    from peftu.inference.sampling import Sampling
    from peftu.model.base import load_base

    base, tok = load_base(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(base, PEFT_METHODS[method]())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    model.eval()

    def stepwise(ids: list[int], n: int) -> str:
        out: list[int] = []
        for _ in range(n):
            x = torch.tensor([ids + out])
            with torch.no_grad():
                token = int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
        return tok.decode(out, skip_special_tokens=True)

    prompts = [tok(p)["input_ids"] for p in ["Review: the lamp was great. Sentiment:", "Review: bad"]]
    got = generate_batch(model, None, tok, [GenRow(ids, 0, Sampling(max_tokens=8)) for ids in prompts])
    assert [r.text for r in got] == [stepwise(ids, 8) for ids in prompts]
    plain = generate_batch(model.get_base_model(), None, tok, [GenRow(prompts[1], 0, Sampling(max_tokens=8))])
    assert plain[0].text != got[1].text  # the virtual tokens are there


# --- which base the users' adapters belong to ------------------------------------------------


def test_the_store_says_which_task_adapter_version_users_were_fitted_on(tmp_path):
    """No model needed: manifests and fingerprints decide."""
    from peftu.model.bases import merged_fingerprint, users_task_adapter
    from peftu.store import AdapterStore
    from peftu.store.kinds import TASK_ADAPTER

    store = AdapterStore.open(str(tmp_path / "store"))
    base = "b" * 64

    def adapter(seed: int) -> dict[str, bytes]:
        return {"adapter_config.json": b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8}',
                "adapter_model.safetensors": bytes([seed]) * 16}

    def task_adapter(seed: int):
        return store.publish_artifact(TASK_ADAPTER.of("t"), adapter(seed), base_fingerprint=base,
                                      data_fingerprint=str(seed), hparams={})

    assert users_task_adapter(store, "t", base) is None  # no task adapter: the plain base
    first = task_adapter(1)
    assert users_task_adapter(store, "t", base) == first  # no users yet: the task adapter an OPPU run fitted
    store.publish("t", "u1", adapter(2), base_fingerprint=merged_fingerprint(base, first), data_fingerprint="d",
                  hparams={})
    second = task_adapter(3)  # re-fitted after the users: they still belong to the first
    assert users_task_adapter(store, "t", base) == first
    assert users_task_adapter(store, "t", base, oppu=True) == second  # what a new OPPU fit trains on
    assert users_task_adapter(store, "t", base, oppu=False) is None
    assert users_task_adapter(store, "t", "c" * 64) is None  # a task adapter of another base is none of ours
    plain = AdapterStore.open(str(tmp_path / "plain"))
    plain.publish_artifact(TASK_ADAPTER.of("t"), adapter(1), base_fingerprint=base, data_fingerprint="1",
                           hparams={})
    plain.publish("t", "u1", adapter(2), base_fingerprint=base, data_fingerprint="d", hparams={})
    assert users_task_adapter(plain, "t", base) is None  # users fitted on the plain base


def test_eval_finds_the_oppu_base_without_being_told(tiny_base, tmp_path):
    """`peftu fit --oppu` then `peftu eval`: the users' adapters are evaluated on the merged base."""
    from peftu.config import LoraHParams
    from peftu.data.synthetic import generate
    from peftu.errors import ForeignAdapterError
    from peftu.evaluation.evaluate import evaluate_adapters, evaluate_task
    from peftu.fitting.banked import fit_users_banked
    from peftu.fitting.oppu import ensure_task_adapter
    from peftu.model.bases import load_users_base
    from peftu.store import AdapterStore

    spec, users, _ = generate("synth-cls", 3, seed=4)
    store = AdapterStore.open(str(tmp_path / "store"))
    hp = LoraHParams(epochs=1, r=4)
    ensure_task_adapter(tiny_base, spec, users, hp, store)
    merged, tok, merged_fp = load_users_base(tiny_base, store, spec.name, oppu=True)
    fit_users_banked(merged, tok, spec, users[:2], hp, store, base_fp=merged_fp)
    with pytest.raises(ForeignAdapterError, match="not for the loaded base"):
        evaluate_task(tiny_base, store, spec, users, oppu=False)
    result = evaluate_task(tiny_base, store, spec, users)
    assert result["users_without_adapter"] == 1
    per_user, _ = evaluate_adapters(merged, tok, spec, users, store, base_fp=merged_fp, progress=False)
    assert result["per_user"] == macro_average(per_user, users)
