"""The app as the official `openai` SDK speaks to it: completions and chat, plain and streamed.

One app for the module on a local Ray, over HTTP on 127.0.0.1, with random
adapters for three users in a local store. Every call goes through the SDK's
own client, so a field it sends that the server refuses, or an answer it
cannot parse, fails here.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from peftu.bench.fake_adapters import publish_random_adapters
from peftu.store import AdapterStore
from tests.faults import free_port, metric, open_request, wait_for

TASK = "synth-cls"
PROMPT = "Review: the lamp was great. Sentiment:"
USERS = ["ann", "bob", "cat"]


@pytest.fixture(scope="module")
def client(local_ray, tiny_base, tmp_path_factory):
    """An `openai.OpenAI` client of a running app (and the base's tokenizer); Serve stops at the end."""
    from ray import serve
    from transformers import AutoTokenizer

    from peftu.serving.server import PeftuServer

    uri = str(tmp_path_factory.mktemp("openai-store"))
    publish_random_adapters(AdapterStore.open(uri), TASK, USERS, tiny_base, std=0.2, seed=3)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"base": tiny_base, "store": uri, "task": TASK, "user_tokens": False, "max_tokens_limit": 256,
                  "max_choices": 6, "max_logprobs": 5, "max_batch": 4, "max_waiting": 6}
        serve.run(PeftuServer.bind(config), name="peftu", route_prefix="/")
        yield (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60),
               AutoTokenizer.from_pretrained(tiny_base))
    finally:
        serve.shutdown()


def greedy(sdk: openai.OpenAI, user: str | None = "ann", **options):
    options = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, **options}
    return sdk.completions.create(model=f"tiny-test:{user}" if user else "tiny-test", **options)


def test_completions_answer_per_user_with_usage_and_the_adapter_header(client):
    sdk, _ = client
    raw = sdk.completions.with_raw_response.create(model="tiny-test:bob", prompt=PROMPT, max_tokens=8,
                                                   temperature=0, user="end-user-7")
    answer = raw.parse()
    assert raw.headers["x-peftu-adapter"] != "none"
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and answer.object == "text_completion"
    assert 0 < answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert greedy(sdk, None).choices[0].text != choice.text or greedy(sdk, "ann").choices[0].text != choice.text


