"""Engine behaviour through its public API on a tiny random-weight Llama."""

import time

import pytest

from contract.histogram import ITERATION_TOKENS_BUCKETS
from engine.config import EngineConfig
from engine.engine import LLMEngine, QueueFullError
from engine.llm import LLM
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 12, 8, 61, 33, 140, 201, 9, 14, 160, 70, 5, 19, 23, 88],
    [9, 8, 7, 6, 5, 4, 3],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116],
]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4)


def generate(llm, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_clean(engine):
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert not engine.requests


@pytest.fixture(scope="module")
def reference(llm):
    return generate(llm)


def test_batched_equals_one_at_a_time(llm, reference):
    assert [generate(llm, [p])[0] for p in PROMPTS] == reference
    assert_clean(llm.engine)


def test_chunked_prefill_gives_same_tokens(tiny_llama, reference):
    small = LLM(
        model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4, max_num_batched_tokens=5
    )
    assert generate(small) == reference
    assert_clean(small.engine)


def test_preemption_by_recompute_gives_same_tokens(tiny_llama, reference):
    # 9 blocks of 4 tokens: the three sequences (31, 17, 27 tokens) cannot all fit at once.
    tight = LLM(model=str(tiny_llama), kv_cache_memory=9 * 4 * 2 * 2 * 2 * 16 * 4, block_size=4)
    assert tight.engine.pool.num_blocks == 9
    assert generate(tight) == reference
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.queue_time.count == len(PROMPTS)  # readmission after preemption: not again
    assert_clean(tight.engine)


def test_prefix_cache_hit_reuses_blocks_and_keeps_output(llm, reference):
    engine = llm.engine
    engine.add_request("warm", PROMPTS[0], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("hit", PROMPTS[0], GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].num_cached_tokens == 20  # 5 full blocks of the 21-token prompt
    assert [t for o in outs for t in o.new_token_ids] == reference[0]
    assert_clean(engine)


def test_split_prefill_export_import_decode(tiny_llama, reference):
    """Prefill in engine A, copy the blocks into engine B, decode there: same tokens."""
    a = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4))
    b = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4))
    for i, prompt in enumerate(PROMPTS):
        rid = f"r{i}"
        a.add_request(rid, prompt, GREEDY, prefill_only=True)
        (done,) = [o for o in a.step() if o.finished]
        assert done.finish_reason == "prefill" and done.prefill.num_prompt_tokens == len(prompt)
        held = done.prefill.block_ids
        assert a.held_block_ids(rid) == held
        res = b.reserve_import(rid, prompt, GREEDY)
        src = held[res.num_cached_blocks :]
        dst = res.block_ids[res.num_cached_blocks :]
        b.kv_cache[:, :, dst] = a.kv_cache[:, :, src]  # (L, 2, n, bs, H, D) export -> import
        a.release_held(rid)
        b.commit_import(rid, done.prefill.first_token)
        tokens = []
        while b.has_unfinished_requests():
            tokens += [t for o in b.step() for t in o.new_token_ids]
        assert tokens == reference[i]
    # A prefills each prompt in one step; B's queue time ends at each import's first decode
    # step, and its steps compute one token each (the imported first token came with the KV).
    a_stats, b_stats = a.stats(), b.stats()
    assert a_stats.queue_time.count == b_stats.queue_time.count == len(PROMPTS)
    assert a_stats.iteration_tokens.count == len(PROMPTS)
    assert a_stats.iteration_tokens.sum == sum(len(p) for p in PROMPTS)
    decode_steps = len(PROMPTS) * (GREEDY.max_tokens - 1)
    assert b_stats.iteration_tokens.count == b_stats.iteration_tokens.sum == decode_steps
    assert b_stats.iteration_tokens.counts[0] == decode_steps  # all in the le=1 bucket
    assert_clean(a)
    assert_clean(b)


