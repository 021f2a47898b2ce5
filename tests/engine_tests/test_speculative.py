"""Speculative decoding through the engine: same greedy tokens, same sampling distribution,
clean rollback, under structured-output grammars too, and the batch-size off switch."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from engine.cli_args import add_engine_args, engine_config_from_args
from engine.llm import LLM
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer
from engine.structured_output import StructuredOutputManager

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Repeating prompts give the n-gram lookup something to find in the random model's output too.
PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 12, 5, 17, 42, 99, 3, 250, 77, 12, 8],
    [9, 8, 7, 6, 5, 4, 3, 9, 8, 7],
    list(range(100, 117)),
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None}


def draft(path, k=3):
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": k,
            "disable_by_batch_size": None}  # fmt: skip


@pytest.fixture(scope="module")
def other_draft(tiny_model_factory):
    """A different random model of the same vocabulary: most of its proposals are rejected."""
    return tiny_model_factory("LlamaForCausalLM", hidden_size=32, intermediate_size=64)


def make(model, **kw) -> LLM:
    kw = {"kv_cache_memory": 1 << 20, **kw}
    return LLM(str(model), block_size=4, enforce_eager=True, **kw)


def run(llm: LLM, prompts=PROMPTS, params=GREEDY):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine = llm.engine
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not engine.requests
    return [o.outputs[0] for o in outs]


def tokens(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return run(make(tiny_llama, max_num_seqs=8))


def test_config_is_validated():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown"):
        SpeculativeConfig.from_dict({"method": "ngram", "speculative_tokens": 2})
    with pytest.raises(ValueError, match='needs "model"'):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig(prompt_lookup_min=5, prompt_lookup_max=2)
    with pytest.raises(ValueError, match="JSON"):
        SpeculativeConfig.from_json("{method: ngram}")


def test_cli_flag_round_trips_to_the_workers_command_line():
    from pdserve.commands.serve import engine_flag_argv

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    )
    config = engine_config_from_args(args).speculative_config
    assert config.num_speculative_tokens == 3 and config.prompt_lookup_max == 4
    again = parser.parse_args(engine_flag_argv(args))
    assert again.speculative_config == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", '{"method": "medusa"}'])


def test_ngram_proposes_what_followed_the_latest_match():
    ngram = NgramProposer(2, 3)
    assert ngram.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]
    assert ngram.propose([1, 2, 3, 4], 3) == []  # no earlier occurrence
    assert ngram.propose([4, 4, 4], 5) == [4]  # the match may overlap the suffix


def test_greedy_with_ngram_is_unchanged(tiny_llama, reference):
    llm = make(tiny_llama, speculative_config=NGRAM)
    assert tokens(run(llm)) == tokens(reference)
    assert llm.engine.stats().spec_decode.num_draft_tokens > 0


def test_greedy_with_own_draft_accepts_everything(tiny_llama, reference):
    llm = make(tiny_llama, speculative_config=draft(tiny_llama))
    assert tokens(run(llm)) == tokens(reference)
    st = llm.engine.stats().spec_decode
    assert st.num_draft_tokens > 0 and st.num_accepted_tokens == st.num_draft_tokens


def test_greedy_with_own_draft_on_the_fused_forward(tiny_llama, reference):
    llm = LLM(str(tiny_llama), kv_cache_memory=1 << 20, block_size=4,
              speculative_config=draft(tiny_llama))  # fmt: skip
    if llm.engine.runner.fused is None:
        pytest.skip("this CPU runs no compiled forward (needs AVX-512 or AVX2 with FMA)")
    assert tokens(run(llm)) == tokens(reference)
    st = llm.engine.stats().spec_decode
    assert st.num_accepted_tokens == st.num_draft_tokens > 0


def test_rejected_proposals_roll_back_cleanly(tiny_llama, other_draft, reference):
    # 14 blocks of 4 tokens: proposals need blocks the batch is short of, so preemption and
    # rollback interleave. After every step: pool consistent, no unverified token hashed.
    llm = make(tiny_llama, speculative_config=draft(other_draft, k=4),
               kv_cache_memory=14 * 4 * 2 * 2 * 2 * 16 * 4)  # fmt: skip
    engine = llm.engine
    assert engine.pool.num_blocks == 14
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        engine.pool.check_integrity()
        for r in engine.scheduler.running:
            assert len(r.block_hashes) <= r.num_computed_tokens // 4
            for i, h in enumerate(r.block_hashes):
                block = engine.pool.blocks[r.block_ids[i]]
                assert block.block_hash in (h, None)
                if block.block_hash is not None:
                    assert list(block.token_ids) == r.all_token_ids[i * 4 : (i + 1) * 4]
            assert len(r.block_ids) <= -(-(r.num_tokens + 4) // 4)
    assert [got[str(i)] for i in range(len(PROMPTS))] == tokens(reference)
    st = engine.stats()
    assert st.num_preemptions > 0
    assert st.spec_decode.num_accepted_tokens < st.spec_decode.num_draft_tokens
    assert st.num_free_blocks == st.num_blocks


def test_stop_tokens_and_logprobs_match_plain_decoding(tiny_llama, reference):
    stop = reference[0].token_ids[10]
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop], logprobs=2)
    plain = run(make(tiny_llama), params=params)
    spec = run(make(tiny_llama, speculative_config=draft(tiny_llama)), params=params)
    assert tokens(spec) == tokens(plain)
    assert [o.finish_reason for o in spec] == [o.finish_reason for o in plain]
    for a, b in zip(spec, plain, strict=True):
        for la, lb in zip(a.logprobs, b.logprobs, strict=True):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 for t in la)
            assert all(la[t].rank == lb[t].rank for t in la)


def test_speculation_is_off_above_the_batch_size_threshold(tiny_llama, reference):
    config = {**draft(tiny_llama), "disable_by_batch_size": 2}
    llm = make(tiny_llama, speculative_config=config)
    assert tokens(run(llm)) == tokens(reference)  # three requests finish together
    assert llm.engine.stats().spec_decode.num_drafts == 0
    run(llm, PROMPTS[:2])
    assert llm.engine.stats().spec_decode.num_drafts > 0


# -- sampling: the same distribution with and without speculation ------------------------------
# The power of the threshold against a wrong residual is shown where p and q can be chosen far
# apart (test_rejection_sampler.py); two random tiny models mostly disagree outright, which a
# wrong residual survives, so here the test checks that nothing else shifts the distribution.

SAMPLES = 300
SAMPLED = SamplingParams(temperature=1.0, top_k=6, max_tokens=4, ignore_eos=True)
CHI2_CRIT_P1E4 = {5: 25.74}  # two-sample chi-square, 5 degrees of freedom (6 bins), p = 1e-4


def _position_counts(llm: LLM) -> list[Counter]:
    prompt = [5, 17, 42, 99, 3, 250, 77]
    params = [SAMPLED.clone(seed=1000 + i) for i in range(SAMPLES)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * SAMPLES, params, use_tqdm=False)
    llm.engine.pool.check_integrity()
    return [Counter(o.outputs[0].token_ids[pos] for o in outs) for pos in (1, 2, 3)]


def _two_sample_chi2(a: Counter, b: Counter, bins: int = 6) -> float:
    """Chi-square of two equal-size samples over their `bins` most common values (rest pooled)."""
    top = [t for t, _ in (a + b).most_common(bins - 1)]

    def binned(c):  # noqa: E306
        return [c[t] for t in top] + [sum(v for t, v in c.items() if t not in top)]

    stat = 0.0
    for x, y in zip(binned(a), binned(b), strict=True):
        if x + y:
            stat += (x - y) ** 2 / (x + y)
    return stat


@pytest.fixture(scope="module")
def plain_counts(tiny_llama):
    return _position_counts(make(tiny_llama, max_num_seqs=64))


def _spec_counts(tiny_llama, other_draft):
    llm = make(tiny_llama, max_num_seqs=64, speculative_config=draft(other_draft, k=3))
    counts = _position_counts(llm)
    st = llm.engine.stats().spec_decode
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens  # both branches exercised
    return counts


def test_seeded_sampling_keeps_the_distribution(tiny_llama, other_draft, plain_counts):
    spec = _spec_counts(tiny_llama, other_draft)
    stats = [_two_sample_chi2(a, b) for a, b in zip(plain_counts, spec, strict=True)]
    assert max(stats) < CHI2_CRIT_P1E4[5], stats


# -- structured outputs: proposals verified under the grammar's masks ---------------------------

LOWER = StructuredOutputsParams(regex="[a-z ]{4,40}")


def _grammar_allows(llm: LLM, spec, token_ids: list[int]) -> bool:
    engine = llm.engine
    manager = StructuredOutputManager(llm.tokenizer, engine.vocab_size, set())
    matcher = manager.matcher(spec)
    return all(matcher.accept_token(t) for t in token_ids)


def test_greedy_under_a_grammar_is_unchanged(tiny_llama):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, structured_outputs=LOWER)
    prompts = [make(tiny_llama).tokenizer.encode("the cat sat on the mat " * 3)] + PROMPTS[:2]
    plain = tokens(run(make(tiny_llama), prompts, params))
    for config in (NGRAM, draft(tiny_llama)):
        llm = make(tiny_llama, speculative_config=config)
        assert tokens(run(llm, prompts, params)) == plain, config["method"]
        assert llm.engine.stats().spec_decode.num_draft_tokens > 0, config["method"]
    assert all(_grammar_allows(llm, LOWER, t) for t in plain)


def test_seeded_sampling_under_a_grammar_keeps_the_distribution(tiny_llama):
    """The model as its own draft, its proposals drawn without the grammar's mask: the ones the
    grammar refuses must be rejected (every output passes the grammar) and nothing else may
    shift the distribution. (Here p is q masked and renormalised, for which a rejection's
    replacement drawn from p would be exact too: the power against a wrong residual under a
    mask is shown in test_rejection_sampler.py.)"""

    def counts(llm):
        prompt = [5, 17, 42, 99, 3, 250, 77]
        params = [SAMPLED.clone(seed=2000 + i, structured_outputs=LOWER) for i in range(SAMPLES)]
        outs = llm.generate([{"prompt_token_ids": prompt}] * SAMPLES, params, use_tqdm=False)
        llm.engine.pool.check_integrity()
        assert all(_grammar_allows(llm, LOWER, o.outputs[0].token_ids) for o in outs)
        return [Counter(o.outputs[0].token_ids[pos] for o in outs) for pos in (1, 2, 3)]

    plain = counts(make(tiny_llama, max_num_seqs=64))
    llm = make(tiny_llama, max_num_seqs=64, speculative_config=draft(tiny_llama, k=3))
    spec = counts(llm)
    st = llm.engine.stats().spec_decode
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens  # refused proposals were rejected
    stats = [_two_sample_chi2(a, b) for a, b in zip(plain, spec, strict=True)]
    assert max(stats) < CHI2_CRIT_P1E4[5], stats
