"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers on a tiny random Llama,
and the vLLM shape of the offline API's logprobs (`Logprob` objects)."""

import pytest
import torch
import transformers

from contract.limits import MAX_LOGPROBS
from engine import cpu
from engine.llm import LLM
from engine.outputs import Logprob
from engine.sampling_params import SamplingParams

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 12, 8, 61, 33, 140, 201, 9, 14, 160, 70, 5, 19, 23, 88],
    [9, 8, 7, 6, 5, 4, 3],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116],
]
K = 3
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=K)


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


@pytest.fixture(scope="module")
def expected(hf):
    """Per prompt: log_softmax of transformers' logits, (T, V) in float32."""
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in PROMPTS]


def make(tiny_llama, **kw) -> LLM:
    """float32 on CPU, the reference's precision."""
    kw = {"device": "cpu", "kv_cache_memory": 1 << 20, "block_size": 4, **kw}
    return LLM(model=str(tiny_llama), **kw)


def run(llm, prompts=PROMPTS, params=PARAMS):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_matches(out, prompt, ref, k=K):
    """vLLM's shape: None, then per position p a dict holding prompt token p and the top-k."""
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    for p in range(1, len(prompt)):
        entry, row, token = plp[p], ref[p - 1], prompt[p]
        assert all(isinstance(v, Logprob) for v in entry.values())
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row >= row[token]).sum())
        top = row.topk(k)
        assert list(entry)[0] == token and set(entry) == {token, *top.indices.tolist()}
        for rank, (t, v) in enumerate(
            zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1
        ):
            assert entry[t].logprob == pytest.approx(v, abs=1e-4)
            assert entry[t].rank == rank


def assert_clean(engine):
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks
    assert not engine.requests


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["default-forward", "eager"])
def test_prompt_logprobs_match_transformers(tiny_llama, expected, enforce_eager):
    llm = make(tiny_llama, enforce_eager=enforce_eager)
    fused = not enforce_eager and cpu.load().has_packed_matmul()
    assert (llm.engine.runner.fused is not None) == fused  # the compiled forward where it runs
    for out, prompt, ref in zip(run(llm), PROMPTS, expected, strict=True):
        assert_matches(out, prompt, ref)
    assert_clean(llm.engine)


def test_chunked_prefill_accumulates_across_chunks(tiny_llama, expected):
    small = make(tiny_llama, max_num_batched_tokens=5)
    for out, prompt, ref in zip(run(small), PROMPTS, expected, strict=True):
        assert_matches(out, prompt, ref)
    assert_clean(small.engine)


def test_preemption_during_prefill_keeps_them_whole(tiny_llama, expected):
    # 9 blocks of 4 tokens and 5 tokens a step: prompts are preempted mid-way and recomputed.
    tight = make(tiny_llama, kv_cache_memory=9 * 4 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=5)
    params = PARAMS.clone(max_tokens=10)
    for out, prompt, ref in zip(run(tight, params=params), PROMPTS, expected, strict=True):
        assert_matches(out, prompt, ref)
    assert tight.engine.stats().num_preemptions > 0
    assert_clean(tight.engine)


def test_sampled_rows_are_unchanged_by_prompt_rows(tiny_llama):
    llm = make(tiny_llama, max_num_batched_tokens=7)
    plain = [o.outputs[0].token_ids for o in run(llm, params=PARAMS.clone(prompt_logprobs=None))]
    mixed = [PARAMS if i % 2 else PARAMS.clone(prompt_logprobs=None) for i in range(3)]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], mixed, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert [o.prompt_logprobs is None for o in outs] == [True, False, True]


def test_prefix_cache_is_not_read_but_is_filled(tiny_llama, expected):
    llm = make(tiny_llama)
    (first,) = run(llm, PROMPTS[:1])
    (again,) = run(llm, PROMPTS[:1])  # identical prompt: its full blocks are cached now
    for out in (first, again):
        assert out.num_cached_tokens == 0
        assert_matches(out, PROMPTS[0], expected[0])
    (plain,) = run(llm, PROMPTS[:1], PARAMS.clone(prompt_logprobs=None))
    assert plain.num_cached_tokens == 20  # the blocks the prompt-logprobs requests entered
    assert plain.prompt_logprobs is None
    assert_clean(llm.engine)


def test_zero_gives_the_prompt_tokens_alone_and_n_shares_them(tiny_llama, expected):
    llm = make(tiny_llama)
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3, prompt_logprobs=0)
    (out,) = run(llm, PROMPTS[1:2], params)
    assert len(out.outputs) == 2
    assert_matches(out, PROMPTS[1], expected[1], k=0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
    (single,) = run(llm, [[42]], params)  # one token: nothing to predict it
    assert single.prompt_logprobs == [None]


def test_sampled_logprobs_are_vllm_logprob_objects(tiny_llama, hf):
    llm = make(tiny_llama)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    (out,) = run(llm, PROMPTS[1:2], params)
    comp = out.outputs[0]
    tok = llm.get_tokenizer()
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[1] + comp.token_ids])
        ref = hf(ids).logits[0, len(PROMPTS[1]) - 1 :].float().log_softmax(-1)
    assert len(comp.logprobs) == len(comp.token_ids) == 3
    total = 0.0
    for step, (entry, token) in enumerate(zip(comp.logprobs, comp.token_ids, strict=True)):
        assert entry[token].rank == 1  # greedy: the best token
        assert entry[token].logprob == pytest.approx(ref[step, token].item(), abs=1e-4)
        assert [v.rank for t, v in entry.items()] == [1, 2]  # the sampled token is the top one
        for t, v in entry.items():
            assert v.decoded_token == tok.decode([t])
        total += entry[token].logprob
    assert comp.cumulative_logprob == pytest.approx(total)


@pytest.mark.parametrize("bad", [-1, MAX_LOGPROBS + 1])
def test_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