def test_stats_histograms_count_requests_and_steps(tiny_llama):
    """Queue time: one observation per request, when first scheduled. Iteration tokens: one per
    step, the tokens it computed."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4, max_num_batched_tokens=16
        )
    )
    started = time.monotonic()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"h{i}", prompt, GREEDY)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    elapsed = time.monotonic() - started
    stats = engine.stats()
    assert stats.queue_time.count == len(PROMPTS)
    assert 0 <= stats.queue_time.sum <= len(PROMPTS) * elapsed
    iteration = stats.iteration_tokens
    assert iteration.count == steps
    # Each prompt token and each decode input once (the last sampled token is never computed).
    assert iteration.sum == sum(len(p) for p in PROMPTS) + len(PROMPTS) * (GREEDY.max_tokens - 1)
    le_16 = ITERATION_TOKENS_BUCKETS.index(16)
    assert iteration.counts[le_16] == steps  # the budget caps every step at 16 tokens
    assert 0 < iteration.counts[le_16 - 1] < steps  # decode-only steps fit in 8, prefills not
    assert_clean(engine)


def test_import_skips_blocks_held_locally(tiny_llama):
    b = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4))
    b.add_request("x", PROMPTS[0], GREEDY)
    while b.has_unfinished_requests():
        b.step()
    res = b.reserve_import("y", PROMPTS[0], GREEDY)
    assert res.num_cached_blocks == 5
    b.cancel_import("y")
    assert_clean(b)


@pytest.mark.parametrize(
    "prompt,params,match",
    [
        ([], GREEDY, "empty"),
        ([1, 2, 10_000], GREEDY, "outside the vocabulary"),
        ([1, -1], GREEDY, "outside the vocabulary"),
        (list(range(1, 300)) * 2, GREEDY, "max_model_len"),
    ],
)
def test_bad_prompts_raise_and_engine_keeps_serving(llm, reference, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert generate(llm, [PROMPTS[1]]) == [reference[1]]
    assert_clean(llm.engine)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 99}, "logprobs"),
        ({"n": 0}, "n must"),
    ],
)
def test_out_of_range_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_seed_is_reproducible_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    alone = (
        llm.generate({"prompt_token_ids": PROMPTS[0]}, seeded, use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    crowd = [{"prompt_token_ids": p} for p in PROMPTS]
    params = [
        seeded,
        SamplingParams(temperature=1.0, max_tokens=8),
        SamplingParams(temperature=0.7, max_tokens=5),
    ]
    again = llm.generate(crowd, params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == again
    other = llm.generate({"prompt_token_ids": PROMPTS[0]}, seeded.clone(seed=99), use_tqdm=False)
    assert other[0].outputs[0].token_ids != alone


def test_stop_token_ids_logprobs_and_n(llm, reference):
    stop_at = reference[0][3]
    params = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_at], logprobs=2
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)
    comp = out.outputs[0]
    first = reference[0].index(stop_at)
    assert comp.token_ids == reference[0][: first + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_at
    # the stop token's text is not in the output (vLLM), unless include_stop_str_in_output
    assert comp.text == llm.tokenizer.decode(comp.token_ids[:-1])
    (kept,) = llm.generate(
        {"prompt_token_ids": PROMPTS[0]},
        params.clone(include_stop_str_in_output=True),
        use_tqdm=False,
    )
    assert kept.outputs[0].text == llm.tokenizer.decode(comp.token_ids)
    assert kept.outputs[0].text != comp.text
    assert len(comp.logprobs) == len(comp.token_ids)
    assert all(
        len(lp) in (2, 3) and tok in lp
        for lp, tok in zip(comp.logprobs, comp.token_ids, strict=True)
    )
    (many,) = llm.generate(
        {"prompt_token_ids": PROMPTS[1]},
        SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=5),
        use_tqdm=False,
    )
    assert [c.index for c in many.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in many.outputs)


def test_stop_strings_truncate_text(llm):
    (base,) = llm.generate(
        "hello world", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    text = base.outputs[0].text
    stop = text[4:6]
    assert stop
    (cut,) = llm.generate(
        "hello world",
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.outputs[0].text == text[: text.find(stop)]
    (kept,) = llm.generate(
        "hello world",
        SamplingParams(
            temperature=0,
            max_tokens=12,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
        use_tqdm=False,
    )
    assert kept.outputs[0].text == text[: text.find(stop) + len(stop)]


def test_chat_applies_template(llm):
    outs = llm.chat(
        [{"role": "user", "content": "hello"}],
        SamplingParams(temperature=0, max_tokens=3),
        use_tqdm=False,
    )
    ids = outs[0].prompt_token_ids
    assert llm.tokenizer.decode(ids).startswith("<|im_start|>user\nhello<|im_end|>")


def test_chat_continues_the_final_message_and_passes_tools_and_template_kwargs(llm):
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi, I am"},
    ]
    params = SamplingParams(temperature=0, max_tokens=2)
    (out,) = llm.chat(
        conversation, params, use_tqdm=False, add_generation_prompt=False,
        continue_final_message=True,
    )  # fmt: skip
    assert llm.tokenizer.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\nHi, I am")
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conversation, params, use_tqdm=False, continue_final_message=True)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    template = (
        "{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}"
        "{% if shout %}!{% endif %}{{ messages[-1]['content'] }}"
    )
    (out,) = llm.chat(
        conversation[:1], params, use_tqdm=False, chat_template=template, tools=[tool],
        chat_template_kwargs={"shout": True},
    )  # fmt: skip
    assert llm.tokenizer.decode(out.prompt_token_ids) == "[get_weather]!hello"
    with pytest.raises(ValueError, match="may not set tools"):
        llm.chat(conversation, params, use_tqdm=False, chat_template_kwargs={"tools": []})


def test_bounded_waiting_queue(tiny_llama):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, max_waiting=2))
    engine.add_request("a", [1, 2], GREEDY)
    engine.add_request("b", [1, 2], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2], GREEDY)
    engine.abort_request("a")
    engine.abort_request("b")
    outs = engine.step()
    assert {o.finish_reason for o in outs} == {"abort"}
    assert_clean(engine)


def test_abort_mid_decode_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("z", PROMPTS[0], GREEDY)
    engine.step()
    engine.step()
    engine.abort_request("z")
    engine.abort_request("never-existed")
    engine.step()
    assert_clean(engine)


def test_seeded_sampling_same_split_or_not(tiny_llama):
    """A seeded request gives the same tokens prefilled in A and decoded in B as in one engine."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    a = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4))
    b = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, block_size=4))
    a.add_request("one", PROMPTS[0], params)
    whole = []
    while a.has_unfinished_requests():
        whole += [t for o in a.step() for t in o.new_token_ids]
    a.add_request("split", PROMPTS[0], params, prefill_only=True)
    (done,) = [o for o in a.step() if o.finished]
    res = b.reserve_import("split", PROMPTS[0], params)
    b.kv_cache[:, :, res.block_ids] = a.kv_cache[:, :, done.prefill.block_ids]
    a.release_held("split")
    b.commit_import("split", done.prefill.first_token)
    split = []
    while b.has_unfinished_requests():
        split += [t for o in b.step() for t in o.new_token_ids]
    assert split == whole


