"""LaMP: one split of a LaMP task, each question one user with their profile as history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftu.data.loaders.reading import LoadResult, id_field, json_object, label_set, read_json, report_of, text_field
from peftu.data.schema import Example, HistoryItem, TaskSpec, UserRecord
from peftu.errors import DataError

LAMP_PROMPT = "{input}\nAnswer:"


@dataclass(frozen=True)
class LampTask:
    """How one LaMP task's profile items become history and train examples."""

    kind: str
    text_fields: tuple[str, ...]
    """Profile fields that hold an item's text; the first present is used."""
    output_fields: tuple[str, ...] = ()
    """Profile fields that hold an item's output; none means history only, no train examples."""
    labels: tuple[str, ...] = ()
    """Fixed label set; empty for LaMP_2 (taken from the data) and generation tasks."""
    max_new_tokens: int = 24
    description: str = ""


LAMP_TASKS: dict[str, LampTask] = {
    "LaMP_1": LampTask("classification", ("title",), labels=("[1]", "[2]"),
                       description="citation identification: which of two papers the "
                                   "author would cite; history = their paper titles"),
    "LaMP_2": LampTask("classification", ("description", "text"), ("tag", "category"),
                       description="movie tagging (or news categorization in the first "
                                   "release); labels = tags seen in golds and profiles"),
    "LaMP_3": LampTask("rating", ("text",), ("score",), labels=("1", "2", "3", "4", "5"),
                       description="product rating from a review, 1 to 5"),
    "LaMP_4": LampTask("generation", ("text",), ("title",), max_new_tokens=32,
                       description="news headline generation"),
    "LaMP_5": LampTask("generation", ("abstract",), ("title",), max_new_tokens=32,
                       description="scholarly title generation from an abstract"),
    "LaMP_6": LampTask("generation", ("text",), ("title",), max_new_tokens=32,
                       description="email subject generation"),
    "LaMP_7": LampTask("generation", ("text",), max_new_tokens=64,
                       description="tweet paraphrasing; history = the user's tweets"),
}


def _lamp_field(item: dict, fields: tuple[str, ...], rating: bool, source: Path,
                record: str) -> str:
    """The first of `fields` present in a profile item, as text."""
    key = next((k for k in fields if k in item), None)
    if key is None:
        raise DataError("missing", source=str(source), record=record, field=" or ".join(fields))
    return _lamp_value(item[key], rating, source, record, key)


def _lamp_value(value: Any, rating: bool, source: Path, record: str, field: str) -> str:
    """A LaMP text or output; ratings may be numbers and are written as integers ("4")."""
    if rating:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"expected a rating, found {type(value).__name__}",
                            source=str(source), record=record, field=field)
        try:
            number = float(value)
        except ValueError:
            raise DataError(f"expected a rating, found {value!r}", source=str(source),
                            record=record, field=field) from None
        return str(int(number)) if number.is_integer() else str(value).strip()
    if not isinstance(value, str):
        raise DataError(f"expected a string, found {type(value).__name__}",
                        source=str(source), record=record, field=field)
    return value


def _with_id(value: Any, source: Path, record: str) -> tuple[dict, str]:
    """A list entry (question, profile item, gold): a JSON object and its required id."""
    obj = json_object(value, source, record, None)
    return obj, id_field(obj, "id", source, record)


def _claim(seen: set[str], value: str, problem: str, source: Path, record: str, field: str) -> None:
    """Add `value` to the ids `seen` so far; one seen already is `problem`, a DataError."""
    if value in seen:
        raise DataError(problem, source=str(source), record=record, field=field)
    seen.add(value)


def _read_golds(path: Path, task: str | None) -> tuple[str, list[tuple[str, str, str]]]:
    """The task name and the (id, output, record) of each gold in a LaMP outputs file."""
    data = json_object(read_json(path), path, None, None)
    file_task = text_field(data, "task", path, "outputs")
    if task is not None and task != file_task:
        raise DataError(f"outputs are for {file_task!r}, but task {task!r} was asked for",
                        source=str(path), field="task")
    if file_task not in LAMP_TASKS:
        raise DataError(f"unknown LaMP task {file_task!r}; expected one of {list(LAMP_TASKS)}",
                        source=str(path), field="task")
    rating = LAMP_TASKS[file_task].kind == "rating"
    golds = data.get("golds")
    if not isinstance(golds, list):
        raise DataError("expected a list of golds", source=str(path), record="outputs",
                        field="golds")
    out = []
    for i, gold in enumerate(golds):
        at = f"golds[{i}]"
        gold, gold_id = _with_id(gold, path, at)
        at = f"golds[{i}] (id {gold_id!r})"
        if "output" not in gold:
            raise DataError("missing", source=str(path), record=at, field="output")
        out.append((gold_id, _lamp_value(gold["output"], rating, path, at, "output"), at))
    return file_task, out


