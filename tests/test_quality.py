"""`peftu bench quality` (and the demo's table): every method gives a row, and the pieces behind the rows are right."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord
from peftu.data.synthetic import TASKS, generate
from peftu.quality.methods import default_methods, majority_answer, method_names, parse_methods
from peftu.quality.personalize import augment_users, bm25_top_k, profile_text
from peftu.quality.report import merge_reports
from peftu.store import AdapterStore
from peftu.store.kinds import PLUG, TASK_ADAPTER, quality_task
from tests.lamp_data import lamp3_from_generated
from tests.test_cli import TWEETEVAL

CLS = TaskSpec(name="t", kind="classification", labels=["like", "dislike", "neutral"],
               prompt="Post: {input}\nReaction:")


def user(uid: str, items: list[tuple[str, str]], test: list[tuple[str, str]] = ()) -> UserRecord:
    history = [HistoryItem(id=f"{uid}-{i}", text=t, output=o) for i, (t, o) in enumerate(items)]
    return UserRecord(uid, history=history, train=[Example(h.id, h.text, h.output) for h in history],
                      test=[Example(f"{uid}-t{i}", t, o) for i, (t, o) in enumerate(test)])


def peftu(capsys, *args: str) -> tuple[int, str, str]:
    """`peftu ARGS` in this process (the command's own code path, without a new interpreter's
    start-up): exit code, stdout, stderr."""
    from peftu.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def bench(capsys, *args: str, tmp_path, base: str, out: str = "results.json") -> tuple[dict, dict]:
    """Run the command with --json; the last line's summary and the full results file."""
    code, stdout, stderr = peftu(capsys, "bench", "quality", *args, "--epochs", "1", "--pplug-steps", "20",
                                 "--base", base, "--store", str(tmp_path / "store"), "--out", str(tmp_path / out), "--json")
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), json.loads((tmp_path / out).read_text())


def assert_every_method_has_a_row(summary: dict, full: dict, users: int, names: list[str]) -> None:
    assert list(summary["methods"]) == names
    assert summary["users"] == users
    for name, value in summary["methods"].items():
        assert isinstance(value, float) and math.isfinite(value), (name, value)
        assert full["buckets"][name]["all"]["n"] == users, name
        assert len(full["per_user"][name]) == users, name


# --- through the command ---------------------------------------------------------------------


def test_every_method_on_a_generated_task(tmp_path, tiny_base, capsys, local_ray):
    # In two runs of half the methods each, put together by --report as a long run split up would be;
    # `stored` too, which a run without --methods leaves out.
    names = method_names()
    assert "stored" in names and default_methods() == [m for m in names if m != "stored"] == parse_methods(None)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        bench(capsys, "--task", "synth-rating", "--users", "3", "--methods", ",".join(part),
              tmp_path=tmp_path, base=tiny_base, out=f"part{i}.json")
    code, stdout, stderr = peftu(capsys, "bench", "quality", "--report", str(tmp_path / "part1.json"),
                                 str(tmp_path / "part0.json"), "--markdown", "--plot", str(tmp_path / "q.png"),
                                 "--json")
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    full = merge_reports([json.loads((tmp_path / f"part{i}.json").read_text()) for i in (0, 1)])
    assert (summary["task"], summary["metric"]) == ("synth-rating", "mae")
    assert_every_method_has_a_row(summary, full, 3, names)
    assert "| oppu+profile |" in stdout and (tmp_path / "q.png").stat().st_size > 10_000
    # The majority row is the star nearest the users' own mean training rating, counted here by hand.
    _, users, _ = generate("synth-rating", 3, seed=0)
    for u in users:
        mean = math.ceil(sum(float(e.output) for e in u.train) / len(u.train) - 0.5)  # ties: the lower star
        hand = sum(abs(mean - float(e.output)) for e in u.test) / len(u.test)
        assert full["per_user"]["majority"][u.user_id]["mae"] == pytest.approx(hand, abs=1e-3)
    # OPPU's adapters are the benchmark's own, never the task's real ones; with none of those in the
    # store, the `stored` row is the base's.
    store = AdapterStore.open(str(tmp_path / "store"))
    assert store.list_tasks() == ["quality.synth-rating.oppu", "quality.synth-rating.profile.oppu",
                                  "quality.synth-rating.retrieval.oppu"]
    assert full["per_user"]["stored"] == full["per_user"]["base"]
    # One pooled fit per prompt form: `global` and `oppu` share the plain one.
    pooled = store.artifact_versions(TASK_ADAPTER.of(quality_task("synth-rating")))
    assert len(pooled) == 1
    # The plug was fitted for --pplug-steps steps: 3 users' few rows make one epoch a step or two.
    plug = store.artifact_manifest(PLUG.of(quality_task("synth-rating")))
    steps, per_epoch = plug.metrics["steps"], plug.metrics["steps"] // plug.metrics["epochs"]
    assert full["settings"]["pplug_steps"] == 20 and steps - per_epoch < 20 <= steps


