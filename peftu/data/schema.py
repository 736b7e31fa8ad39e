"""The one record type every task uses: a user, their history, their examples.

A *task* (`TaskSpec`) says what kind of answer is wanted (a label from a set,
a rating, free text), how an input becomes a prompt, and which metric judges
it. A *user* (`UserRecord`) holds that user's history (profile items, as LaMP
calls them) and their own train/val/test examples. Every loader and the
synthetic generator produce these, and everything downstream consumes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

TaskKind = Literal["classification", "rating", "generation"]

# Metrics each kind is judged by; the first is the default primary metric.
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1"),
    "rating": ("mae", "rmse", "accuracy"),
    "generation": ("rougeL", "rouge1"),
}
LOWER_IS_BETTER = {"mae", "rmse"}

# Users are grouped by how much history they have: activity buckets.
ACTIVITY_BUCKETS: tuple[tuple[str, int], ...] = (("few", 25), ("some", 100), ("many", 1 << 62))


def activity_bucket(n_history: int) -> str:
    """The bucket (few / some / many) of a user with `n_history` history items."""
    for name, upper in ACTIVITY_BUCKETS:
        if n_history < upper:
            return name
    return ACTIVITY_BUCKETS[-1][0]


class TaskSpec(BaseModel):
    """What a task asks for and how it is judged."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: TaskKind
    prompt: str
    """Template with one `{input}` field; the answer follows it after a space."""
    labels: list[str] = []
    """The label set (classification) or the rating scale, lowest first (rating): numbers
    (LaMP-3's stars) or named ordered levels (PEFT-U's very-negative ... very-positive)."""
    metric: str = ""
    """The primary metric; defaults to the first of `METRICS[kind]`."""
    max_new_tokens: int = 24
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if "{input}" not in self.prompt:
            raise ValueError("prompt must contain the placeholder {input}")
        if not self.metric:
            self.metric = METRICS[self.kind][0]
        if self.metric not in METRICS[self.kind]:
            raise ValueError(f"metric {self.metric!r} does not fit a {self.kind} task; "
                             f"choose one of {list(METRICS[self.kind])}")
        if self.kind in ("classification", "rating"):
            if len(self.labels) < 2:
                raise ValueError(f"a {self.kind} task needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
        return self

    @property
    def numeric_scale(self) -> bool:
        """Are the rating levels numbers (then a level's value is the number, not its position)?"""
        try:
            return all(math.isfinite(float(x)) for x in self.labels)
        except ValueError:
            return False

    def level_values(self) -> dict[str, float]:
        """Each rating level's value on the scale: the number where levels are numbers, else its
        position (0 for the lowest), so errors of named levels count in steps, as LaMP-3's stars do."""
        if self.kind != "rating":
            raise ValueError(f"task {self.name!r} is {self.kind}, not rating: its labels have no values")
        if self.numeric_scale:
            return {x: float(x) for x in self.labels}
        return {x: float(i) for i, x in enumerate(self.labels)}

    def nearest_level(self, value: float) -> str:
        """The level whose value is closest to `value` (the lower one on a tie)."""
        values = self.level_values()
        return min(self.labels, key=lambda x: (abs(values[x] - value), values[x]))

    def render(self, text: str) -> str:
        """The prompt for one input."""
        return self.prompt.replace("{input}", text)

    def render_with(self, text: str, context: str = "") -> str:
        """The prompt for one input with `context` (a user's profile, their nearest texts) on the lines
        before it: a prompt cut to the model's length loses its beginning, so the context goes first."""
        query = self.render(text)
        return f"{context}\n{query}" if context else query

    def rendered(self) -> TaskSpec:
        """The task for inputs already rendered (`render_with`): its prompt is the input itself."""
        return self.model_copy(update={"prompt": "{input}"})

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS[self.kind]


@dataclass
class Example:
    """One input and the answer this user gave to it."""

    id: str
    input: str
    output: str
    also: list[str] = field(default_factory=list)
    """Other answers that count as right (a PEFT-U record with several labels; `output` is the
    first, what the model is trained on)."""

    @property
    def golds(self) -> list[str]:
        """Every answer that counts as right, `output` first."""
        return [self.output, *self.also]


@dataclass
class HistoryItem:
    """One item of a user's history; `output` is empty where the item has none."""

    id: str
    text: str
    output: str = ""


@dataclass
class UserRecord:
    """One user of a task: history items and their own examples, split."""

    user_id: str
    history: list[HistoryItem] = field(default_factory=list)
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def n_examples(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)

    @property
    def activity(self) -> str:
        return activity_bucket(len(self.history))

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> UserRecord:
        return cls(
            user_id=row["user_id"],
            history=[HistoryItem(**h) for h in row["history"] or []],
            train=[_example(e) for e in row["train"] or []],
            val=[_example(e) for e in row["val"] or []],
            test=[_example(e) for e in row["test"] or []],
        )


def _example(row: dict) -> Example:
    """An example from its stored row (data sets saved before `also` existed have none)."""
    return Example(**{**row, "also": list(row.get("also") or [])})


SPLITS = ("train", "val", "test")
