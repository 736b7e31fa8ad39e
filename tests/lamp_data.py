"""LaMP-format files that tests (and docs/results.md's run) write themselves: no LaMP data is downloaded."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def lamp3(folder: Path) -> tuple[Path, Path]:
    """A two-question LaMP_3 file pair with the format's quirks (numeric ids and scores, an empty text)."""
    questions = [
        {"id": "310", "input": "Rate this review: great phone",
         "profile": [{"id": "3100", "text": "meh", "score": "2"},
                     {"id": "3101", "text": "superb", "score": 5},
                     {"id": "3102", "text": "", "score": "3"}]},
        {"id": 311, "input": "Rate this review: broke in a day",
         "profile": [{"id": "3110", "text": "fine", "score": "4.0"}]},
    ]
    outputs = {"task": "LaMP_3", "golds": [{"id": "311", "output": "1"},
                                           {"id": "310", "output": "5"}]}
    return (write_json(folder / "dev_questions.json", questions),
            write_json(folder / "dev_outputs.json", outputs))


def lamp3_from_generated(folder: Path, users: int, seed: int = 0) -> tuple[Path, Path]:
    """LaMP_3 files made of generated synth-rating users: the training split is the profile,
    the first test example the question (LaMP asks each user one question)."""
    from peftu.data.synthetic import generate

    _, records, _ = generate("synth-rating", users, seed=seed)
    questions = [{"id": f"q-{u.user_id}", "user_id": u.user_id, "input": u.test[0].input,
                  "profile": [{"id": e.id, "text": e.input, "score": e.output} for e in u.train]}
                 for u in records]
    golds = [{"id": f"q-{u.user_id}", "output": u.test[0].output} for u in records]
    folder.mkdir(parents=True, exist_ok=True)
    return (write_json(folder / "questions.json", questions),
            write_json(folder / "outputs.json", {"task": "LaMP_3", "golds": golds}))
