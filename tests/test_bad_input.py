"""Bad input, generated: data files of arbitrary bytes and JSON shapes, hostile adapter files.

Every loader either loads or raises DataError naming the file (never another
exception type, never a hang); every adapter file that a bank cannot use exactly
is refused with a ValueError naming the adapter and what is wrong with it.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from peftu.bank.model import AdapterBank, parse_adapter
from peftu.data.io import load_task
from peftu.data.loaders import LAMP_TASKS, load_lamp, load_peftu_annotations, load_peftu_user_data
from peftu.errors import DataError

FUZZ = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25)


def loads_or_names_the_file(load, path: Path, *more: Path) -> None:
    try:
        load()
    except DataError as e:
        assert any(p.name in str(e) for p in (path, *more)), str(e)


# --- arbitrary bytes ---------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
       bom=st.booleans())
def test_arbitrary_bytes_in_every_loader(tmp_path, data, bom):
    raw = (b"\xef\xbb\xbf" if bom else b"") + data
    for name, load in (("a.csv", load_peftu_annotations), ("user_data.json", load_peftu_user_data)):
        path = tmp_path / name
        path.write_bytes(raw)
        loads_or_names_the_file(partial(load, path, min_samples=0), path)
    questions = tmp_path / "questions.json"
    questions.write_bytes(raw)
    loads_or_names_the_file(lambda: load_lamp(questions, task="LaMP_7"), questions)
    outputs = tmp_path / "outputs.json"
    outputs.write_bytes(raw)
    questions.write_text("[]")
    loads_or_names_the_file(lambda: load_lamp(questions, outputs), outputs)
    saved = tmp_path / "saved"
    saved.mkdir(exist_ok=True)
    (saved / "task.json").write_bytes(raw)
    (saved / "users.parquet").write_bytes(raw[::-1])
    loads_or_names_the_file(lambda: load_task(saved), saved / "task.json", saved / "users.parquet")


# --- JSON of the right outline with junk inside ------------------------------------------------------


def _sample():
    return st.one_of(st.fixed_dictionaries({"text": st.text(max_size=6) | json_values,
                                            "label": st.lists(st.text(max_size=3), max_size=2) | json_values}),
                     json_values)


user_data = st.dictionaries(
    st.text(max_size=6),
    st.dictionaries(st.sampled_from(["train", "val", "test", "dev"]),
                    st.dictionaries(st.text(max_size=4), _sample(), max_size=4) | json_values, max_size=3)
    | json_values, max_size=4) | json_values


@FUZZ
@given(data=user_data)
def test_user_data_json_of_any_shape(tmp_path, data):
    path = tmp_path / "user_data.json"
    path.write_text(json.dumps(data))
    loads_or_names_the_file(lambda: load_peftu_user_data(path, min_samples=0), path)


_item = st.dictionaries(st.sampled_from(["id", "text", "title", "abstract", "description", "score", "tag",
                                         "category"]), st.text(max_size=6) | st.integers(0, 6) | json_values,
                        max_size=5)
questions = st.lists(st.one_of(st.fixed_dictionaries({"id": st.text(max_size=4) | st.integers(0, 99) | json_values,
                                                      "input": st.text(max_size=8) | json_values,
                                                      "profile": st.lists(_item, max_size=3) | json_values}),
                               json_values), max_size=4) | json_values


@FUZZ
@given(qs=questions, task=st.sampled_from(sorted(LAMP_TASKS) + ["LaMP_9"]),
       golds=st.lists(st.fixed_dictionaries({"id": st.text(max_size=4) | json_values,
                                             "output": st.text(max_size=4) | json_values}), max_size=4) | json_values)
def test_lamp_files_of_any_shape(tmp_path, qs, task, golds):
    q, o = tmp_path / "questions.json", tmp_path / "outputs.json"
    q.write_text(json.dumps(qs))
    o.write_text(json.dumps({"task": task, "golds": golds}))
    loads_or_names_the_file(lambda: load_lamp(q, o), q, o)


_cell = st.none() | st.text(max_size=5)
_rows = st.lists(st.fixed_dictionaries({"id": _cell, "input": _cell, "output": _cell}), max_size=2)


@FUZZ
@given(users=st.lists(st.fixed_dictionaries({
    "user_id": _cell, "history": st.lists(st.fixed_dictionaries({"id": _cell, "text": _cell, "output": _cell}),
                                          max_size=2),
    "train": _rows, "val": _rows, "test": _rows}), min_size=1, max_size=4), spec=json_values)
def test_a_saved_task_with_junk_cells(tmp_path, users, spec):
    """A real Parquet file with the right columns and nulls or odd strings in them, beside a junk task.json."""
    import datasets

    from peftu.data.io import FEATURES

    folder = tmp_path / "task"
    folder.mkdir(exist_ok=True)
    datasets.Dataset.from_list(users, features=FEATURES).to_parquet(str(folder / "users.parquet"))
    good = {"name": "t", "kind": "classification", "prompt": "{input}", "labels": ["a", "b"]}
    (folder / "task.json").write_text(json.dumps(good if spec is None else spec))
    try:
        _, loaded = load_task(folder)
    except DataError as e:
        assert "task.json" in str(e) or "users.parquet" in str(e), str(e)
    else:
        assert all(u.user_id for u in loaded) and len({u.user_id for u in loaded}) == len(loaded)
        for u in loaded:
            assert all(isinstance(x, str) for e in u.train + u.val + u.test for x in (e.id, e.input, e.output))


# --- hostile adapter files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_state(tiny_base):
    from peft import LoraConfig

    from peftu.model.base import load_base

    model, _ = load_base(tiny_base)
    bank = AdapterBank(model, 2, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return bank, bank.slot_state(0)


def _config(**over) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **over}).encode()


def _huge_header() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 2**62]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 8


@pytest.mark.parametrize("config, weights, names", [
    (b"{not json", None, "adapter_config.json is not valid JSON"),
    (_config(peft_type="IA3"), None, "not a LoRA adapter"),
    (_config(r=True), None, "rank 1..8"),
    (_config(r=64), None, "rank 1..8"),
    (b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}', None, "lora_alpha must be a finite number"),
    (_config(lora_alpha="16"), None, "lora_alpha must be a finite number"),
    (_config(use_dora=True), None, "use_dora"),
    (_config(), _huge_header(), "not a readable safetensors file"),
    (_config(), b"\x80\x04\x95 a pickle", "not a readable safetensors file"),
    (_config(), b"", "not a readable safetensors file"),
])
def test_hostile_adapter_files_are_refused_by_parse_adapter(config, weights, names):
    weights = save({"w": torch.zeros(2, 2)}) if weights is None else weights
    with pytest.raises(ValueError, match="user 'mallory'") as info:
        parse_adapter(config, weights, 8, "adapter of user 'mallory'")
    assert names in str(info.value)


@pytest.mark.parametrize("change, names", [
    (lambda v: v.to(torch.int64), "dtype torch.int64"),
    (lambda v: v.to(torch.bool), "dtype torch.bool"),
    (lambda v: torch.full_like(v, math.nan), "NaN or infinite"),
    (lambda v: torch.full_like(v, math.inf), "NaN or infinite"),
    (lambda v: v.reshape(-1), "has shape"),
    (lambda v: v.T.contiguous(), "has shape"),
])
def test_hostile_weights_never_reach_a_slot(good_state, change, names):
    bank, good = good_state
    key = next(iter(good))
    before = {k: v.clone() for k, v in bank.slot_state(1).items()}
    state, _ = parse_adapter(_config(), save({**good, key: change(good[key])}), 8)
    with pytest.raises(ValueError, match=names):
        bank.load_slot(1, state)
    assert all(torch.equal(bank.slot_state(1)[k], v) for k, v in before.items())
