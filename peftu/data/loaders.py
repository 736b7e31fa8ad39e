"""Loaders that turn public user-centred benchmarks into TaskSpec + UserRecords.

Every loader returns the same shape, ``(spec, users, report)``:

- ``spec``: the `TaskSpec` (kind, prompt, label set, metric);
- ``users``: a list of `UserRecord`, in the order the users appear in the file;
- ``report``: a `SplitReport` counting users read, kept and dropped, and the
  train/val/test examples of the kept users.

Malformed input raises `DataError` naming the file, where in it (CSV: the
1-based physical line; JSON: the record path such as
``user 'u3' / train / sample 's9'``, or the line of a syntax error) and the
field. The only things dropped are those the rules below name:

- users with fewer than ``min_samples`` samples (PEFT-U loaders; counted in
  the report);
- blank CSV lines, which carry no data;
- LaMP profile items with an empty text or output, which stay in the user's
  history but make no train example.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftu.data.schema import SPLITS, Example, HistoryItem, TaskSpec, UserRecord
from peftu.data.split import SplitReport, split_users
from peftu.errors import DataError

CLASSIFY_PROMPT = "Text: {input}\nLabel:"
LAMP_PROMPT = "{input}\nAnswer:"
LABEL_PREFIX = "label_"

LoadResult = tuple[TaskSpec, list[UserRecord], SplitReport]


# ---------------------------------------------------------------------------
# shared helpers

def _default_name(path: Path, task_name: str | None) -> str:
    """The task name: given, else the data folder's name (PEFT-U keeps one folder per task)."""
    return task_name or path.resolve().parent.name or path.stem


def _label_set(labels: set[str], source: Path, field: str) -> list[str]:
    """The sorted label set; a classification task needs two labels to choose between."""
    if len(labels) < 2:
        raise DataError(f"a classification task needs at least two distinct labels, "
                        f"found {sorted(labels)}", source=str(source), field=field)
    return sorted(labels)


def _report(users: list[UserRecord], users_in: int) -> SplitReport:
    return SplitReport(users_in=users_in, users_kept=len(users),
                       users_dropped=users_in - len(users),
                       train=sum(len(u.train) for u in users),
                       val=sum(len(u.val) for u in users),
                       test=sum(len(u.test) for u in users))


class _JsonObject(dict):
    """A JSON object that remembers keys given twice, which `json` would silently merge."""

    duplicates: list[str]


def _json_object_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _read_json(path: Path) -> Any:
    """Parse a JSON file; syntax errors name the line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f, object_pairs_hook=_json_object_hook)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=str(path),
                        line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}",
                        source=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", source=str(path)) from None


def _object(value: Any, source: Path, record: str | None, field: str | None) -> dict:
    """`value` as a JSON object with no key given twice."""
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, found {type(value).__name__}",
                        source=str(source), record=record, field=field)
    duplicates = getattr(value, "duplicates", [])
    if duplicates:
        raise DataError(f"key {duplicates[0]!r} given more than once", source=str(source),
                        record=record, field=duplicates[0])
    return value


def _text(obj: dict, key: str, source: Path, record: str, *, allow_empty: bool = False) -> str:
    """A required string field."""
    if key not in obj:
        raise DataError("missing", source=str(source), record=record, field=key)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"expected a string, found {type(value).__name__}",
                        source=str(source), record=record, field=key)
    if not allow_empty and not value.strip():
        raise DataError("empty", source=str(source), record=record, field=key)
    return value


def _id(obj: dict, key: str, source: Path, record: str) -> str:
    """A required id: a non-empty string or an integer, as a string."""
    if key not in obj:
        raise DataError("missing", source=str(source), record=record, field=key)
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected a string or integer id, found {type(value).__name__}",
                        source=str(source), record=record, field=key)
    if not str(value).strip():
        raise DataError("empty", source=str(source), record=record, field=key)
    return str(value)


# ---------------------------------------------------------------------------
# PEFT-U annotator table (CSV)

def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """All non-blank rows of a CSV file, each with the physical line it starts on."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise DataError(f"malformed CSV: {e}", source=str(path),
                                    line=reader.line_num) from None
                if row:
                    rows.append((start, row))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}",
                        source=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror or e}", source=str(path)) from None
    return rows


