"""Continuous batching: rows join and leave between decode steps, and every answer stays the user's own.

The running batch (`peftu.inference.running`) is driven step by step, so "arrives at
step k" is exact; the scheduler (`peftu.serving.scheduler`) is driven through its
job queue from an event loop, each arrival triggered by a signal (a piece streamed,
a job done), never by a sleep.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from peftu.data.synthetic import TASKS
from peftu.errors import PeftuError
from peftu.inference.generate import BASE_SLOT, GenRow, ScoreRow, generate_batch, score_batch
from peftu.inference.kv import KVSlots, packed_forward, use_packed_attention
from peftu.inference.running import RunningBatch
from peftu.inference.sampling import Sampling
from peftu.model.encode import encode
from peftu.serving.batcher import Overloaded
from peftu.serving.metrics import Metrics
from peftu.serving.scheduler import Scheduler

PROMPTS = ["Review: the lamp was great and the shade kept its colour for years. Sentiment:", "Review: bad",
           "Review: the chair broke. Sentiment:", "A headline:"]


def _greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0)


def _drive(batch: RunningBatch, arrivals: dict[int, list[GenRow]]) -> list:
    """Step the batch; at step k the rows `arrivals[k]` join. The states of all rows, in arrival order."""
    states, step = [], 0
    while batch.rows or any(k >= step for k in arrivals):
        states += batch.add(arrivals.get(step, []))
        if batch.rows:
            batch.step()
        step += 1
    return states


def test_a_packed_forward_gives_every_row_the_logits_of_its_own_forward(bank_with_users):
    """Rows of three users in one sequence: two reading prompts of different lengths, then those two
    decoding a token each beside a third reading its prompt. Each row's logits are what its own
    tokens alone, on its own adapter, give in a plain forward without a cache."""
    model, tok, bank, _ = bank_with_users
    use_packed_attention(model)
    (a, b, c), slots = [tok(p)["input_ids"] for p in PROMPTS[:3]], [1, 2, BASE_SLOT]

    def alone(ids: list[int], slot: int) -> torch.Tensor:
        with torch.no_grad(), bank.rows(slot):
            return model(torch.tensor([ids])).logits[0, -1]

    def packed(kv: KVSlots, parts: list[tuple[int, list[list[int]]]], row_slots: list[int]) -> torch.Tensor:
        ids, runs = [], []
        for _, rows in parts:
            for r, slot in zip(rows, row_slots[len(runs):]):
                runs.append((len(ids), len(ids) + len(r), slot))
                ids += r
        with torch.no_grad(), bank.rows(torch.tensor([], dtype=torch.long), runs=runs):
            return packed_forward(model, kv, [(first, [len(r) for r in rows]) for first, rows in parts],
                                  input_ids=torch.tensor([ids]))

    kv = KVSlots()
    kv.add([len(a) + 1, len(b) + 1])
    first = packed(kv, [(0, [a, b])], slots[:2])
    assert len(a) != len(b)  # the two rows' attention is padded, their sequence is not
    for logits, ids, slot in zip(first, (a, b), slots):
        torch.testing.assert_close(logits, alone(ids, slot), atol=1e-4, rtol=0)
    kv.add([len(c)])
    next_a, next_b = (int(x) for x in first.argmax(-1))
    second = packed(kv, [(0, [[next_a], [next_b]]), (2, [c])], slots)
    for logits, ids, slot in zip(second, (a + [next_a], b + [next_b], c), slots):
        torch.testing.assert_close(logits, alone(ids, slot), atol=1e-4, rtol=0)
    assert kv.lengths == [len(a) + 1, len(b) + 1, len(c)]


def test_kv_slots_keep_moves_rows_whole_even_round_a_cycle():
    """Rows leave and regroup (slots 2 and 0 trade places: a cycle; slot 1 leaves; slot 3 fills a hole):
    every row's written columns arrive in its new slot unchanged, and its length and need go with it."""
    kv = KVSlots(slots=4)
    kv.add([8, 8, 8, 8])
    layer = kv.layer(0)
    layer.init(torch.zeros(1, 2, 1, 3), *kv.capacity)
    kv.lengths = [5, 3, 4, 2]
    for slot, n in enumerate(kv.lengths):
        layer.keys[slot, :, :n] = slot + 1.0
        layer.values[slot, :, :n] = -(slot + 1.0)
    order = kv.keep([[2], [0, 3]])
    assert order[0] == 2 and sorted(order[1:]) == [0, 3]
    assert kv.lengths == [4] + [[5, 3, 4, 2][i] for i in order[1:]]
    for slot, src in enumerate(order):
        n = [5, 3, 4, 2][src]
        assert torch.equal(layer.keys[slot, :, :n], torch.full((2, n, 3), src + 1.0))
        assert torch.equal(layer.values[slot, :, :n], torch.full((2, n, 3), -(src + 1.0)))