def test_a_list_of_prompts_text_or_token_ids_and_n_choices_each(client):
    sdk, tok = client
    other = "Review: the chair broke. Sentiment:"
    one = [greedy(sdk, prompt=p).choices[0].text for p in (PROMPT, other)]
    many = greedy(sdk, prompt=[PROMPT, other])
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == one
    ids = tok(PROMPT)["input_ids"]
    assert greedy(sdk, prompt=ids).choices[0].text == one[0]
    assert [c.text for c in greedy(sdk, prompt=[ids, tok(other)["input_ids"]]).choices] == one
    sampled = greedy(sdk, prompt=[PROMPT, other], n=3, temperature=1.0, seed=11)
    assert sorted(c.index for c in sampled.choices) == list(range(6))
    again = greedy(sdk, prompt=[PROMPT, other], n=3, temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded: the same again
    assert len({c.text for c in sampled.choices[:3]}) > 1  # choice j samples with seed + j
    assert many.usage.prompt_tokens == len(ids) + len(tok(other)["input_ids"])


def test_logprobs_of_completions_line_up_with_the_text(client):
    sdk, _ = client
    answer = greedy(sdk, logprobs=3).choices[0]
    lp = answer.logprobs
    assert "".join(lp.tokens) == answer.text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the likeliest token
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(answer.text) - len(lp.tokens[-1])


def test_echo_puts_the_prompt_before_the_text(client):
    sdk, _ = client
    plain = greedy(sdk).choices[0].text
    assert greedy(sdk, echo=True).choices[0].text == PROMPT + plain
    only = greedy(sdk, echo=True, max_tokens=0)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    scored = greedy(sdk, echo=True, max_tokens=0, logprobs=1).choices[0].logprobs  # how eval harnesses score
    assert "".join(scored.tokens) == PROMPT and scored.token_logprobs[0] is None
    assert all(lp <= 0 for lp in scored.token_logprobs[1:]) and scored.text_offset[0] == 0
    both = greedy(sdk, echo=True, logprobs=1).choices[0]
    assert "".join(both.logprobs.tokens) == both.text == PROMPT + plain
    n = len(scored.tokens)
    assert both.logprobs.token_logprobs[0] is None
    assert both.logprobs.token_logprobs[1:n] == pytest.approx(scored.token_logprobs[1:], abs=1e-4)


def test_logit_bias_and_penalties_change_the_tokens(client):
    sdk, tok = client
    first = greedy(sdk, logprobs=0).choices[0].logprobs.tokens[0]
    first_id = tok.convert_tokens_to_ids(tok.tokenize(first))[0] if first.strip() else None
    forced_id = tok(" yes", add_special_tokens=False)["input_ids"][0]
    forced = greedy(sdk, max_tokens=4, logit_bias={str(forced_id): 100}).choices[0]
    assert forced.text == tok.decode([forced_id] * 4)
    if first_id is not None:
        banned = greedy(sdk, logprobs=0, logit_bias={str(first_id): -100}).choices[0]
        assert banned.logprobs.tokens[0] != first
    repeated = greedy(sdk, max_tokens=4, logit_bias={str(forced_id): 5}, frequency_penalty=2.0).choices[0]
    assert repeated.text != forced.text  # the penalty grows with each repeat and overtakes the bias


def test_chat_with_max_completion_tokens_logprobs_and_stop(client):
    sdk, _ = client
    chat = sdk.chat.completions.create(model="tiny-test:cat", messages=[{"role": "user", "content": PROMPT}],
                                       max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and choice.message.role == "assistant"
    assert chat.usage.completion_tokens <= 5
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in choice.logprobs.content)
    text = choice.message.content
    if len(text) > 2:
        cut = sdk.chat.completions.create(model="tiny-test:cat", messages=[{"role": "user", "content": PROMPT}],
                                          max_completion_tokens=5, temperature=0, stop=text[1:3])
        assert cut.choices[0].message.content == text[:1] and cut.choices[0].finish_reason == "stop"
    parts = sdk.chat.completions.create(model="tiny-test:cat", temperature=0, max_tokens=5,
                                        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}])
    assert parts.choices[0].message.content == text


def test_streams_carry_every_choice_and_a_final_usage_chunk(client):
    sdk, _ = client
    whole = sdk.chat.completions.create(model="tiny-test:ann", messages=[{"role": "user", "content": PROMPT}],
                                        max_tokens=8, temperature=0)
    chunks = list(sdk.chat.completions.create(model="tiny-test:ann", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    stream = greedy(sdk, prompt=[PROMPT, "Review: bad. Sentiment:"], n=2, temperature=1.0, seed=5, stream=True)
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    unstreamed = greedy(sdk, prompt=[PROMPT, "Review: bad. Sentiment:"], n=2, temperature=1.0, seed=5)
    assert texts == {c.index: c.text for c in unstreamed.choices}


@pytest.mark.parametrize("options, field", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"store": True}, "store"),
    ({"n": 7}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"extra_body": {"temprature": 0.5}}, "temprature"),
])
def test_what_has_no_meaning_here_is_a_400_naming_the_field(client, options, field):
    sdk, _ = client
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    **options)
    assert field in e.value.message
    assert sdk.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       response_format={"type": "text"}, store=False).choices


