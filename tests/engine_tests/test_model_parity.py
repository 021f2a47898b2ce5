"""Our modules against transformers' on tiny random-weight models of every architecture."""

import pytest
import torch
import transformers
from tiny_models import ARCHITECTURES

from engine import cpu
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT = [
    5,
    17,
    42,
    99,
    3,
    250,
    77,
    12,
    8,
    61,
    33,
    140,
    201,
    9,
    14,
    160,
    70,
    5,
    19,
]  # 19 tokens: > 1 block
DECODE_STEPS = 6


# The compiled CPU forward (the default) with the vectorised attention tile (block 16) and the
# portable one (block 8), and the eager module path (--enforce-eager).
MODES = [("fused", 16), ("fused", 8), ("eager", 8)]


@pytest.fixture(
    scope="module",
    params=[(a, m, bs) for a in ARCHITECTURES for m, bs in MODES],
    ids=lambda p: f"{p[0]}-{p[1]}-bs{p[2]}",
)
def pair(request, tiny_model_factory):
    arch, mode, block_size = request.param
    path = tiny_model_factory(arch)
    engine = LLMEngine(
        EngineConfig(
            model=str(path),
            kv_cache_memory=1 << 20,
            block_size=block_size,
            enforce_eager=mode == "eager",
        )
    )
    fused_expected = mode == "fused" and cpu.load().has_packed_matmul()
    assert (engine.runner.fused is not None) == fused_expected, engine.runner.describe()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return engine, hf


def _engine_logits(engine: LLMEngine, tokens: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each forced decode token, through the paged cache."""
    captured = []
    original = engine.runner.execute

    def capture(sched):
        logits = original(sched)
        captured.append(logits[0].clone())
        return logits

    engine.runner.execute = capture
    try:
        engine.add_request(
            "p",
            tokens[: len(PROMPT)],
            SamplingParams(temperature=0, max_tokens=DECODE_STEPS + 1, ignore_eos=True),
        )
        request = engine.requests["p"]
        while engine.has_unfinished_requests():
            engine.step()
            # Force the continuation to the HF-side tokens so both see the same sequence.
            if "p" in engine.requests:
                n = request.num_output_tokens
                request.all_token_ids[-1] = tokens[len(PROMPT) + n - 1]
    finally:
        engine.runner.execute = original
    return captured


def test_logits_match_transformers_prompt_and_decode(pair):
    engine, hf = pair
    gen = torch.Generator().manual_seed(1)
    continuation = torch.randint(0, 300, (DECODE_STEPS,), generator=gen).tolist()
    tokens = PROMPT + continuation
    ours = _engine_logits(engine, tokens)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]  # (T, V)
    assert len(ours) == DECODE_STEPS + 1
    for step, logits in enumerate(ours):
        expected = ref[len(PROMPT) - 1 + step]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_greedy_generate_matches_transformers(pair):
    engine, hf = pair
    from engine.llm import LLM

    llm = LLM.__new__(LLM)  # reuse the loaded engine
    llm.engine, llm.tokenizer, llm._counter = engine, engine.tokenizer, 0
    prompts = [PROMPT, PROMPT[:5], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        use_tqdm=False,
    )
    for p, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([p])
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert out.outputs[0].token_ids == ref[0, len(p) :].tolist()


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported: LlamaForCausalLM"):
        LLMEngine(EngineConfig(model=str(tmp_path)))