def test_kv_slots_stay_within_the_budget_as_rows_of_other_widths_come_and_go():
    """With a budget the allocation (slots x width) never passes it, a row that would push it past
    is refused, and the rows already written keep their columns when the slots are reallocated."""
    kv = KVSlots(slots=8, budget=256)
    kv.add([40])
    layer = kv.layer(0)
    layer.init(torch.zeros(1, 1, 1, 1), *kv.capacity)
    layer.keys[0, :, :30], kv.lengths[0] = 7.0, 30
    assert kv.allocated <= 256
    assert kv.fits([100]) and not kv.fits([100, 100])  # 3 rows x 100 columns > 256
    kv.add([100])  # wider slots, fewer of them: the first row's columns move along
    assert kv.capacity[1] >= 100 and kv.allocated <= 256
    assert torch.equal(layer.keys[0, :, :30], torch.full((1, 30, 1), 7.0))
    with pytest.raises(ValueError, match="budget of 256 tokens"):
        kv.add([100])
    kv.keep([[0]])  # the wide row leaves: narrow rows may fill the budget again
    kv.add([40] * 5)
    assert kv.rows == 6 and kv.allocated <= 256
    assert torch.equal(layer.keys[0, :, :30], torch.full((1, 30, 1), 7.0))


def test_staggered_rows_of_different_users_each_equal_that_users_peft_generate(bank_with_users, reference):
    """Different users, prompt lengths (one read in chunks of 4 tokens) and token budgets, arriving at
    steps 0, 2, 3 and 5: each answer is that user's adapter under plain PEFT `generate`, token for token."""
    model, tok, bank, _ = bank_with_users
    slots, budgets, at = [1, 2, 3, BASE_SLOT], [12, 3, 8, 5], [0, 2, 3, 5]
    rows = [GenRow(tok(p)["input_ids"], s, _greedy(n)) for p, s, n in zip(PROMPTS, slots, budgets)]
    arrivals: dict[int, list[GenRow]] = {}
    for row, k in zip(rows, at):
        arrivals.setdefault(k, []).append(row)
    batch = RunningBatch(model, bank, tok, chunk=4)
    states = _drive(batch, arrivals)
    assert batch.kv_tokens == 0  # every row left and took its memory with it
    for prompt, slot, n, state in zip(PROMPTS, slots, budgets, states):
        ref = reference(slot)
        ids = tok(prompt, return_tensors="pt")
        out = ref.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        want = out[0, ids["input_ids"].shape[1]:].tolist()
        assert [p.token for p in state.result.picked] == want, slot
        if slot != BASE_SLOT:
            ref.unload()
    assert len({s.result.text for s in states}) > 1


def test_prefill_chunks_and_a_soft_token_row_give_the_tokens_of_one_static_batch(bank_with_users):
    """Chunked prefill (1, 3 tokens a step) and a PPlug-style row with soft tokens after its prompt, joining a
    running batch late, write what each row writes alone in a static batch."""
    model, tok, bank, _ = bank_with_users
    soft = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5

    def rows() -> list[GenRow]:
        return [GenRow(tok(PROMPTS[0])["input_ids"], 1, _greedy(10)),
                GenRow(tok(PROMPTS[2])["input_ids"], BASE_SLOT, _greedy(6), soft=soft),
                GenRow(tok(PROMPTS[1])["input_ids"], 2, _greedy(7), soft=soft)]

    alone = [generate_batch(model, bank, tok, [row])[0] for row in rows()]
    assert alone[1].text != generate_batch(model, bank, tok, [GenRow(rows()[1].prompt_ids, BASE_SLOT,
                                                                     _greedy(6))])[0].text  # soft tokens count
    for chunk in (1, 3):
        a, b, c = rows()
        states = _drive(RunningBatch(model, bank, tok, chunk=chunk), {0: [a], 4: [b, c]})
        assert [s.result.picked for s in states] == [r.picked for r in alone], chunk


def test_a_seeded_sample_is_the_same_alone_or_in_a_crowd(bank_with_users):
    model, tok, bank, _ = bank_with_users

    def seeded() -> GenRow:
        return GenRow(tok(PROMPTS[2])["input_ids"], 3, Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=11))

    alone = _drive(RunningBatch(model, bank, tok), {0: [seeded()]})[0].result
    crowd = {0: [GenRow(tok(PROMPTS[0])["input_ids"], 1, Sampling(max_tokens=12, temperature=1.0, seed=3))],
             2: [GenRow(tok(PROMPTS[1])["input_ids"], 2, _greedy(4)), seeded()],
             3: [GenRow(tok(PROMPTS[3])["input_ids"], BASE_SLOT, Sampling(max_tokens=6, temperature=0.7, seed=3))]}
    crowded = _drive(RunningBatch(model, bank, tok, chunk=2), crowd)[2].result
    assert crowded.text == alone.text and crowded.tokens == alone.tokens