@pytest.mark.slow  # 69 s; the generated task runs every method in `make test`
@pytest.mark.skipif(not TWEETEVAL.exists(), reason=f"{TWEETEVAL} is not there")
def test_every_method_on_tweeteval(tmp_path, tiny_base, capsys, local_ray):
    from peftu.data.loaders import load_peftu_annotations

    # Two annotators of 160 training tweets each; short prompts and larger batches keep it lean.
    summary, full = bench(capsys, "--task", "tweeteval", "--data", str(TWEETEVAL), "--users", "2", "--k", "1",
                          "--max-len", "96", "--batch-size", "16", tmp_path=tmp_path, base=tiny_base)
    assert (summary["task"], summary["metric"], full["examples"]["test"]) == ("tweeteval", "accuracy", 40)
    assert_every_method_has_a_row(summary, full, 2, default_methods())  # what a run without --methods runs
    # Majority: each annotator's most frequent training label, scored on their test tweets by hand.
    _, users, _ = load_peftu_annotations(TWEETEVAL)
    for u in users[:2]:
        top = Counter(e.output for e in u.train).most_common(1)[0][0]
        hand = sum(e.output == top for e in u.test) / len(u.test)
        assert full["per_user"]["majority"][u.user_id]["accuracy"] == pytest.approx(hand)


def test_stored_scores_the_users_own_adapters_as_their_fit_did(tmp_path, tiny_base):
    """The demo's per-user row: adapters a fit published, read back from the store as serving reads them."""
    from peftu.config import LoraHParams
    from peftu.fitting.reference import fit_users
    from peftu.model.base import base_fingerprint, load_base
    from peftu.quality.context import QualityContext
    from peftu.quality.run import run_quality

    spec, users, _ = generate("synth-cls", 2, seed=0)
    store, hp = AdapterStore.open(str(tmp_path / "store")), LoraHParams(epochs=1)
    model, tokenizer = load_base(tiny_base)
    fit_users(model, tokenizer, spec, users[:1], hp, store, base_fp=base_fingerprint(tiny_base), progress=False)
    result = run_quality(QualityContext(spec, users, tiny_base, store, hp, progress=False), ["base", "stored"])
    fitted, without = users[0].user_id, users[1].user_id
    assert result.per_user["stored"][fitted]["accuracy"] == store.manifest(spec.name, fitted).metrics["test_accuracy"]
    assert result.per_user["stored"][without] == result.per_user["base"][without]


def test_lamp_format_files(tmp_path, tiny_base, capsys):
    questions, outputs = lamp3_from_generated(tmp_path / "lamp", users=3)
    summary, full = bench(capsys, "--lamp", str(questions), "--lamp-outputs", str(outputs),
                          "--methods", "base,majority,oppu+retrieval", tmp_path=tmp_path, base=tiny_base)
    assert (summary["task"], summary["users"]) == ("LaMP_3", 3)
    assert list(summary["methods"]) == ["base", "majority", "oppu+retrieval"]
    assert full["examples"]["test"] == 3


def test_any_saved_data_set(tmp_path, tiny_base, capsys):
    """--data: an imported PEFT-U rating task over named levels, saved by `peftu data`, benched as it is."""
    from peftu.data.io import save_task
    from peftu.data.loaders import load_peftu_user_data
    from tests.lamp_data import write_json
    from tests.test_loaders import rated

    levels = ["low", "mid", "high"]
    spec, users, _ = load_peftu_user_data(write_json(tmp_path / "r.json", rated(levels)), kind="rating",
                                          levels=levels, min_samples=1, task_name="levels")
    save_task(tmp_path / "saved", spec, users)
    summary, full = bench(capsys, "--data", str(tmp_path / "saved"), "--methods", "base,majority",
                          tmp_path=tmp_path, base=tiny_base)
    assert (summary["task"], summary["metric"], full["kind"]) == ("levels", "mae", "rating")
    # The user's ratings alternate low, mid: the mean 0.5 rounds to "low"; test golds [high, low] and [low].
    assert full["per_user"]["majority"]["u1"] == {"mae": 0.0, "rmse": 0.0, "accuracy": 1.0}
    assert set(full["per_user"]["base"]["u1"]) == {"mae", "rmse", "accuracy"}


def test_unknown_method_and_missing_data_are_one_clear_line(tmp_path, capsys):
    for args, named in [(["--methods", "base,telepathy"], "telepathy"),
                        (["--task", "tweeteval", "--data", str(tmp_path / "gone.csv")], "gone.csv"),
                        (["--task", "nope"], "nope")]:
        code, _, stderr = peftu(capsys, "bench", "quality", *args)
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and lines[0].startswith("peftu: error:"), lines


# --- retrieval, profile, majority ------------------------------------------------------------


