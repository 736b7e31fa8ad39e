"""The reference fit: masking, determinism, publishing, resume, and that it personalizes."""

from __future__ import annotations

import statistics
import tempfile

import pytest
import torch
from peft import PeftModel

from peftu.config import LoraHParams
from peftu.data.schema import Example, UserRecord
from peftu.data.synthetic import TASKS, generate
from peftu.evaluation.evaluate import evaluate_adapters, evaluate_users
from peftu.evaluation.metrics import macro_average
from peftu.fitting.reference import adapter_files, fit_adapter, fit_users
from peftu.inference.predict import score_labels
from peftu.model.base import base_fingerprint, load_base
from peftu.model.encode import IGNORE, collate, encode, minibatches
from peftu.store import AdapterStore

CLS = TASKS["synth-cls"]
FAST = LoraHParams(epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_only_answer_tokens_carry_labels(base):
    _, tok = base
    ids, n_prompt = encode(tok, CLS, "my friend wrote about the goal", "dislike", max_len=64)
    batch = collate([(ids, n_prompt), encode(tok, CLS, "x", "like", 64)], tok.pad_token_id)
    labels = batch["labels"][0]
    kept = labels[labels != IGNORE].tolist()
    assert tok.decode(kept) == " dislike" + tok.eos_token
    assert (labels[:n_prompt] == IGNORE).all()
    # The shorter row is padded, masked and unlabelled.
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE).all()


def test_long_prompts_lose_their_beginning_not_the_answer(base):
    _, tok = base
    ids, n_prompt = encode(tok, CLS, "word " * 500, "like", max_len=32)
    assert len(ids) == 32
    assert tok.decode(ids[n_prompt:]) == " like" + tok.eos_token


def test_minibatches_cover_every_example_each_epoch():
    batches = minibatches(10, 4, seed=1, epochs=2)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == list(range(10))
    assert batches[:3] != batches[3:]
    assert minibatches(10, 4, seed=1, epochs=2) == batches


def test_fit_learns_a_users_label_and_is_deterministic(base):
    model, tok = base
    _, users, _ = generate("synth-cls", 30, seed=3)
    inputs = [e.input for u in users for e in u.train][:60]
    examples = [Example(str(i), text, "dislike") for i, text in enumerate(inputs[:32])]
    hp = LoraHParams(epochs=3, batch_size=8, seed=7)

    fitted, result = fit_adapter(model, tok, CLS, examples, hp)
    assert result.steps == 12 and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0] / 2
    preds = score_labels(fitted, tok, CLS, inputs[32:])
    assert preds.count("dislike") / len(preds) > 0.9
    first = _lora_state(fitted)
    model = fitted.unload()

    again, _ = fit_adapter(model, tok, CLS, examples, hp)
    assert all(torch.equal(first[k], v) for k, v in _lora_state(again).items())
    model = again.unload()
    other, _ = fit_adapter(model, tok, CLS, examples, hp.model_copy(update={"seed": 8}))
    assert not all(torch.equal(first[k], v) for k, v in _lora_state(other).items())
    other.unload()


def test_published_adapter_loads_with_peft_and_gives_the_same_logits(base, tiny_base, tmp_path):
    model, tok = base
    _, users, _ = generate("synth-rating", 3, seed=0)
    fitted, _ = fit_adapter(model, tok, TASKS["synth-rating"], users[0].train, FAST)
    batch = collate([encode(tok, TASKS["synth-rating"], "the lamp was good", "4", 64)], tok.pad_token_id)
    with torch.no_grad():
        expected = fitted(input_ids=batch["input_ids"]).logits
    store = AdapterStore.open(str(tmp_path / "store"))
    store.publish("synth-rating", "alice", adapter_files(fitted), base_fingerprint="b",
                  data_fingerprint="d", hparams=FAST.model_dump())
    fitted.unload()

    fresh, _ = load_base(tiny_base)
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=batch["input_ids"]).logits, expected)
    with tempfile.TemporaryDirectory() as tmp:
        store.fetch("synth-rating", "alice", dest=tmp, expect_base="b")
        loaded = PeftModel.from_pretrained(fresh, tmp)
        with torch.no_grad():
            got = loaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected)


def test_fit_users_publishes_once_resumes_and_records_failures(base, tiny_base, tmp_path):
    model, tok = base
    _, users, _ = generate("synth-cls", 3, seed=1)
    users.append(UserRecord("empty", val=[Example("1", "x", "like")], test=[Example("2", "y", "like")]))
    store = AdapterStore.open(str(tmp_path / "store"))
    fp = base_fingerprint(tiny_base)

    summary = fit_users(model, tok, CLS, users, FAST, store, base_fp=fp, progress=False)
    assert sorted(summary.fitted) == sorted(u.user_id for u in users[:3])
    assert list(summary.failed) == ["empty"] and "zero examples" in summary.failed["empty"]
    assert store.list_users("synth-cls") == sorted(u.user_id for u in users[:3])
    manifest = store.manifest("synth-cls", users[0].user_id)
    assert manifest.base_fingerprint == fp
    assert {"val_accuracy", "test_accuracy", "test_f1"} <= set(manifest.metrics)

    again = fit_users(model, tok, CLS, users[:3], FAST, store, base_fp=fp, progress=False)
    assert again.fitted == [] and len(again.skipped) == 3
    changed = fit_users(model, tok, CLS, users[:1], FAST.model_copy(update={"lr": 1e-3}), store,
                        base_fp=fp, progress=False)
    assert changed.fitted == [users[0].user_id]
    assert len(store.list_versions("synth-cls", users[0].user_id)) == 2
    # The base is untouched after all those fits: no LoRA layer is left in it.
    assert not any("lora" in name for name, _ in model.named_modules())


def test_per_user_adapters_beat_the_base_on_ratings(base, tiny_base, tmp_path):
    """The point of the product: a user's own adapter knows how that user rates."""
    model, tok = base
    spec, users, _ = generate("synth-rating", 40, seed=11)
    users = sorted(users, key=lambda u: -len(u.train))[:5]
    store = AdapterStore.open(str(tmp_path / "store"))
    fp = base_fingerprint(tiny_base)
    fit_users(model, tok, spec, users, LoraHParams(), store, base_fp=fp, progress=False)
    base_mae = macro_average(evaluate_users(model, tok, spec, users), users)["all"]["mae"]
    per_user, without = evaluate_adapters(model, tok, spec, users, store, base_fp=fp, progress=False)
    own_mae = statistics.mean(m["mae"] for m in per_user.values())
    assert without == []
    assert own_mae < base_mae