def _annotation_columns(header: list[str], path: Path, line: int
                        ) -> tuple[int, int, list[tuple[int, str]]]:
    """Positions of `id` and `text` and of each `label_<annotator>` column."""
    names = [h.strip() for h in header]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError("column given more than once", source=str(path), line=line,
                            field=name)
        seen.add(name)
    for required in ("id", "text"):
        if required not in names:
            raise DataError("missing column", source=str(path), line=line, field=required)
    labels = []
    for i, name in enumerate(names):
        if name in ("id", "text"):
            continue
        if not name.startswith(LABEL_PREFIX) or name == LABEL_PREFIX:
            raise DataError(f"unexpected column; expected id, text and "
                            f"{LABEL_PREFIX}<annotator> columns", source=str(path),
                            line=line, field=name)
        labels.append((i, name[len(LABEL_PREFIX):]))
    if not labels:
        raise DataError(f"no {LABEL_PREFIX}<annotator> columns", source=str(path), line=line,
                        field=f"{LABEL_PREFIX}*")
    return names.index("id"), names.index("text"), labels


def load_peftu_annotations(path: str | Path, *, task_name: str | None = None, seed: int = 0,
                           min_samples: int = 10,
                           fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                           ) -> LoadResult:
    """Load a PEFT-U raw annotator table; each annotator becomes one user.

    The CSV has columns `id`, `text` and one `label_<annotator>` column per
    annotator. An empty cell means the annotator did not label that item and
    gives no sample. Users are split per user with `split_users`.
    """
    path = Path(path)
    rows = _read_csv_rows(path)
    if not rows:
        raise DataError("empty file, expected a header row", source=str(path), line=1)
    header_line, header = rows[0]
    id_col, text_col, label_cols = _annotation_columns(header, path, header_line)

    samples: dict[str, list[Example]] = {user: [] for _, user in label_cols}
    first_line: dict[str, int] = {}
    labels: set[str] = set()
    for line, row in rows[1:]:
        if len(row) != len(header):
            field = header[len(row)].strip() if len(row) < len(header) else None
            raise DataError(f"expected {len(header)} cells, found {len(row)}",
                            source=str(path), line=line, field=field)
        item_id, text = row[id_col].strip(), row[text_col]
        if not item_id:
            raise DataError("empty", source=str(path), line=line, field="id")
        if item_id in first_line:
            raise DataError(f"duplicate id {item_id!r} (first on line {first_line[item_id]})",
                            source=str(path), line=line, field="id")
        first_line[item_id] = line
        if not text.strip():
            raise DataError("empty", source=str(path), line=line, field="text")
        for col, user in label_cols:
            label = row[col].strip()
            if label:
                samples[user].append(Example(id=item_id, input=text, output=label))
                labels.add(label)

    spec = TaskSpec(name=_default_name(path, task_name), kind="classification",
                    prompt=CLASSIFY_PROMPT,
                    labels=_label_set(labels, path, f"{LABEL_PREFIX}*"),
                    description=f"PEFT-U annotations from {path.name}")
    users, report = split_users(samples, seed=seed, min_samples=min_samples,
                                fractions=fractions)
    return spec, users, report


# ---------------------------------------------------------------------------
# PEFT-U user_data.json (already split)

def _peftu_sample(sample: Any, source: Path, record: str) -> tuple[str, str]:
    """(text, label) of one user_data.json sample; the label is the list's first element."""
    sample = _object(sample, source, record, None)
    text = _text(sample, "text", source, record)
    if "label" not in sample:
        raise DataError("missing", source=str(source), record=record, field="label")
    label = sample["label"]
    if not isinstance(label, list) or not label:
        raise DataError("expected a non-empty list of labels", source=str(source),
                        record=record, field="label")
    if not isinstance(label[0], str) or not label[0].strip():
        raise DataError("the first label must be a non-empty string", source=str(source),
                        record=record, field="label")
    return text, label[0].strip()


