"""PEFT-U: the raw annotator table (CSV, split here) and `user_data.json` (split already).

In PEFT-U each annotator is one user: the table has one label column per
annotator, and `user_data.json` one key per user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftu.data.loaders.reading import (
    LoadResult,
    default_name,
    json_object,
    label_set,
    read_csv_rows,
    read_json,
    report_of,
    text_field,
)
from peftu.data.schema import SPLITS, Example, HistoryItem, TaskSpec, UserRecord
from peftu.data.split import split_users
from peftu.errors import DataError

CLASSIFY_PROMPT = "Text: {input}\nLabel:"
RATE_PROMPT = "Text: {input}\nRating:"
LABEL_PREFIX = "label_"


# ---------------------------------------------------------------------------
# the annotator table (CSV)

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
                           kind: str = "classification", levels: list[str] | None = None) -> LoadResult:
    """Load a PEFT-U raw annotator table; each annotator becomes one user.

    The CSV has columns `id`, `text` and one `label_<annotator>` column per
    annotator. An empty cell means the annotator did not label that item and
    gives no sample. Users are split per user with `split_users`. `kind` and
    `levels` make it a rating task, as for `load_peftu_user_data`.
    """
    path = Path(path)
    rows = read_csv_rows(path)
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

    spec = task_of(default_name(path, task_name), kind, labels, path, f"{LABEL_PREFIX}*",
                   f"PEFT-U annotations from {path.name}", levels)
    users, report = split_users(samples, seed=seed, min_samples=min_samples,
                                fractions=fractions)
    return spec, users, report


# ---------------------------------------------------------------------------
# user_data.json (already split)

def _peftu_sample(sample: Any, source: Path, record: str) -> tuple[str, list[str]]:
    """(text, labels) of one user_data.json sample: every label counts as right, the first is trained on."""
    sample = json_object(sample, source, record, None)
    text = text_field(sample, "text", source, record)
    if "label" not in sample:
        raise DataError("missing", source=str(source), record=record, field="label")
    label = sample["label"]
    if not isinstance(label, list) or not label:
        raise DataError("expected a non-empty list of labels", source=str(source),
                        record=record, field="label")
    if not all(isinstance(x, str) and x.strip() for x in label):
        raise DataError("every label must be a non-empty string", source=str(source),
                        record=record, field="label")
    return text, list(dict.fromkeys(x.strip() for x in label))


def task_of(name: str, kind: str, labels: set[str], source: Path, field: str, description: str,
            levels: list[str] | None = None) -> TaskSpec:
    """The imported task: a classification over the labels seen, or a rating over ordered levels
    (`levels`, lowest first, or the labels themselves when they are numbers, in numeric order)."""
    if kind == "classification":
        if levels:
            raise DataError("--levels orders a rating scale; a classification task takes none", source=str(source))
        return TaskSpec(name=name, kind=kind, prompt=CLASSIFY_PROMPT, labels=label_set(labels, source, field),
                        description=description)
    if kind != "rating":
        raise DataError(f"unknown task kind {kind!r}; choose classification or rating", source=str(source))
    if levels:
        if len(set(levels)) != len(levels) or len(levels) < 2:
            raise DataError(f"--levels must be at least two distinct levels, got {levels}", source=str(source))
        unknown = sorted(labels - set(levels))
        if unknown:
            raise DataError(f"label(s) {unknown} are not among the levels {levels}", source=str(source), field=field)
    else:
        try:
            levels = sorted(label_set(labels, source, field), key=float)
        except ValueError:
            raise DataError(f"a rating task's labels must be numbers, or their order given with --levels; "
                            f"found {sorted(labels)}", source=str(source), field=field) from None
    return TaskSpec(name=name, kind="rating", prompt=RATE_PROMPT, labels=levels, description=description)


def load_peftu_user_data(path: str | Path, *, task_name: str | None = None, min_samples: int = 10,
                         kind: str = "classification", levels: list[str] | None = None) -> LoadResult:
    """Load PEFT-U's `user_data.json`, which is already split per user.

    Layout: ``{user_id: {"train"|"val"|"test": {sample_id: {"text", "label": [..]}}}}``.
    A missing split is empty. Each user's history is their train samples.
    A sample with several labels is trained on the first and any of them counts
    as right (`Example.also`), as PEFT-U scores it. The label set is every label
    seen, dropped users included; `kind="rating"` makes them levels of a scale
    (see `task_of`), scored by MAE over the levels' positions.
    """
    path = Path(path)
    data = json_object(read_json(path), path, None, None)
    users: list[UserRecord] = []
    labels: set[str] = set()
    for user_id, splits in data.items():
        where = f"user {user_id!r}"
        if not user_id.strip():
            raise DataError("empty user id", source=str(path), record=where)
        splits = json_object(splits, path, where, None)
        record = UserRecord(user_id=user_id)
        split_of: dict[str, str] = {}
        for split, items in splits.items():
            if split not in SPLITS:
                raise DataError(f"unknown split; expected one of {list(SPLITS)}",
                                source=str(path), record=where, field=split)
            items = json_object(items, path, f"{where} / {split}", None)
            for sample_id, sample in items.items():
                at = f"{where} / {split} / sample {sample_id!r}"
                if sample_id in split_of:
                    raise DataError(f"sample id also in {split_of[sample_id]}",
                                    source=str(path), record=at)
                split_of[sample_id] = split
                text, golds = _peftu_sample(sample, path, at)
                labels.update(golds)
                getattr(record, split).append(Example(id=sample_id, input=text, output=golds[0], also=golds[1:]))
        record.history = [HistoryItem(id=e.id, text=e.input, output=e.output)
                          for e in record.train]
        if record.n_examples >= min_samples:
            users.append(record)

    spec = task_of(default_name(path, task_name), kind, labels, path, "label",
                   f"PEFT-U user data from {path.name}", levels)
    return spec, users, report_of(users, len(data))