def test_reset_prefix_cache_forgets_hits(llm):
    engine = llm.engine
    generate(llm, [PROMPTS[0]])
    request_hits = engine.kv.find_prefix_hits
    from engine.request import Request

    probe = Request("probe", PROMPTS[0], GREEDY)
    assert len(request_hits(probe)) == 5
    llm.reset_prefix_cache()
    assert request_hits(probe) == []
    engine.pool.check_integrity()


def test_num_cached_tokens_and_get_tokenizer(llm):
    """vLLM's offline API: `LLM.get_tokenizer()`, and `num_cached_tokens` on each output (prompt
    tokens the prefix cache served: none the first time, whole blocks the second)."""
    assert llm.get_tokenizer() is llm.tokenizer
    llm.reset_prefix_cache()
    prompt = {"prompt_token_ids": PROMPTS[2]}
    first, = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    again, = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert first.num_cached_tokens == 0
    block = llm.engine.config.block_size
    assert again.num_cached_tokens == (len(PROMPTS[2]) - 1) // block * block > 0


def test_allowed_token_ids_and_logit_bias_shape_the_draw(llm, reference):
    allowed = [7, 9, 11]
    for temperature in (0.0, 1.0):
        params = SamplingParams(
            temperature=temperature, max_tokens=8, ignore_eos=True, allowed_token_ids=allowed,
            seed=3,
        )  # fmt: skip
        assert set(generate(llm, params=params)[0]) <= set(allowed)
    forced = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={42: 100.0})
    assert generate(llm, params=forced)[0] == [42] * 5
    first = reference[0][0]
    banned = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={first: -1e9})
    assert banned.logit_bias == {first: -100.0}  # clamped as vLLM does
    assert generate(llm, params=banned)[0][0] != first
    for bad in ({"allowed_token_ids": [10**6]}, {"logit_bias": {10**6: 1.0}}):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(**bad), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[-1])
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(logit_bias={1: float("nan")})
    assert_clean(llm.engine)


def test_bad_words_are_never_generated(llm):
    tok = llm.engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    reference = generate(llm, params=params)[0]
    # A generated token whose text spells it back, and a two-token word the output contains.
    single = next(t for t in reference if tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    word = tok.decode([single])
    banned = generate(llm, params=params.clone(bad_words=[word]))[0]
    assert single not in banned
    pair = next(
        (a, b) for a, b in zip(reference, reference[1:], strict=False)
        if tok.encode(tok.decode([a, b]), add_special_tokens=False) == [a, b]
    )  # fmt: skip
    out = generate(llm, params=params.clone(bad_words=[tok.decode(list(pair))]))[0]
    assert all((a, b) != pair for a, b in zip(out, out[1:], strict=False))
    assert out[: reference.index(pair[0]) + 1] == reference[: reference.index(pair[0]) + 1]
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=[" "])
    assert_clean(llm.engine)