def load_lamp(questions_path: str | Path, outputs_path: str | Path | None = None, *,
              task: str | None = None, split: str = "test") -> LoadResult:
    """Load one LaMP split; each question is one user with their profile as history.

    The question (with its gold output, or "" without an outputs file) is the
    user's single `split` example; profile items with both a text and an output
    are the train examples. The task comes from the outputs file, else `task`.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    questions_path = Path(questions_path)
    golds: dict[str, str] = {}
    gold_records: dict[str, str] = {}
    if outputs_path is not None:
        outputs_path = Path(outputs_path)
        task, gold_list = _read_golds(outputs_path, task)
        for gold_id, output, at in gold_list:
            if gold_id in golds:
                raise DataError(f"duplicate gold id (first at {gold_records[gold_id]})",
                                source=str(outputs_path), record=at, field="id")
            golds[gold_id], gold_records[gold_id] = output, at
    elif task is None:
        raise ValueError("without an outputs file, pass task= (one of "
                         f"{list(LAMP_TASKS)})")
    elif task not in LAMP_TASKS:
        raise ValueError(f"unknown LaMP task {task!r}; expected one of {list(LAMP_TASKS)}")
    info = LAMP_TASKS[task]
    rating = info.kind == "rating"

    questions = read_json(questions_path)
    if not isinstance(questions, list):
        raise DataError(f"expected a list of questions, found {type(questions).__name__}",
                        source=str(questions_path))
    users: list[UserRecord] = []
    user_ids: set[str] = set()
    question_ids: set[str] = set()
    labels: set[str] = set(info.labels)
    for qi, question in enumerate(questions):
        where = f"question [{qi}]"
        question, qid = _with_id(question, questions_path, where)
        where = f"question {qid!r}"
        _claim(question_ids, qid, "duplicate question id", questions_path, where, "id")
        user_id = id_field(question, "user_id", questions_path, where) if "user_id" in question \
            else qid
        _claim(user_ids, user_id, f"duplicate user id {user_id!r}", questions_path, where, "user_id")
        text = text_field(question, "input", questions_path, where)
        if "profile" not in question:
            raise DataError("missing", source=str(questions_path), record=where,
                            field="profile")
        profile = question["profile"]
        if not isinstance(profile, list):
            raise DataError(f"expected a list, found {type(profile).__name__}",
                            source=str(questions_path), record=where, field="profile")

        record = UserRecord(user_id=user_id)
        item_ids: set[str] = set()
        for pi, item in enumerate(profile):
            at = f"{where} / profile[{pi}]"
            item, item_id = _with_id(item, questions_path, at)
            at = f"{where} / profile[{pi}] (id {item_id!r})"
            _claim(item_ids, item_id, "duplicate profile item id", questions_path, at, "id")
            item_text = _lamp_field(item, info.text_fields, False, questions_path, at)
            output = (_lamp_field(item, info.output_fields, rating, questions_path, at)
                      if info.output_fields else "")
            if info.labels and output and output not in info.labels:
                raise DataError(f"{output!r} is not one of {list(info.labels)}",
                                source=str(questions_path), record=at,
                                field=info.output_fields[0])
            record.history.append(HistoryItem(id=item_id, text=item_text, output=output))
            if output.strip():
                labels.add(output)
                if item_text.strip():
                    record.train.append(Example(id=item_id, input=item_text, output=output))

        gold = ""
        if outputs_path is not None:
            if qid not in golds:
                raise DataError(f"no gold output for {where} of {questions_path.name}",
                                source=str(outputs_path), field="golds")
            gold = golds.pop(qid)
            if info.labels and gold not in info.labels:
                raise DataError(f"{gold!r} is not one of {list(info.labels)}",
                                source=str(outputs_path), record=gold_records[qid],
                                field="output")
            if gold.strip():
                labels.add(gold)
        getattr(record, split).append(Example(id=qid, input=text, output=gold))
        users.append(record)

    if golds:
        unknown = next(iter(golds))
        raise DataError(f"gold id matches no question in {questions_path.name}",
                        source=str(outputs_path), record=gold_records[unknown], field="id")
    spec_labels = label_set(labels, questions_path, "/".join(info.output_fields) or "output") \
        if info.kind == "classification" else list(info.labels)
    spec = TaskSpec(name=task, kind=info.kind, prompt=LAMP_PROMPT, labels=spec_labels,
                    max_new_tokens=info.max_new_tokens, description=info.description)
    return spec, users, report_of(users, len(users))