# --- the scheduler ---------------------------------------------------------------------------------


def _endless(tok, n: int = 200) -> Sampling:
    """Greedy, never EOS: a row that runs its whole budget."""
    return Sampling(max_tokens=n, temperature=0.0, logit_bias={tok.eos_token_id: -1e4})


def _scheduler(bank_with_users, **kw) -> Scheduler:
    model, tok, bank, _ = bank_with_users
    args = {"max_batch": 8, "kv_budget_tokens": 4096, "max_waiting": 64, "prefill_chunk_tokens": 4} | kw
    return Scheduler(model, bank, tok, metrics=Metrics(), **args)


def _first_piece(row: GenRow) -> tuple[GenRow, asyncio.Event]:
    """The row, and an event set when its first piece arrives (emit runs in the scheduler's thread)."""
    loop, started = asyncio.get_running_loop(), asyncio.Event()
    row.emit = lambda piece: loop.call_soon_threadsafe(started.set)
    return row, started


def test_scheduled_requests_arriving_while_others_run_get_their_users_answers(bank_with_users):
    """Through the scheduler's queue and thread: each request is submitted once the one before it has
    streamed its first piece, and each answer is the one its row gives alone."""
    model, tok, bank, _ = bank_with_users
    scheduler = _scheduler(bank_with_users)
    specs = [(PROMPTS[0], 1, 14), (PROMPTS[1], 2, 3), (PROMPTS[2], 3, 9), (PROMPTS[3], BASE_SLOT, 6)]
    alone = [generate_batch(model, bank, tok, [GenRow(tok(p)["input_ids"], s, _greedy(n))])[0].text
             for p, s, n in specs]

    async def main() -> list[str]:
        tasks = []
        for prompt, slot, n in specs:
            row, started = _first_piece(GenRow(tok(prompt)["input_ids"], slot, _greedy(n)))
            tasks.append(asyncio.create_task(scheduler.submit("generate", slot, row)))
            await asyncio.wait({asyncio.create_task(started.wait()), tasks[-1]}, return_when=asyncio.FIRST_COMPLETED)
        return [r.text for r in await asyncio.gather(*tasks)]

    assert asyncio.run(main()) == alone
    assert scheduler.batch.rows == 0 and scheduler.batch.kv.tokens == 0
    scheduler.close()


def test_a_score_is_answered_while_a_long_generation_runs_and_a_cancelled_row_frees_its_kv(bank_with_users):
    model, tok, bank, _ = bank_with_users
    scheduler = _scheduler(bank_with_users)
    spec = TASKS["synth-cls"]
    score_row = ScoreRow([encode(tok, spec, "the kettle is fine", label, 128) for label in spec.labels], 2)
    expected = score_batch(model, bank, tok, [score_row])[0]

    def kv() -> float:
        return scheduler.metrics.registry.get_sample_value("peftu_kv_tokens")

    async def main():
        row, started = _first_piece(GenRow(tok(PROMPTS[0])["input_ids"], 1, _endless(tok)))
        gone = asyncio.Event()
        job = scheduler.enqueue("generate", 1, row, done=gone.set)
        waiter = asyncio.create_task(scheduler.wait(job))
        await started.wait()
        scores = await scheduler.submit("score", 2, score_row)
        running = not job.future.done() and scheduler.batch.rows == 1 and kv() > 0
        waiter.cancel()  # the caller goes away: its row stops at the next step
        await gone.wait()
        return scores, running, await job.future

    scores, running, result = asyncio.run(main())
    assert running and scores == pytest.approx(expected, abs=1e-5)
    assert result.finish_reason == "cancelled" and result.tokens < 200
    sample = scheduler.metrics.registry.get_sample_value
    assert sample("peftu_cancelled_requests_total") == 1 and sample("peftu_cancelled_tokens_total") == result.tokens
    assert scheduler.batch.kv_tokens == 0 and kv() == 0
    scheduler.close()


