"""Metrics against hand-computed values, and per-user macro averaging."""

from __future__ import annotations

import math

import pytest

from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord
from peftu.evaluation.metrics import accuracy, better, macro_average, macro_f1, mae, rmse, rouge, task_metrics


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
    scale = [1.0, 2.0, 3.0, 4.0, 5.0]
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
    assert set(task_metrics(rating, ["1"], ["3"])) == {"mae", "rmse"}
    assert task_metrics(cls, [], []) == {}


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