def test_bm25_picks_the_users_own_most_similar_items_never_anothers_nor_the_item_itself():
    alice = user("alice", [("the striker scored a late goal", "like"), ("senate vote on the budget", "dislike"),
                           ("a new pasta recipe from the chef", "neutral"), ("the goal keeper saved it", "like"),
                           ("the band played a concert", "like"), ("inflation and wages rise", "dislike")],
                 test=[("what a goal by the striker", "like")])
    bob = user("bob", [("what a goal by the striker", "dislike"), ("goal goal striker", "dislike")],
               test=[("the striker scored a late goal", "like")])
    top = bm25_top_k(alice.history, alice.test[0].input, 2)
    assert [h.id for h in top] == ["alice-0", "alice-3"]
    spec, augmented = augment_users(CLS, [alice, bob], "retrieval", k=4)
    contexts = {}
    for aug, original, other in ((augmented[0], alice, bob), (augmented[1], bob, alice)):
        for e, plain in zip(aug.train + aug.test, original.train + original.test, strict=True):
            query = CLS.render(plain.input)
            assert e.input.endswith(query)
            contexts[e.id] = context = e.input[:-len(query)]
            assert f"Post: {plain.input}\n" not in context  # never the item being answered
            assert not any(f"Post: {h.text}\n" in context for h in other.history)  # never another user's
    # Bob's test item is Alice's first history item: it is not in his prompt.
    assert "late goal" not in contexts["bob-t0"] and "goal goal striker" in contexts["bob-t0"]
    # The most similar item is last, nearest the query, in the task's own format.
    lines = augmented[0].test[0].input.splitlines()
    assert lines[-4:-2] == ["Post: the striker scored a late goal", "Reaction: like"]
    assert spec.render("x") == "x" and spec.name == "t.retrieval"


def test_augmented_prompt_too_long_loses_its_context_not_the_query(tiny_base):
    from transformers import AutoTokenizer

    from peftu.model.encode import encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    history = [(f"the striker scored goal number {i} in the match", "like") for i in range(30)]
    alice = user("alice", history, test=[("a goal for the striker at last", "dislike")])
    spec, (aug,) = augment_users(CLS, [alice], "retrieval", k=30)
    ids, n_prompt = encode(tokenizer, spec, aug.test[0].input, "dislike", max_len=48)
    assert len(tokenizer(aug.test[0].input)["input_ids"]) > 48
    assert len(ids) <= 48
    assert tokenizer.decode(ids[:n_prompt]).endswith(CLS.render("a goal for the striker at last"))


def test_profile_reflects_the_history():
    alice = user("alice", [("the striker scored", "like")] * 3 + [("senate budget vote", "dislike")])
    text = profile_text(CLS, alice)
    assert "like 75%" in text and "dislike 25%" in text
    assert "like: scored striker" in text and "dislike: budget senate vote" in text
    rating = TASKS["synth-rating"]
    harsh = user("h", [("the lamp was awful", "1"), ("the chair was poor", "2")])
    assert "mean rating 1.5, lowest 1, highest 2" in profile_text(rating, harsh)
    gen = TASKS["synth-gen"]
    writer = user("w", [("x", "breaking: the zoo opens a lab"), ("y", "breaking: the zoo wins")])
    assert profile_text(gen, writer).startswith("User profile: often writes breaking")


def test_majority_is_the_hand_count():
    alice = user("a", [("p", "neutral"), ("q", "dislike"), ("r", "neutral"), ("s", "like")])
    assert majority_answer(CLS, alice, "anything") == "neutral"
    tie = user("b", [("p", "dislike"), ("q", "like")])
    assert majority_answer(CLS, tie, "anything") == "like"  # ties: first in the task's label list
    rating = TASKS["synth-rating"]
    assert majority_answer(rating, user("c", [("p", "1"), ("q", "2"), ("r", "5")]), "x") == "3"  # mean 8/3
    gen = TASKS["synth-gen"]
    writer = user("w", [("the zoo plans a run", "hot: zoo plans run"), ("the mayor wins an award", "wow! mayor wins"),
                        ("the museum closes a lab", "hot: museum shuts lab"), ("a chef opens a market", "hot: chef")])
    assert majority_answer(gen, writer, "the mayor will win an award") == "wow! mayor wins"


def test_peft_methods_hand_the_base_back_unchanged(tiny_base):
    import torch

    from peftu.config import LoraHParams
    from peftu.fitting.peft_methods import PEFT_METHODS, fit_and_score_users
    from peftu.model.base import load_base

    model, tokenizer = load_base(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, users, _ = generate("synth-cls", 1, seed=0)
    for name in PEFT_METHODS:
        scores = fit_and_score_users(model, tokenizer, TASKS["synth-cls"], users, LoraHParams(epochs=1), name,
                                     progress=False)
        assert set(scores) == {users[0].user_id} and 0.0 <= scores[users[0].user_id]["accuracy"] <= 1.0
        after = model.state_dict()
        assert set(after) == set(before), name
        assert all(torch.equal(before[k], after[k]) for k in before), name


def test_bootstrap_interval_over_users():
    from peftu.quality.report import bootstrap_interval

    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    values = [0.0, 1.0] * 20
    low, high = bootstrap_interval(values)
    assert 0.0 < low < 0.5 < high < 1.0 and bootstrap_interval(values) == (low, high)  # seeded
    assert high - low > bootstrap_interval(values * 4)[1] - bootstrap_interval(values * 4)[0]  # more users, narrower
