"""The adapter bank: exactly K separate PEFT fits, and PEFT-format in and out.

Exactness is checked in float64. In float32 the reference PEFT fit does not
even agree with itself to 1e-4 when only its padding width changes (Adam's
first steps divide tiny gradients by their own size, so rounding noise of
1e-7 grows to 1e-2 in some B entries), so fp32 is checked on the losses.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from peftu.bank import AdapterBank, SlotAdamW, peft_initial_state
from peftu.config import LoraHParams
from peftu.data.schema import Example, UserRecord
from peftu.data.synthetic import TASKS, generate
from peftu.fitting.banked import PackTrainer, fit_pack, fit_stream, largest_first, slot_count
from peftu.fitting.reference import fit_adapter
from peftu.model.base import load_base
from peftu.model.encode import collate, encode
from peftu.model.lora import lora_config

RATING = TASKS["synth-rating"]
ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(tiny_base)


def _users(sizes: list[int]) -> list[UserRecord]:
    """Users with exactly these numbers of training examples (different data sizes)."""
    _, users, _ = generate("synth-rating", 60, seed=21)
    pool = sorted(users, key=lambda u: -len(u.train))
    return [UserRecord(f"user{i}", train=pool[i].train[:n], test=pool[i].test) for i, n in enumerate(sizes)]


def _reference(model, tok, users, hp):
    """Each user fitted alone with plain PEFT: weights (PEFT keys) and per-step losses."""
    out = {}
    for u in users:
        fitted, result = fit_adapter(model, tok, RATING, u.train, hp)
        weights = {k.replace(".default", ""): v.detach().clone() for k, v in fitted.state_dict().items()
                   if "lora_" in k}
        out[u.user_id] = (weights, result.losses)
        fitted.unload()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_banked_fit_equals_separate_peft_fits_in_float64(base):
    model, tok = base
    model = model.double()
    try:
        users = _users([5, 13, 22, 9])  # 2, 4, 6 and 3 batches an epoch: slots go idle at different steps
        hp = LoraHParams(r=4, alpha=8, epochs=2, batch_size=4, lr=2e-2, weight_decay=0.05,
                         max_grad_norm=0.3, schedule="linear", target_modules=["q_proj", "v_proj", "down_proj"])
        reference = _reference(model, tok, users, hp)
        packed = fit_pack(model, tok, RATING, users, hp)
        for slot, u in enumerate(users):
            ref_weights, ref_losses = reference[u.user_id]
            got = packed.bank.slot_state(slot)
            assert got.keys() == ref_weights.keys()
            for key, value in got.items():
                assert _rel(value, ref_weights[key]) < 1e-4, (u.user_id, key)
            losses = packed.results[u.user_id].losses
            assert len(losses) == len(ref_losses) == packed.results[u.user_id].steps
            assert losses == pytest.approx(ref_losses, rel=1e-4)
        packed.bank.remove()
    finally:
        model.float()


def test_users_streaming_through_fewer_slots_equal_separate_peft_fits_in_float64(base):
    """Five users through two slots: a finished user's slot is taken over by the next user
    mid-run, with fresh weights and optimizer state, and every adapter is still its own fit."""
    model, tok = base
    model = model.double()
    try:
        users = largest_first(_users([14, 5, 9, 3, 7]))
        hp = LoraHParams(r=4, alpha=8, epochs=2, batch_size=4, lr=2e-2, weight_decay=0.05,
                         max_grad_norm=0.3, schedule="linear", target_modules=["q_proj", "v_proj"])
        reference = _reference(model, tok, users, hp)
        init_state = peft_initial_state(model, lora_config(hp), hp.seed)
        trainer = PackTrainer(model, 2, hp)
        done: list[tuple[int, str, dict[str, torch.Tensor]]] = []

        def keep(slot, user, result):
            done.append((slot, user.user_id, trainer.bank.slot_state(slot)))

        results, steps = fit_stream(model, tok, RATING, users, hp, trainer, init_state, on_user_done=keep)
        trainer.bank.remove()
        assert sorted(u for _, u, _ in done) == sorted(u.user_id for u in users)
        assert {slot for slot, _, _ in done} == {0, 1}
        # 4+2+3+1+2 batches an epoch, 2 epochs: 48 slot-steps on 2 slots, never more than needed
        assert steps < sum(results[u.user_id].steps for u in users)
        for _, user_id, got in done:
            ref_weights, ref_losses = reference[user_id]
            for key, value in got.items():
                assert _rel(value, ref_weights[key]) < 1e-4, (user_id, key)
            assert results[user_id].losses == pytest.approx(ref_losses, rel=1e-4)
    finally:
        model.float()


def test_banked_fit_matches_losses_in_float32(base):
    model, tok = base
    users = _users([7, 16])
    hp = LoraHParams(epochs=1, batch_size=4, lr=1e-3)
    reference = _reference(model, tok, users, hp)
    packed = fit_pack(model, tok, RATING, users, hp)
    for u in users:
        assert packed.results[u.user_id].losses == pytest.approx(reference[u.user_id][1], rel=1e-4)
    packed.bank.remove()


def test_an_idle_slot_is_not_stepped():
    a = torch.nn.Parameter(torch.ones(3, 2, 4))
    opt = SlotAdamW([a], 3, lr=0.1, weight_decay=0.5, max_grad_norm=1.0)
    a.grad = torch.ones_like(a)
    opt.step(torch.tensor([0, 2]))
    assert torch.equal(a[1], torch.ones(2, 4))  # no update, no weight decay
    assert opt.exp_avg[0][1].abs().sum() == 0 and opt.exp_avg_sq[0][1].abs().sum() == 0
    assert opt.steps.tolist() == [1, 0, 1]
    assert not torch.equal(a[0], torch.ones(2, 4))


def test_clipping_is_per_slot():
    a = torch.nn.Parameter(torch.zeros(2, 1, 1))
    opt = SlotAdamW([a], 2, lr=1.0, weight_decay=0.0, max_grad_norm=1.0, betas=(0.0, 0.0), eps=0.0)
    a.grad = torch.tensor([[[100.0]], [[0.5]]])
    opt.step(torch.tensor([0, 1]))
    # With beta 0 and eps 0 the update is the sign; clipping must not let slot 0's norm scale slot 1.
    assert a.detach().flatten().tolist() == pytest.approx([-1.0, -1.0])
    assert opt.exp_avg[0].flatten().tolist() == pytest.approx([1.0, 0.5], rel=1e-5)


def test_mixed_rows_equal_each_slot_alone(base):
    model, tok = base
    hp = LoraHParams(r=4, target_modules=ALL_LLAMA)
    bank = AdapterBank(model, 3, lora_config(hp))
    try:
        with torch.no_grad():
            for p in bank.parameters():
                p.normal_(0, 0.05)
        batch = collate([encode(tok, RATING, t, "3", 64) for t in ("the lamp was good", "the chair was awful",
                                                                    "the kettle was okay")], tok.pad_token_id)
        with torch.no_grad(), bank.rows([2, 0, 1]):
            mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, slot in enumerate([2, 0, 1]):
            with torch.no_grad(), bank.rows(slot):
                alone = model(input_ids=batch["input_ids"][row:row + 1],
                              attention_mask=batch["attention_mask"][row:row + 1]).logits
            n = int(batch["attention_mask"][row].sum())
            torch.testing.assert_close(mixed[row, :n], alone[0, :n], rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            plain = model(input_ids=batch["input_ids"][:1]).logits
        assert not torch.allclose(plain, mixed[:1, :plain.shape[1]], atol=1e-3)
    finally:
        bank.remove()


def _logits_agree_with_peft(model, bank, slot, folder, input_ids):
    with torch.no_grad(), bank.rows(slot):
        banked = model(input_ids=input_ids).logits
    plain = bank.remove()
    peft_model = PeftModel.from_pretrained(plain, folder)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=input_ids).logits, banked, rtol=1e-4, atol=1e-5)
    return peft_model.unload()


def test_exported_slot_loads_in_peft_with_the_same_logits(base):
    model, tok = base
    hp = LoraHParams(r=4, epochs=1, target_modules=ALL_LLAMA)
    packed = fit_pack(model, tok, RATING, _users([12, 10]), hp)
    ids = collate([encode(tok, RATING, "the jacket was superb", "5", 64)], tok.pad_token_id)["input_ids"]
    with tempfile.TemporaryDirectory() as folder:
        packed.bank.export_slot(1, folder)
        _logits_agree_with_peft(model, packed.bank, 1, folder, ids)


def test_a_peft_adapter_imports_into_a_slot(base):
    model, tok = base
    hp = LoraHParams(epochs=1, batch_size=4)
    fitted, _ = fit_adapter(model, tok, RATING, _users([8])[0].train, hp)
    ids = collate([encode(tok, RATING, "the lamp was poor", "2", 64)], tok.pad_token_id)["input_ids"]
    with torch.no_grad():
        expected = fitted(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as folder:
        fitted.save_pretrained(folder)
        plain = fitted.unload()
        bank = AdapterBank(plain, 2, lora_config(hp))
        bank.import_slot(1, folder)
        with torch.no_grad(), bank.rows(1):
            torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
        bank.remove()


def test_gpt2_fused_c_attn_is_banked_and_exports_to_peft():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hp = LoraHParams(r=4, target_modules=["c_attn"])
    bank = AdapterBank(model, 2, lora_config(hp))
    assert len(bank.layers) == 2
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.1)
    ids = torch.randint(50, (2, 7))
    with tempfile.TemporaryDirectory() as folder:
        bank.export_slot(0, folder)
        _logits_agree_with_peft(model, bank, 0, folder, ids)


def test_initial_state_is_what_peft_starts_from(base):
    model, _ = base
    hp = LoraHParams(seed=5)
    state = peft_initial_state(model, lora_config(hp), hp.seed)
    torch.manual_seed(hp.seed)
    peft_model = get_peft_model(model, lora_config(hp))
    for key, value in peft_model.state_dict().items():
        if "lora_" in key:
            assert torch.equal(value, state[key.replace(".default", "")])
    peft_model.unload()
    assert not any("lora" in n for n, _ in model.named_modules())


def test_foreign_or_malformed_adapters_are_refused(base):
    model, _ = base
    bank = AdapterBank(model, 2, lora_config(LoraHParams(r=4)))
    try:
        good = bank.slot_state(0)
        key = next(iter(good))
        with pytest.raises(ValueError, match="shape"):
            bank.load_slot(0, {**good, key: torch.zeros(3, 3)})
        with pytest.raises(KeyError, match="fits no banked layer"):
            bank.load_slot(0, {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 4)})
        with pytest.raises(KeyError, match="lacks"):
            bank.load_slot(0, dict(list(good.items())[1:]))
        with pytest.raises(IndexError):
            with bank.rows([0, 2]):
                pass
    finally:
        bank.remove()
    with pytest.raises(ValueError, match="dropout"):
        AdapterBank(model, 1, lora_config(LoraHParams(dropout=0.1)))


def test_slots_go_to_the_largest_users_first_and_the_token_budget_caps_them():
    users = [UserRecord(f"u{n}", train=[Example(str(i), "x", "y") for i in range(n)]) for n in
             (50, 3, 20, 4, 49, 21)]
    hp = LoraHParams(batch_size=8, max_len=64)
    assert [u.user_id for u in largest_first(users)] == ["u50", "u49", "u21", "u20", "u4", "u3"]
    assert slot_count(4, hp) == 4
    assert slot_count(4, hp, token_budget=8 * 64 * 3) == 3
    assert slot_count(4, hp, token_budget=10) == 1