def test_the_kv_budget_and_the_queue_bound_are_kept(bank_with_users):
    """A budget for one long row: the next waits (first come, first served) and the one after it finds the
    queue (max_waiting 1) full; a request that could never fit is refused with a message."""
    model, tok, bank, _ = bank_with_users
    prompt = tok(PROMPTS[1])["input_ids"]
    one = len(prompt) + 60
    scheduler = _scheduler(bank_with_users, kv_budget_tokens=one + 10, max_waiting=1)
    rows_seen: list[int] = []
    step = scheduler.batch.step
    scheduler.batch.step = lambda: rows_seen.append(scheduler.batch.rows) or step()

    async def main():
        first, started = _first_piece(GenRow(prompt, 1, _endless(tok, 60)))
        a = asyncio.create_task(scheduler.submit("generate", 1, first))
        await started.wait()
        b = asyncio.create_task(scheduler.submit("generate", 2, GenRow(prompt, 2, _endless(tok, 20))))
        await asyncio.sleep(0)  # b is queued (its task ran up to its wait)
        with pytest.raises(Overloaded, match="queue is full"):
            await scheduler.submit("generate", 3, GenRow(prompt, 3, _greedy(2)))
        with pytest.raises(PeftuError, match="kv_budget_tokens"):
            await scheduler.submit("generate", 3, GenRow(prompt, 3, _greedy(one + 10)))
        return await a, await b

    a, b = asyncio.run(main())
    assert (a.tokens, b.tokens) == (60, 20) and max(rows_seen) == 1
    scheduler.close()


def test_the_kv_memory_allocated_stays_within_the_budget_over_a_mixed_run(bank_with_users):
    """Rows of mixed prompt lengths and token budgets, more than the budget holds at once: at every step the
    slots allocated (and the gauge that reports them) stay within the budget, several rows still share the
    steps, and every answer is the one its row gives alone although the slots were reallocated between."""
    model, tok, bank, _ = bank_with_users
    specs = [(PROMPTS[i % 4], [1, 2, 3, BASE_SLOT][i % 4], n) for i, n in enumerate([30, 2, 12, 5, 40, 3, 20])]
    rows = [GenRow(tok(p)["input_ids"], s, _greedy(n)) for p, s, n in specs]
    alone = [generate_batch(model, bank, tok, [row])[0].text for row in rows]
    budget = 160
    scheduler = _scheduler(bank_with_users, kv_budget_tokens=budget)
    seen: list[tuple[int, int]] = []
    step = scheduler.batch.step
    scheduler.batch.step = lambda: seen.append((scheduler.batch.rows, scheduler.batch.kv.allocated)) or step()
    gauge = scheduler.metrics.kv_allocated
    set_gauge = gauge.set
    gauge_values: list[float] = []
    gauge.set = lambda v: gauge_values.append(v) or set_gauge(v)

    async def main() -> list[str]:
        return [r.text for r in await asyncio.gather(*(scheduler.submit("generate", r.slot, r) for r in rows))]

    assert asyncio.run(main()) == alone
    assert max(rows for rows, _ in seen) > 1 and max(a for _, a in seen) <= budget
    assert gauge_values and max(gauge_values) <= budget and max(gauge_values) > 0
    assert max(rows for rows, _ in seen) < len(rows)  # the budget held some back (max_batch would not)
    scheduler.close()


def test_a_request_of_several_rows_is_admitted_whole_or_refused_whole(bank_with_users):
    """Two requests of 3 rows each and a queue of 3, with an await before each row is queued (an adapter
    load): the first holds its places and all its rows are answered; the second is refused at once, before
    any of its rows is queued, instead of both splitting the queue and both failing part way."""
    _, tok, _, _ = bank_with_users
    prompt = tok(PROMPTS[1])["input_ids"]
    scheduler = _scheduler(bank_with_users, max_batch=1, max_waiting=3)

    async def request(seats, slot: int) -> list:
        async def row():
            await asyncio.sleep(0)  # the rows of another request may be queued meanwhile
            return await scheduler.submit("generate", slot, GenRow(prompt, slot, _greedy(3)), seats=seats)
        return await asyncio.gather(*(row() for _ in range(3)))

    async def main():
        first, started = _first_piece(GenRow(prompt, 1, _endless(tok, 40)))
        running = asyncio.create_task(scheduler.submit("generate", 1, first))
        await started.wait()  # one row runs, nothing leaves the queue before it ends
        with scheduler.hold(3) as seats:
            answered = asyncio.create_task(request(seats, 2))
            with pytest.raises(Overloaded, match="queue is full"):
                scheduler.hold(3).__enter__()
            with pytest.raises(Overloaded, match="queue is full"):  # the held places count as taken
                await scheduler.submit("generate", 3, GenRow(prompt, 3, _greedy(2)))
            results = await answered
        with scheduler.hold(2):  # places held and never used are given back
            pass
        assert scheduler._held == 0
        return await running, results

    running, results = asyncio.run(main())
    assert running.tokens == 40 and [r.tokens for r in results] == [3, 3, 3]
    scheduler.close()
