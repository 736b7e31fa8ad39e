"""Loaders: the real PEFT-U table, written fixtures, and malformed inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftu.data.loaders import LAMP_TASKS, load_lamp, load_peftu_annotations, load_peftu_user_data
from peftu.errors import DataError
from tests.lamp_data import lamp3, write_json

TWEETEVAL = (Path(__file__).resolve().parents[2] / "shared" / "data" / "peft-u" / "tweeteval"
             / "annotations_g3.csv")
needs_tweeteval = pytest.mark.skipif(
    not TWEETEVAL.exists(), reason=f"shared PEFT-U data not found at {TWEETEVAL}")


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def assert_names(err: DataError, *parts: str) -> None:
    """The message names every part (file, line or record, field)."""
    for part in parts:
        assert part in str(err), f"{part!r} not in {str(err)!r}"


def by_id(user) -> dict[str, str]:
    return {e.id: e.output for e in user.train + user.val + user.test}


# --- the real PEFT-U tweeteval table -----------------------------------------------------

@needs_tweeteval
def test_tweeteval_loads_20_users_split_80_10_10():
    spec, users, report = load_peftu_annotations(TWEETEVAL)
    assert spec.name == "tweeteval"
    assert spec.kind == "classification"
    assert spec.labels == ["Hateful", "Non-hateful"]
    assert "{input}" in spec.prompt
    assert len(users) == 20
    assert (report.users_in, report.users_kept, report.users_dropped) == (20, 20, 0)
    assert (report.train, report.val, report.test) == (3200, 400, 400)
    for u in users:
        assert u.n_examples == 200
        assert (len(u.train), len(u.val), len(u.test)) == (160, 20, 20)
        assert len({e.id for e in u.train + u.val + u.test}) == 200
        assert [h.id for h in u.history] == [e.id for e in u.train]


@needs_tweeteval
def test_tweeteval_labels_match_the_csv_cells():
    with open(TWEETEVAL, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    _, users, _ = load_peftu_annotations(TWEETEVAL)
    users = {u.user_id: u for u in users}
    assert set(users) == {c[len("label_"):] for c in rows[0] if c.startswith("label_")}
    # Spot checks: the first row for F_14, and a row where annotators disagree.
    disputed = next(r for r in rows if len({v for k, v in r.items() if k.startswith("label_")}) > 1)
    for row, user in ((rows[0], "F_14"), (disputed, "M_1"), (disputed, "F_20")):
        assert by_id(users[user])[row["id"]] == row[f"label_{user}"]
    texts = {e.id: e.input for e in users["M_1"].train + users["M_1"].test}
    assert all(texts[r["id"]] == r["text"] for r in rows if r["id"] in texts)


@needs_tweeteval
def test_split_is_deterministic_per_seed():
    _, a, _ = load_peftu_annotations(TWEETEVAL, seed=1)
    _, b, _ = load_peftu_annotations(TWEETEVAL, seed=1)
    _, c, _ = load_peftu_annotations(TWEETEVAL, seed=2)
    assert [u.to_row() for u in a] == [u.to_row() for u in b]
    assert [[e.id for e in u.test] for u in a] != [[e.id for e in u.test] for u in c]


# --- small written CSVs -----------------------------------------------------------------

def small_table(tmp_path: Path, n: int = 12, sparse_user: int = 3) -> Path:
    """`n` items labelled by A and B; C labels only the first `sparse_user`."""
    rows = [["id", "text", "label_A", "label_B", "label_C"]]
    for i in range(n):
        rows.append([str(i), f"text {i}", "yes" if i % 2 else "no", "yes",
                     "no" if i < sparse_user else ""])
    folder = tmp_path / "toy"
    folder.mkdir()
    return write_csv(folder / "annotations.csv", rows)


def test_min_samples_drops_sparse_users_and_counts_them(tmp_path):
    spec, users, report = load_peftu_annotations(small_table(tmp_path), min_samples=10)
    assert spec.name == "toy"
    assert spec.labels == ["no", "yes"]
    assert [u.user_id for u in users] == ["A", "B"]
    assert (report.users_in, report.users_kept, report.users_dropped) == (3, 2, 1)
    assert all(u.n_examples == 12 for u in users)
    assert report.train + report.val + report.test == 24

    _, users, report = load_peftu_annotations(tmp_path / "toy" / "annotations.csv",
                                              min_samples=3)
    assert [u.user_id for u in users] == ["A", "B", "C"]
    assert report.users_dropped == 0
    assert by_id(users[2]) == {"0": "no", "1": "no", "2": "no"}


def test_task_name_override(tmp_path):
    spec, _, _ = load_peftu_annotations(small_table(tmp_path), task_name="hate")
    assert spec.name == "hate"


def test_csv_short_row_names_its_physical_line(tmp_path):
    # Row for id 1 spans lines 2-3 (a quoted newline), so the short row starts on line 4.
    path = tmp_path / "short.csv"
    path.write_text('id,text,label_A,label_B\n1,"two\nlines",x,y\n2,hello,x\n3,t,x,y\n',
                    encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_peftu_annotations(path, min_samples=1)
    assert e.value.line == 4 and e.value.field == "label_B"
    assert_names(e.value, "short.csv", "line 4", "label_B")


def test_csv_empty_text(tmp_path):
    path = write_csv(tmp_path / "empty.csv", [["id", "text", "label_A"], ["1", "a", "x"],
                                              ["2", "  ", "y"]])
    with pytest.raises(DataError) as e:
        load_peftu_annotations(path)
    assert_names(e.value, "empty.csv", "line 3", "'text'")


def test_csv_duplicate_ids(tmp_path):
    path = write_csv(tmp_path / "dup.csv", [["id", "text", "label_A"], ["7", "a", "x"],
                                            ["8", "b", "y"], ["7", "c", "y"]])
    with pytest.raises(DataError) as e:
        load_peftu_annotations(path)
    assert_names(e.value, "dup.csv", "line 4", "'id'", "first on line 2")


@pytest.mark.parametrize("header, field", [
    (["text", "label_A"], "id"),
    (["id", "label_A"], "text"),
    (["id", "text"], "label_*"),
    (["id", "text", "label_A", "notes"], "notes"),
    (["id", "text", "label_A", "label_A"], "label_A"),
])
def test_csv_bad_header(tmp_path, header, field):
    path = write_csv(tmp_path / "head.csv", [header, ["1"] * len(header)])
    with pytest.raises(DataError) as e:
        load_peftu_annotations(path)
    assert_names(e.value, "head.csv", "line 1", repr(field))


def test_csv_single_label_is_an_error(tmp_path):
    path = write_csv(tmp_path / "one.csv", [["id", "text", "label_A"], ["1", "a", "x"]])
    with pytest.raises(DataError, match="two distinct labels"):
        load_peftu_annotations(path, min_samples=1)


def test_csv_unterminated_quote_names_a_line(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('id,text,label_A\n1,a,x\n2,"b"c,y\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_peftu_annotations(path)
    assert_names(e.value, "quote.csv", "line 3")


junk_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
junk_row = st.lists(junk_cell, min_size=0, max_size=6)
# Rows that fit the good header, so that some junk files load.
fitting_row = st.lists(st.one_of(junk_cell, st.sampled_from(["x", "y", ""])),
                       min_size=4, max_size=4)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.one_of(st.just(["id", "text", "label_A", "label_B"]), junk_row),
       rows=st.lists(st.one_of(junk_row, fitting_row), max_size=8), quoted=st.booleans())
def test_junk_csv_loads_or_raises_data_error(tmp_path, header, rows, quoted):
    path = tmp_path / "junk.csv"
    if quoted:
        write_csv(path, [header] + rows)
    else:
        path.write_text("\n".join(",".join(r) for r in [header] + rows), encoding="utf-8")
    try:
        spec, users, report = load_peftu_annotations(path, min_samples=1)
    except DataError as e:
        assert "junk.csv" in str(e)
    else:
        assert spec.kind == "classification" and len(spec.labels) >= 2
        assert report.users_kept == len(users)


# --- PEFT-U user_data.json ----------------------------------------------------------------

def user_data() -> dict:
    def samples(prefix: str, n: int, label: str) -> dict:
        return {f"{prefix}{i}": {"text": f"{prefix} text {i}", "label": [label, "extra"]}
                for i in range(n)}
    return {
        "u1": {"train": samples("a", 8, "pos"), "val": samples("b", 1, "neg"),
               "test": samples("c", 2, "pos")},
        "u2": {"train": samples("d", 3, "neu"), "test": samples("e", 1, "neg")},
        "u3": {"train": samples("f", 9, "neg"), "val": samples("g", 1, "pos"),
               "test": samples("h", 1, "neg")},
    }


def test_user_data_roundtrips(tmp_path):
    data = user_data()
    folder = tmp_path / "hatespeech"
    folder.mkdir()
    spec, users, report = load_peftu_user_data(write_json(folder / "user_data.json", data))
    assert spec.name == "hatespeech" and spec.kind == "classification"
    assert spec.labels == ["extra", "neg", "neu", "pos"]  # u2's "neu" counts although u2 is dropped
    assert [u.user_id for u in users] == ["u1", "u3"]
    assert (report.users_in, report.users_kept, report.users_dropped) == (3, 2, 1)
    assert (report.train, report.val, report.test) == (17, 2, 3)
    for u in users:
        for split in ("train", "val", "test"):
            expected = {sid: (s["text"], s["label"])
                        for sid, s in data[u.user_id].get(split, {}).items()}
            assert {e.id: (e.input, e.golds) for e in getattr(u, split)} == expected  # output: the first
        assert [(h.id, h.text, h.output) for h in u.history] == \
            [(e.id, e.input, e.output) for e in u.train]

    _, users, report = load_peftu_user_data(folder / "user_data.json", min_samples=0,
                                            task_name="x")
    assert [u.user_id for u in users] == ["u1", "u2", "u3"] and report.users_dropped == 0


@pytest.mark.parametrize("breakage, field", [
    (lambda d: d["u1"]["train"]["a3"].pop("text"), "'text'"),
    (lambda d: d["u1"]["train"]["a3"].update(label=[]), "'label'"),
    (lambda d: d["u1"]["train"]["a3"].update(label="pos"), "'label'"),
    (lambda d: d["u1"]["train"]["a3"].update(text=5), "'text'"),
    (lambda d: d["u1"]["train"]["a3"].update(label=["pos", ""]), "'label'"),
])
def test_user_data_bad_sample_names_user_split_sample_field(tmp_path, breakage, field):
    data = user_data()
    breakage(data)
    path = write_json(tmp_path / "user_data.json", data)
    with pytest.raises(DataError) as e:
        load_peftu_user_data(path)
    assert_names(e.value, "user_data.json", "user 'u1' / train / sample 'a3'", field)


def test_user_data_unknown_split_and_duplicate_user(tmp_path):
    data = user_data()
    data["u2"]["dev"] = {}
    with pytest.raises(DataError) as e:
        load_peftu_user_data(write_json(tmp_path / "user_data.json", data))
    assert_names(e.value, "user_data.json", "user 'u2'", "'dev'")

    path = tmp_path / "dup.json"
    path.write_text('{"u1": {"train": {}},\n "u1": {"test": {}}}', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_peftu_user_data(path)
    assert_names(e.value, "dup.json", "'u1'", "more than once")


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "user_data.json"
    path.write_text('{\n  "u1": {\n    "train": {,\n  }\n}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_peftu_user_data(path)
    assert e.value.line == 3
    assert_names(e.value, "user_data.json", "line 3")


SUBJECTIVE = TWEETEVAL.parents[1] / "subjectivediscourse"
SENTIMENT_LEVELS = ["very-negative", "negative", "somewhat-negative", "neutral", "somewhat-positive", "positive",
                    "very-positive"]
needs_subjective = pytest.mark.skipif(not SUBJECTIVE.exists(), reason=f"shared PEFT-U data not found at {SUBJECTIVE}")


def rated(levels: list[str]) -> dict:
    return {"u1": {"train": {f"a{i}": {"text": f"t{i}", "label": [levels[i % 2]]} for i in range(8)},
                   "test": {"b0": {"text": "x", "label": [levels[-1], levels[0]]}, "b1": {"text": "y", "label": [levels[0]]}}}}


def test_user_data_as_a_rating_over_named_or_numeric_levels(tmp_path):
    levels = ["low", "mid", "high"]
    spec, users, _ = load_peftu_user_data(write_json(tmp_path / "r.json", rated(levels)), kind="rating",
                                          levels=levels, min_samples=1)
    assert (spec.kind, spec.metric, spec.labels) == ("rating", "mae", levels)  # the given order, not sorted
    assert spec.level_values() == {"low": 0.0, "mid": 1.0, "high": 2.0}
    assert users[0].test[0].golds == ["high", "low"]
    numbers = ["10", "2", "3"]  # numeric order, not text order
    spec, _, _ = load_peftu_user_data(write_json(tmp_path / "n.json", rated(numbers)), kind="rating", min_samples=1)
    assert spec.labels == ["2", "3", "10"] and spec.level_values()["10"] == 10.0
    with pytest.raises(DataError) as e:  # named labels need their order
        load_peftu_user_data(tmp_path / "r.json", kind="rating", min_samples=1)
    assert_names(e.value, "r.json", "--levels", "'label'")
    with pytest.raises(DataError) as e:  # a label the levels do not name
        load_peftu_user_data(tmp_path / "r.json", kind="rating", levels=["low", "high"], min_samples=1)
    assert_names(e.value, "r.json", "['mid']", "'label'")
    with pytest.raises(DataError, match="classification task takes none"):
        load_peftu_user_data(tmp_path / "r.json", levels=levels, min_samples=1)


def test_import_rating_through_the_command(tmp_path, capsys):
    from tests.test_quality import peftu

    levels = ["low", "mid", "high"]
    (tmp_path / "task").mkdir()
    src = write_json(tmp_path / "task" / "user_data.json", rated(levels))
    code, out, err = peftu(capsys, "data", "import", "peft-u-json", str(src), "--kind", "rating",
                           "--levels", ",".join(levels), "--min-samples", "1", "--out", str(tmp_path / "saved"))
    assert code == 0, err
    code, out, err = peftu(capsys, "data", "stats", str(tmp_path / "saved"))
    assert code == 0 and json.loads(out)["kind"] == "rating" and json.loads(out)["metric"] == "mae"
    from peftu.data.io import load_task

    spec, users = load_task(tmp_path / "saved")
    assert spec.labels == levels and users[0].test[0].golds == ["high", "low"]  # several golds survive the save
    code, _, err = peftu(capsys, "data", "import", "peft-u-json", str(src), "--kind", "rating", "--out",
                         str(tmp_path / "bad"))
    assert code == 2 and "--levels" in err and not (tmp_path / "bad").exists()


@needs_subjective
@pytest.mark.parametrize("task, kind, per_user, global_", [
    ("response_sentiment", "rating", {"accuracy": 0.462, "mae": 0.951}, {"accuracy": 0.219, "mae": 1.231}),
    ("response", "classification", {"accuracy": 0.549}, {"accuracy": 0.554}),
])
def test_subjectivediscourse_baselines_as_measured(task, kind, per_user, global_):
    """PEFT-U's split as given; the baselines the issue measured: per user and pooled, the most
    frequent training label (accuracy) and the level nearest the mean training rating (MAE)."""
    from collections import Counter

    from peftu.data.schema import UserRecord
    from peftu.evaluation.metrics import macro_average, task_metrics
    from peftu.quality.methods import majority_answer

    spec, users, report = load_peftu_user_data(SUBJECTIVE / task / "user_data.json", kind=kind,
                                               levels=SENTIMENT_LEVELS if kind == "rating" else None)
    assert (spec.name, report.users_kept, report.train + report.val + report.test) == (task, 37, 6064)
    pooled = UserRecord("all", history=[h for u in users for h in u.history])

    def macro(answer) -> dict[str, float]:
        per = {u.user_id: task_metrics(spec, [answer(u, e) for e in u.test], [e.golds for e in u.test]) for u in users}
        return macro_average(per, users)["all"]

    def mode(who: UserRecord) -> str:
        return Counter(h.output for h in who.history).most_common(1)[0][0]

    got = {"accuracy": macro(lambda u, e: mode(u))["accuracy"]}
    pooled_got = {"accuracy": macro(lambda u, e: mode(pooled))["accuracy"]}
    if kind == "rating":
        got["mae"] = macro(lambda u, e: majority_answer(spec, u, e.input))["mae"]
        pooled_got["mae"] = macro(lambda u, e: majority_answer(spec, pooled, e.input))["mae"]
    assert got == pytest.approx(per_user, abs=5e-4) and pooled_got == pytest.approx(global_, abs=5e-4)


# --- LaMP ---------------------------------------------------------------------------------

def test_lamp3_history_train_and_gold(tmp_path):
    spec, users, report = load_lamp(*lamp3(tmp_path))
    assert spec.name == "LaMP_3" and spec.kind == "rating" and spec.metric == "mae"
    assert spec.labels == ["1", "2", "3", "4", "5"]
    assert spec.render("X").startswith("X")
    assert [u.user_id for u in users] == ["310", "311"]
    u310, u311 = users
    assert [(h.id, h.text, h.output) for h in u310.history] == [
        ("3100", "meh", "2"), ("3101", "superb", "5"), ("3102", "", "3")]
    assert [(e.id, e.input, e.output) for e in u310.train] == [("3100", "meh", "2"),
                                                               ("3101", "superb", "5")]
    assert [(e.id, e.output) for e in u310.test] == [("310", "5")] and not u310.val
    assert [(e.id, e.output) for e in u311.train] == [("3110", "4")]
    assert u311.test[0].input == "Rate this review: broke in a day"
    assert (report.users_kept, report.train, report.val, report.test) == (2, 3, 0, 2)


def test_lamp_without_outputs_is_inference_only(tmp_path):
    questions, _ = lamp3(tmp_path)
    _, users, _ = load_lamp(questions, task="LaMP_3", split="val")
    assert [[(e.id, e.output) for e in u.val] for u in users] == [[("310", "")], [("311", "")]]
    assert all(not u.test for u in users)


def test_lamp2_labels_from_golds_and_profile_tags(tmp_path):
    questions = [
        {"id": "20", "user_id": "alice", "input": "Which tag fits this movie? A heist.",
         "profile": [{"id": "200", "description": "Aliens land.", "tag": "sci-fi"},
                     {"id": "201", "description": "A duel at noon.", "tag": "western"}]},
        {"id": "21", "input": "Which tag fits this movie? Ghosts.",
         "profile": [{"id": "210", "text": "A news item", "category": "comedy"}]},
    ]
    outputs = {"task": "LaMP_2", "golds": [{"id": "20", "output": "crime"},
                                           {"id": "21", "output": "horror"}]}
    spec, users, report = load_lamp(write_json(tmp_path / "q.json", questions),
                                    write_json(tmp_path / "o.json", outputs))
    assert spec.kind == "classification"
    assert spec.labels == ["comedy", "crime", "horror", "sci-fi", "western"]
    assert [u.user_id for u in users] == ["alice", "21"]
    assert [len(u.history) for u in users] == [2, 1]
    assert [(e.input, e.output) for e in users[0].train] == [("Aliens land.", "sci-fi"),
                                                             ("A duel at noon.", "western")]
    assert [(e.input, e.output) for e in users[1].train] == [("A news item", "comedy")]
    assert report.train == 3 and report.test == 2


def test_lamp7_history_only(tmp_path):
    questions = [{"id": "7", "input": "Paraphrase: hi", "profile": [{"id": "70", "text": "yo"}]}]
    spec, users, _ = load_lamp(write_json(tmp_path / "q.json", questions), task="LaMP_7")
    assert spec.kind == "generation" and spec.metric == "rougeL" and spec.labels == []
    assert [(h.text, h.output) for h in users[0].history] == [("yo", "")]
    assert users[0].train == []
    assert set(LAMP_TASKS) == {f"LaMP_{i}" for i in range(1, 8)}


def test_lamp_gold_id_unknown(tmp_path):
    questions, outputs = lamp3(tmp_path)
    data = json.loads(outputs.read_text())
    data["golds"].append({"id": "999", "output": "3"})
    write_json(outputs, data)
    with pytest.raises(DataError) as e:
        load_lamp(questions, outputs)
    assert_names(e.value, "dev_outputs.json", "golds[2] (id '999')", "'id'")


def test_lamp_profile_item_missing_score(tmp_path):
    questions, outputs = lamp3(tmp_path)
    data = json.loads(questions.read_text())
    del data[1]["profile"][0]["score"]
    write_json(questions, data)
    with pytest.raises(DataError) as e:
        load_lamp(questions, outputs)
    assert_names(e.value, "dev_questions.json", "question '311'", "profile[0] (id '3110')",
                 "'score'")


@pytest.mark.parametrize("breakage, record, field", [
    (lambda q: q[0].pop("input"), "question '310'", "'input'"),
    (lambda q: q[1].pop("id"), "question [1]", "'id'"),
    (lambda q: q[0].update(profile={"id": "x"}), "question '310'", "'profile'"),
    (lambda q: q[1].update(id="310"), "question '310'", "'id'"),
    (lambda q: q[0]["profile"][1].update(score="9"), "profile[1] (id '3101')", "'score'"),
])
def test_lamp_bad_questions(tmp_path, breakage, record, field):
    questions, outputs = lamp3(tmp_path)
    data = json.loads(questions.read_text())
    breakage(data)
    write_json(questions, data)
    with pytest.raises(DataError) as e:
        load_lamp(questions, outputs)
    assert_names(e.value, "dev_questions.json", record, field)


def test_lamp_duplicate_gold_and_missing_gold(tmp_path):
    questions, outputs = lamp3(tmp_path)
    write_json(outputs, {"task": "LaMP_3", "golds": [{"id": "310", "output": "5"},
                                                     {"id": "310", "output": "4"}]})
    with pytest.raises(DataError) as e:
        load_lamp(questions, outputs)
    assert_names(e.value, "dev_outputs.json", "golds[1] (id '310')", "'id'")

    write_json(outputs, {"task": "LaMP_3", "golds": [{"id": "310", "output": "5"}]})
    with pytest.raises(DataError) as e:
        load_lamp(questions, outputs)
    assert_names(e.value, "dev_outputs.json", "question '311'", "'golds'")


def test_lamp_task_mismatch_and_unknown(tmp_path):
    questions, outputs = lamp3(tmp_path)
    with pytest.raises(DataError, match="LaMP_2"):
        load_lamp(questions, outputs, task="LaMP_2")
    with pytest.raises(ValueError):
        load_lamp(questions, task="LaMP_9")
    with pytest.raises(ValueError):
        load_lamp(questions)
