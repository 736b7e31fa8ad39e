"""One row's token choice (`peftu.inference.sampling`): bias, penalties, log-probabilities, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from peftu.inference.sampling import Picker, Sampling, pick_batch

LOGITS = torch.tensor([3.0, 2.5, 1.0, -1.0])


def test_logit_bias_forces_or_bans_a_token():
    assert Picker(Sampling(logit_bias={3: 100.0})).pick(LOGITS).token == 3
    assert Picker(Sampling(logit_bias={0: -100.0})).pick(LOGITS).token == 1


def test_frequency_penalty_grows_with_each_repeat_and_presence_penalty_does_not():
    frequent = Picker(Sampling(frequency_penalty=0.4))
    assert [frequent.pick(LOGITS).token for _ in range(3)] == [0, 0, 1]  # 3.0-0.4 > 2.5; 3.0-0.8 < 2.5
    present = Picker(Sampling(presence_penalty=0.4))
    assert [present.pick(LOGITS).token for _ in range(3)] == [0, 0, 0]
    strong = Picker(Sampling(presence_penalty=1.0))
    assert [strong.pick(LOGITS).token for _ in range(2)] == [0, 1]


def test_logprobs_are_the_models_own_with_the_top_alternatives():
    picked = Picker(Sampling(logprobs=2, logit_bias={2: 50.0})).pick(LOGITS)
    logp = torch.log_softmax(LOGITS, -1)
    assert picked.token == 2 and math.isclose(picked.logprob, float(logp[2]), rel_tol=1e-6)  # before the bias
    assert [t for t, _ in picked.top] == [0, 1]
    assert Picker(Sampling(logprobs=0)).pick(LOGITS).top == []
    assert Picker(Sampling()).pick(LOGITS).logprob is None


def test_a_seeded_row_samples_the_same_alone_or_beside_others():
    def run(rows: int) -> list[int]:
        pickers = [Picker(Sampling(temperature=1.0, seed=7))] + [Picker(Sampling(temperature=1.0))
                                                                  for _ in range(rows - 1)]
        logits = LOGITS.repeat(rows, 1)
        return [pick_batch(logits, pickers)[0].token for _ in range(20)]

    alone = run(1)
    assert run(5) == alone and len(set(alone)) > 1


def test_rows_adjusted_together_pick_what_each_picks_alone():
    """Bias and penalties are added for all rows at once: each row's tokens are still its own, step by step."""
    gen = torch.Generator().manual_seed(0)
    steps = torch.randn(12, 6, 50, generator=gen)
    samplings = [Sampling(), Sampling(logit_bias={3: 5.0, 7: -100.0}), Sampling(frequency_penalty=0.8),
                 Sampling(presence_penalty=0.5, logit_bias={3: 2.0}, logprobs=1),
                 Sampling(temperature=0.8, seed=3, frequency_penalty=0.5, logit_bias={1: 1.0}),
                 Sampling(logit_bias={5: 100.0})]
    crowd = [Picker(s) for s in samplings]
    together = [[p.token for p in pick_batch(logits, crowd)] for logits in steps]
    for i, sampling in enumerate(samplings):
        alone = Picker(sampling)
        assert [alone.pick(logits[i]).token for logits in steps] == [row[i] for row in together]
    assert all(row[5] == 5 for row in together) and all(row[1] != 7 for row in together)
    frequent = [row[2] for row in together]
    assert len(set(frequent)) > 1  # the penalty moved it off its first choice


def test_echo_reads_each_prompt_token_from_the_logits_before_it(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftu.inference.echo import PromptRow, prompt_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    ids = tok("the lamp was great")["input_ids"]
    long, short = prompt_logprobs(model, None, tok, [PromptRow(ids, 0, top=2), PromptRow(ids[:3], 0)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert [p.token for p in long] == [t for t in ids if t not in tok.all_special_ids] == ids  # no BOS here
    assert long[0].logprob is None and long[0].top == []  # nothing before the first token
    for t, p in enumerate(long[1:], start=1):
        assert math.isclose(p.logprob, float(logp[t - 1, ids[t]]), rel_tol=1e-4, abs_tol=1e-5)
        assert [tok_id for tok_id, _ in p.top] == logp[t - 1].topk(2).indices.tolist()
    assert [p.logprob for p in short[1:]] == pytest.approx([p.logprob for p in long[1:3]], abs=1e-5)  # padding is inert