def test_completion_fields_out_of_range_are_400s(client):
    sdk, tok = client
    for options, field in (({"logprobs": 6}, "logprobs"), ({"prompt": [len(tok) + 5]}, "prompt"),
                           ({"prompt": ""}, "prompt"),
                           ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"max_tokens": 0}, "echo"),
                           ({"logit_bias": {"abc": 1}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as e:
            greedy(sdk, **options)
        assert field in e.value.message, (options, e.value.message)


def _url(sdk: openai.OpenAI) -> str:
    return str(sdk.base_url).rstrip("/").removesuffix("/v1")


def _no_eos(tok) -> dict[str, int]:
    """A logit bias that keeps a row writing to its max_tokens (the tiny base may stop at once otherwise)."""
    return {str(tok.eos_token_id): -100}


def test_a_flood_past_the_queue_is_refused_at_once_while_the_admitted_and_a_normal_client_finish(client):
    sdk, tok = client
    patient = sdk.with_options(max_retries=8)  # the SDK waits what Retry-After says, then asks again

    def flood(i: int) -> tuple[str, object, float]:
        start = time.monotonic()
        try:
            answer = greedy(sdk, USERS[i % 3], n=6, max_tokens=128, logit_bias=_no_eos(tok))
            return "ok", len(answer.choices), time.monotonic() - start
        except openai.RateLimitError as e:
            return "refused", (e.response.headers.get("retry-after"), e.message), time.monotonic() - start

    def normal() -> tuple[str, float]:
        start = time.monotonic()
        return greedy(patient, "cat", max_tokens=2).choices[0].text, time.monotonic() - start

    with ThreadPoolExecutor(9) as pool:  # 8 requests of 6 rows at once; 4 rows run and 6 wait, so one fits
        floods = [pool.submit(flood, i) for i in range(8)]
        alongside = pool.submit(normal)
        got = [f.result() for f in floods]
    refused = [(detail, took) for kind, detail, took in got if kind == "refused"]
    admitted = [(n, took) for kind, n, took in got if kind == "ok"]
    assert refused and admitted
    assert all(after == "1" and "queue is full" in message for (after, message), _ in refused)
    assert all(n == 6 for n, _ in admitted)  # a request is answered whole or refused whole
    # Refused at once, not after a wait in the queue: 6 rows need two rounds of a batch of 4, so the slowest
    # admitted request waited a whole round; a refusal that had queued would come back after it.
    assert max(took for _, took in refused) < max(took for _, took in admitted), (refused, admitted)
    text, took = alongside.result()  # admitted, at once or after a Retry-After, and answered
    print(f"flood: {len(refused)} refused in <= {max(t for _, t in refused) * 1000:.0f} ms, {len(admitted)} "
          f"admitted in <= {max(t for _, t in admitted):.1f} s; the normal client's answer took {took:.1f} s")
    assert len(greedy(sdk, n=6).choices) == 6  # the refused rows left nothing behind


def _tokens_written(url: str) -> float:
    """Tokens the replica has written so far: every token is one first-token or one inter-token observation."""
    return (metric(url, "peftu_time_to_first_token_seconds_count")
            + metric(url, "peftu_inter_token_latency_seconds_count"))


def test_abandoned_non_streamed_requests_stop_consuming_steps(client):
    """Clients that hang up on a plain (non-streamed) completion: their rows leave the batch soon after, counted
    as cancelled with the tokens they wrote, none running to its limit, and the replica goes idle."""
    sdk, tok = client
    url, limit = _url(sdk), 256
    cancelled, written = metric(url, "peftu_cancelled_requests_total"), metric(url, "peftu_cancelled_tokens_total")
    start = _tokens_written(url)
    conns = [open_request(url, {"model": f"tiny-test:{u}", "prompt": PROMPT, "max_tokens": limit,
                                "temperature": 0, "logit_bias": _no_eos(tok)}) for u in USERS]
    try:
        wait_for(lambda: metric(url, "peftu_requests_running") >= len(USERS), "the rows to run", poll_s=0.01)
    finally:
        before = _tokens_written(url) - start  # written while they were wanted (this replica runs nothing else)
        for conn in conns:
            conn.close()
    wait_for(lambda: metric(url, "peftu_cancelled_requests_total") - cancelled >= len(USERS), "the cancellations")
    wait_for(lambda: metric(url, "peftu_requests_running") == 0, "the batch to empty")
    assert metric(url, "peftu_cancelled_requests_total") - cancelled == len(USERS)
    tokens = metric(url, "peftu_cancelled_tokens_total") - written
    after, left = tokens - before, len(USERS) * limit - before
    print(f"abandoned: {before:.0f} tokens written before the hang-up, {after:.0f} after it of {left:.0f} left")
    assert before <= tokens < len(USERS) * limit, f"the abandoned rows wrote {tokens} tokens of {len(USERS) * limit}"
    assert after < left / 2, f"the abandoned rows wrote {after} of the {left} tokens they had left after the hang-up"
    assert greedy(sdk, max_tokens=2).choices[0].text is not None