def load_peftu_user_data(path: str | Path, *, task_name: str | None = None,
                         min_samples: int = 10) -> LoadResult:
    """Load PEFT-U's `user_data.json`, which is already split per user.

    Layout: ``{user_id: {"train"|"val"|"test": {sample_id: {"text", "label": [..]}}}}``.
    A missing split is empty. Each user's history is their train samples.
    The label set is every label seen, dropped users included.
    """
    path = Path(path)
    data = _object(_read_json(path), path, None, None)
    users: list[UserRecord] = []
    labels: set[str] = set()
    for user_id, splits in data.items():
        where = f"user {user_id!r}"
        if not user_id.strip():
            raise DataError("empty user id", source=str(path), record=where)
        splits = _object(splits, path, where, None)
        record = UserRecord(user_id=user_id)
        split_of: dict[str, str] = {}
        for split, items in splits.items():
            if split not in SPLITS:
                raise DataError(f"unknown split; expected one of {list(SPLITS)}",
                                source=str(path), record=where, field=split)
            items = _object(items, path, f"{where} / {split}", None)
            for sample_id, sample in items.items():
                at = f"{where} / {split} / sample {sample_id!r}"
                if sample_id in split_of:
                    raise DataError(f"sample id also in {split_of[sample_id]}",
                                    source=str(path), record=at)
                split_of[sample_id] = split
                text, label = _peftu_sample(sample, path, at)
                labels.add(label)
                getattr(record, split).append(Example(id=sample_id, input=text, output=label))
        record.history = [HistoryItem(id=e.id, text=e.input, output=e.output)
                          for e in record.train]
        if record.n_examples >= min_samples:
            users.append(record)

    spec = TaskSpec(name=_default_name(path, task_name), kind="classification",
                    prompt=CLASSIFY_PROMPT, labels=_label_set(labels, path, "label"),
                    description=f"PEFT-U user data from {path.name}")
    return spec, users, _report(users, len(data))


# ---------------------------------------------------------------------------
# LaMP

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


def _read_golds(path: Path, task: str | None) -> tuple[str, list[tuple[str, str, str]]]:
    """The task name and the (id, output, record) of each gold in a LaMP outputs file."""
    data = _object(_read_json(path), path, None, None)
    file_task = _text(data, "task", path, "outputs")
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
        gold = _object(gold, path, at, None)
        gold_id = _id(gold, "id", path, at)
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

    questions = _read_json(questions_path)
    if not isinstance(questions, list):
        raise DataError(f"expected a list of questions, found {type(questions).__name__}",
                        source=str(questions_path))
    users: list[UserRecord] = []
    user_ids: set[str] = set()
    question_ids: set[str] = set()
    labels: set[str] = set(info.labels)
    for qi, question in enumerate(questions):
        where = f"question [{qi}]"
        question = _object(question, questions_path, where, None)
        qid = _id(question, "id", questions_path, where)
        where = f"question {qid!r}"
        if qid in question_ids:
            raise DataError("duplicate question id", source=str(questions_path),
                            record=where, field="id")
        question_ids.add(qid)
        user_id = _id(question, "user_id", questions_path, where) if "user_id" in question \
            else qid
        if user_id in user_ids:
            raise DataError(f"duplicate user id {user_id!r}", source=str(questions_path),
                            record=where, field="user_id")
        user_ids.add(user_id)
        text = _text(question, "input", questions_path, where)
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
            item = _object(item, questions_path, at, None)
            item_id = _id(item, "id", questions_path, at)
            at = f"{where} / profile[{pi}] (id {item_id!r})"
            if item_id in item_ids:
                raise DataError("duplicate profile item id", source=str(questions_path),
                                record=at, field="id")
            item_ids.add(item_id)
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
    spec_labels = _label_set(labels, questions_path, "/".join(info.output_fields) or "output") \
        if info.kind == "classification" else list(info.labels)
    spec = TaskSpec(name=task, kind=info.kind, prompt=LAMP_PROMPT, labels=spec_labels,
                    max_new_tokens=info.max_new_tokens, description=info.description)
    return spec, users, _report(users, len(users))
