"""Serving parts without Ray: the slot cache, the batcher, mixed batches vs PEFT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from peft import PeftModel

from peftu.data.synthetic import TASKS
from peftu.inference.generate import BASE_SLOT, GenRow, ScoreRow, generate_batch, score_batch
from peftu.inference.sampling import Sampling
from peftu.model.base import load_base
from peftu.model.encode import encode
from peftu.serving.batcher import Batcher
from peftu.serving.cache import SlotCache

# --- the slot cache --------------------------------------------------------------


def test_cache_evicts_least_recently_used_by_count():
    cache = SlotCache([1, 2, 3], max_bytes=10**9)
    for user in "abc":
        cache.insert(user, "v1", cache.reserve(10), 10)
    cache.get("a")  # a is now the most recent; b the least
    slot = cache.reserve(10)
    assert slot is not None and "b" not in cache and cache.users() == ["c", "a"]
    assert cache.evictions == 1
    cache.insert("d", "v1", slot, 10)
    assert cache.users() == ["c", "a", "d"]


def test_cache_evicts_by_bytes_and_never_a_pinned_entry():
    cache = SlotCache(list(range(1, 10)), max_bytes=100)
    a = cache.insert("a", "v1", cache.reserve(40), 40)
    cache.insert("b", "v1", cache.reserve(40), 40)
    cache.pin(a)
    cache.reserve(50)  # 80 + 50 > 100: evicts b (a is pinned although older)
    assert cache.users() == ["a"] and cache.bytes == 90
    assert cache.reserve(20) is None  # only the pinned a could go
    with pytest.raises(ValueError, match="exceeds the cache budget"):
        cache.reserve(101)


def test_a_replaced_pinned_entry_keeps_its_slot_until_unpinned():
    cache = SlotCache([1, 2], max_bytes=100)
    old = cache.insert("a", "v1", cache.reserve(10), 10)
    cache.pin(old)
    new = cache.insert("a", "v2", cache.reserve(10), 10)
    assert new.slot != old.slot and cache.get("a") is new and old.retired
    cache.pin(new)
    assert cache.reserve(10) is None  # both slots taken: the old one is still in use
    cache.unpin(old)
    assert cache.reserve(10) == old.slot and cache.bytes == 20


# --- the batcher -----------------------------------------------------------------------


def _batches(mode: str, slots: list[int]) -> list[list[int]]:
    seen: list[list[int]] = []

    def run(kind, jobs):
        seen.append([j.slot for j in jobs])
        return [j.payload for j in jobs]

    async def main():
        batcher = Batcher(run, max_batch=8, wait_s=0.05, mode=mode)
        results = await asyncio.gather(*(batcher.submit("generate", s, i) for i, s in enumerate(slots)))
        assert results == list(range(len(slots)))

    asyncio.run(main())
    return seen


def test_mixed_batches_take_every_user_split_batches_one():
    slots = [1, 2, 3, 1, 2, 3]
    assert _batches("mixed", slots) == [slots]
    assert sorted(map(sorted, _batches("split", slots))) == [[1, 1], [2, 2], [3, 3]]


# --- mixed batches against PEFT ------------------------------------------------------------


def test_mixed_batch_scores_equal_each_users_peft_model(bank_with_users, reference):
    model, tok, bank, _ = bank_with_users
    spec = TASKS["synth-cls"]
    texts = ["the lamp was great", "the chair broke on day one", "the kettle is fine", "a plain pen"]
    slots = [3, 1, 2, BASE_SLOT]
    rows = [ScoreRow([encode(tok, spec, t, lab, 128) for lab in spec.labels], s) for t, s in zip(texts, slots)]
    mixed = score_batch(model, bank, tok, rows)
    for row, slot, got in zip(rows, slots, mixed):
        ref = reference(slot)
        expected = score_batch(ref, bank, tok, [ScoreRow(row.encoded, BASE_SLOT)])[0]
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), slot
        if slot != BASE_SLOT:
            ref.unload()
    assert mixed[0] != mixed[3]  # an adapter changes the scores


def test_mixed_greedy_generation_equals_each_users_peft_generate(bank_with_users, reference):
    model, tok, bank, _ = bank_with_users
    prompts = ["Review: the lamp was great. Sentiment:", "Review: bad", "Review: the chair broke. Sentiment:"]
    slots = [1, 2, 3]
    rows = [GenRow(tok(p)["input_ids"], s, Sampling(max_tokens=6, temperature=0.0)) for p, s in zip(prompts, slots)]
    mixed = generate_batch(model, bank, tok, rows)
    for prompt, slot, got in zip(prompts, slots, mixed):
        ref = reference(slot)
        ids = tok(prompt, return_tensors="pt")
        out = ref.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got.text == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        ref.unload()
    assert len({r.text for r in mixed}) > 1


def test_stop_strings_cut_and_streamed_pieces_add_up(bank_with_users):
    model, tok, bank, _ = bank_with_users
    prompt = tok("Review: the lamp was great. Sentiment:")["input_ids"]
    full = generate_batch(model, bank, tok, [GenRow(prompt, 1, Sampling(max_tokens=12, temperature=0.0))])[0]
    stop = full.text[len(full.text) // 2:][:2]
    pieces: list[str] = []
    row = GenRow(prompt, 1, Sampling(max_tokens=12, temperature=0.0, stop=[stop]),
                 emit=lambda piece: pieces.append(piece.text))
    cut = generate_batch(model, bank, tok, [row])[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    sampled = [GenRow(prompt, 2, Sampling(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)) for _ in range(2)]
    a, b = generate_batch(model, bank, tok, sampled)
    assert a.text == b.text and a.finish_reason in ("stop", "length")  # same seed, same sample
    tiny = GenRow(prompt, 1, Sampling(max_tokens=12, temperature=1e-40, seed=1))
    assert generate_batch(model, bank, tok, [tiny])[0].text == full.text  # as good as greedy, no NaN


@pytest.mark.parametrize("tidy", [False, True], ids=["stream", "decode-all"])
def test_streamed_text_adds_up_to_the_decoded_answer_and_never_splits_a_character(tiny_base, tidy):
    """Each token decodes only what it adds (or, for a tokenizer that tidies spaces, everything again):
    the pieces sent add up to the tokenizer's own decode, a character in several byte tokens never
    streams half written, and a stop string across tokens still cuts."""
    from transformers import AutoTokenizer

    from peftu.inference.rows import RowState
    from peftu.inference.sampling import Picked

    tok = AutoTokenizer.from_pretrained(tiny_base, clean_up_tokenization_spaces=tidy)
    text = "Review: naïve café 🙂 was great, 日本 ok. Sentiment: positive"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the accents, the emoji and the kanji take byte tokens

    def run(stop: list[str], max_tokens: int = 1000) -> tuple[list[str], object]:
        pieces: list[str] = []
        row = GenRow([1], 1, Sampling(max_tokens=max_tokens, stop=stop), emit=lambda p: pieces.append(p.text))
        state = RowState(row, tok.eos_token_id, tok)
        for token in ids + [tok.eos_token_id]:
            state.push(Picked(token))
            if state.result:
                return pieces, state.result
        raise AssertionError("the row never finished")

    pieces, result = run([])
    assert result.text == "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert result.finish_reason == "stop"
    assert not any("\ufffd" in piece for piece in pieces)
    pieces, result = run(["é 🙂"])
    assert result.text == "".join(pieces) == text[:text.index("é 🙂")]
    half = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    pieces, result = run([], max_tokens=half)  # cut mid-character: the answer shows it as U+FFFD
    assert result.text == "".join(pieces) == tok.decode(ids[:half]) and result.finish_reason == "length"


# --- the serve config ------------------------------------------------------------------------


def test_serve_config_yaml_is_valid_for_serve_and_builds_the_peftu_server():
    import yaml
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from serve.app import app

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (spec,) = config["applications"]
    assert spec["import_path"] == "serve.app:app"
    assert [d["name"] for d in spec["deployments"]] == ["PeftuServer"]
    built = call_user_app_builder_with_args_if_necessary(app, spec["args"])
    assert built._bound_deployment.name == "PeftuServer"
    with pytest.raises(ValueError, match="max_adaptors"):
        call_user_app_builder_with_args_if_necessary(app, {**spec["args"], "max_adaptors": 3})


def test_fetch_bytes_verifies_every_file(tmp_path):
    from peftu.errors import CorruptAdapterError, ForeignAdapterError
    from peftu.store import AdapterStore

    store = AdapterStore.open(str(tmp_path))
    files = {"adapter_config.json": b'{"peft_type": "LORA", "r": 2, "lora_alpha": 4}',
             "adapter_model.safetensors": b"weights"}
    m = store.publish("t", "u", files, base_fingerprint="b" * 64, data_fingerprint="d", hparams={})
    got, manifest = store.fetch_bytes("t", "u", expect_base="b" * 64)
    assert got == files and manifest.version == m.version
    with pytest.raises(ForeignAdapterError):
        store.fetch_bytes("t", "u", expect_base="c" * 64)
    store.backend.put(f"adapters/t/u/versions/{m.version}/adapter_model.safetensors", b"tampered")
    with pytest.raises(CorruptAdapterError, match="does not match"):
        store.fetch_bytes("t", "u")


def test_a_bad_adapter_is_fetched_once_until_its_pointer_moves(tiny_base, tmp_path):
    """After the TTL only the pointer is re-read: the same bad version is neither fetched nor
    counted again (a hot user would re-download it every TTL); a new version is loaded at once.
    (A bad version over a good one is tests/test_serving_faults.py's: the good one answers.)"""
    from peftu.bench.fake_adapters import publish_random_adapters
    from peftu.config import ServeConfig
    from peftu.model.base import base_fingerprint
    from peftu.serving.engine import Engine
    from peftu.store import AdapterStore

    store = AdapterStore.open(str(tmp_path / "store"))
    publish_random_adapters(store, "synth-cls", ["t"], tiny_base, std=0.2)
    files, _ = store.fetch_bytes("synth-cls", "t")  # another user's good files: u's only version is bad
    bad = store.publish("synth-cls", "u", {**files, "adapter_config.json": b'{"peft_type": "IA3", "r": 8}'},
                        base_fingerprint=base_fingerprint(tiny_base), data_fingerprint="bad", hparams={})
    engine = Engine(ServeConfig(base=tiny_base, store=str(tmp_path / "store"), task="synth-cls", max_adapters=2,
                                version_ttl_s=0))
    fetched = []
    fetch_bytes = engine.adapters.store.fetch_bytes
    engine.adapters.store.fetch_bytes = lambda *a, **k: fetched.append(a) or fetch_bytes(*a, **k)

    def errors() -> float:
        return sum(s.value for m in engine.metrics.registry.collect() if m.name == "peftu_adapter_errors"
                   for s in m.samples if s.name.endswith("_total"))

    async def refused_then_republished():  # one event loop: the engine binds to it
        refused = [await engine.adapters.acquire("u") for _ in range(3)]
        assert [(x.version, x.fallback) for x in refused] == [(None, "incompatible")] * 3
        assert len(fetched) == 1 and errors() == 1
        good = store.publish("synth-cls", "u", files, base_fingerprint=base_fingerprint(tiny_base),
                             data_fingerprint="good", hparams={})
        return good, await engine.adapters.acquire("u")

    good, loaded = asyncio.run(refused_then_republished())
    assert good.version != bad.version and loaded.version == good.version and loaded.fallback is None
    assert len(fetched) == 2 and errors() == 1


def test_a_step_that_fails_mid_stream_ends_the_stream_with_its_error_after_the_pieces_sent(tiny_base, tmp_path):
    from peftu.config import ServeConfig
    from peftu.serving.engine import Engine

    engine = Engine(ServeConfig(base=tiny_base, store=str(tmp_path / "store"), task="synth-cls", max_adapters=2))
    batch, steps = engine.scheduler.batch, []

    def step_then_fail():
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("boom in step 3")
        return real_step()

    real_step, batch.step = batch.step, step_then_fail
    prompt = engine.encode_prompt("Review: the lamp was great. Sentiment:")

    async def stream_then_again():
        _, pieces = await engine.stream(None, prompt, Sampling(max_tokens=8, temperature=0.0))
        got = []
        with pytest.raises(RuntimeError, match="boom in step 3"):
            async for piece in pieces:
                got.append(piece)
        again = await engine.complete(None, prompt, Sampling(max_tokens=4, temperature=0.0))
        return got, again

    got, again = asyncio.run(asyncio.wait_for(stream_then_again(), timeout=120))
    assert len(steps) == 3 and all(p.finish is None for p in got)
    assert sum(len(p.tokens) for p in got) == 2  # the two steps before the failure wrote one token each
    assert again.result.tokens >= 1 and again.result.finish_reason in ("stop", "length")  # the loop went on
    engine.scheduler.close()


# --- an OPPU replica ------------------------------------------------------------------------


def test_a_default_replica_finds_the_oppu_base_its_users_were_fitted_on(tiny_base, tmp_path):
    from peftu.config import LoraHParams, ServeConfig
    from peftu.data.synthetic import generate
    from peftu.errors import NotFoundError
    from peftu.fitting.banked import fit_users_banked
    from peftu.fitting.oppu import ensure_task_adapter
    from peftu.model.bases import load_merged_base
    from peftu.serving.engine import Engine
    from peftu.store import AdapterStore

    spec, users, _ = generate("synth-cls", 3, seed=4)
    store = AdapterStore.open(str(tmp_path / "store"))
    args = {"base": tiny_base, "store": str(tmp_path / "store"), "task": spec.name, "max_adapters": 2}
    with pytest.raises(NotFoundError, match="no OPPU task adapter for task 'synth-cls'"):
        Engine(ServeConfig(**args, oppu=True))
    hp = LoraHParams(epochs=1, r=4)
    ensure_task_adapter(tiny_base, spec, users, hp, store)
    merged, tok, merged_fp = load_merged_base(tiny_base, store, spec.name)
    fit_users_banked(merged, tok, spec, users[:1], hp, store, base_fp=merged_fp)
    user, text = users[0].user_id, users[0].test[0].input

    async def ask(engine: Engine) -> list:
        """(scores, lease) for the user and for no user, on the engine's one event loop."""
        return [await engine.score(who, text, spec.labels) for who in (user, None)]

    oppu, plain = Engine(ServeConfig(**args)), Engine(ServeConfig(**args, oppu=False))
    assert ServeConfig(**args).oppu == "auto"  # the store says the users were fitted on the merged base
    (personal, lease), (task_only, no_user) = asyncio.run(ask(oppu))
    assert lease.version == store.latest_version(spec.name, user) and no_user.version is None
    folder, _ = store.fetch(spec.name, user, dest=tmp_path / "adapter")
    reference = PeftModel.from_pretrained(merged, str(folder))
    encoded = [encode(tok, oppu.score_spec(spec.labels), text, label, 448) for label in spec.labels]
    assert personal == pytest.approx(score_batch(reference, None, tok, [ScoreRow(encoded, 0)])[0], abs=1e-4)
    reference.unload()
    assert task_only == pytest.approx(score_batch(merged, None, tok, [ScoreRow(encoded, 0)])[0], abs=1e-4)
    # A replica told to use the plain base refuses the adapter (fitted on another base) and answers with the bare base.
    (refused, plain_lease), (bare, _) = asyncio.run(ask(plain))
    assert plain_lease.version is None and refused == bare and bare != pytest.approx(task_only, abs=1e-4)


# --- what a replica reads, and what it never does --------------------------------------------


def test_a_replica_takes_the_tasks_prompt_and_labels_from_its_data_set_or_the_store(tiny_base, tmp_path):
    """A task the synthetic generator does not know is scored with its own prompt and labels, never
    with another task's; with none to be found the replica does not start, and says how to fix it."""
    from peftu.config import LoraHParams, ServeConfig
    from peftu.data.io import save_task
    from peftu.data.schema import Example, TaskSpec, UserRecord
    from peftu.errors import PeftuError
    from peftu.fitting.reference import fit_users
    from peftu.model.base import base_fingerprint
    from peftu.serving.engine import Engine
    from peftu.store import AdapterStore
    from peftu.store.task_spec import load_task_spec

    moods = TaskSpec(name="moods", kind="classification", prompt="Day: {input}\nMood:", labels=["happy", "sad"])
    user = UserRecord("u1", train=[Example(f"e{i}", text, label) for i, (text, label) in
                                   enumerate([("sun all day", "happy"), ("rain again", "sad")] * 2)])
    store = AdapterStore.open(str(tmp_path / "store"))
    args = {"base": tiny_base, "store": str(tmp_path / "store"), "task": "moods", "max_adapters": 1}
    with pytest.raises(PeftuError, match=r"no prompt and labels for task 'moods'.*`peftu fit`.*data"):
        Engine(ServeConfig(**args))
    model, tok = load_base(tiny_base)
    fit_users(model, tok, moods, [user], LoraHParams(epochs=1), store, base_fp=base_fingerprint(tiny_base),
              progress=False)
    assert load_task_spec(store, "moods") == moods  # the fit wrote what it trained with

    async def score(engine: Engine) -> list[float]:
        return (await engine.score(None, "a sunny day", engine.spec.labels))[0]

    served = Engine(ServeConfig(**args))
    assert served.spec == moods
    encoded = [encode(tok, moods, "a sunny day", label, 448) for label in moods.labels]
    assert asyncio.run(score(served)) == pytest.approx(score_batch(model, None, tok, [ScoreRow(encoded, 0)])[0],
                                                       abs=1e-4)
    # The data set, when given, wins over the store; it must hold the served task.
    weather = moods.model_copy(update={"labels": ["sunny", "rainy", "foggy"]})
    save_task(tmp_path / "data", weather, [user])
    assert Engine(ServeConfig(**args, data=str(tmp_path / "data"))).spec == weather
    save_task(tmp_path / "other", weather.model_copy(update={"name": "weather"}), [user])
    with pytest.raises(PeftuError, match=r"holds task 'weather', but the served task is 'moods'"):
        Engine(ServeConfig(**args, data=str(tmp_path / "other")))


def test_a_replica_never_builds_a_base(tmp_path, monkeypatch):
    from peftu.config import ServeConfig
    from peftu.errors import PeftuError
    from peftu.serving.engine import Engine

    monkeypatch.setenv("PEFTU_HOME", str(tmp_path))
    with pytest.raises(PeftuError, match=r"no base model at .*tiny-llama: build the tiny base with `peftu base build`"):
        Engine(ServeConfig())
    assert not (tmp_path / "base").exists()


def test_the_serving_app_imports_no_training():
    """What a replica loads (the deployment and everything under it) holds no fitting code at all."""
    import subprocess
    import sys

    code = ("import sys, peftu.serving.server, peftu.serving.local; "
            "print(sorted(m for m in sys.modules if m.startswith(('peftu.fitting', 'peftu.tuning', "
            "'peftu.quality', 'peftu.model.build', 'peftu.pplug.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
