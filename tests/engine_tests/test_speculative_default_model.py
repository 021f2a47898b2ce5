"""Greedy speculative decoding on the default model (SmolLM2-135M-Instruct) gives exactly the
tokens plain decoding gives: with n-gram proposals, and with the model as its own draft, where
every proposal must be accepted (the mechanism, not luck, makes the outputs equal).

Runs the compiled CPU forward where the CPU has AVX-512 or AVX2 with FMA, the eager one elsewhere (the runner
says which in the assertion message)."""

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdserve.default_model import resolve_model

PARAMS = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
TEXT = (
    "Paged attention stores the key and value cache in fixed-size blocks, and a block table "
    "maps each sequence's logical blocks to physical ones."
)


@pytest.fixture(scope="module")
def setup():
    model = str(resolve_model(None))
    plain = LLM(model, kv_cache_memory=64 << 20)
    prompt = plain.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Repeat this sentence exactly: {TEXT}"}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )  # fmt: skip
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return model, prompt, _run(plain, prompt)


def _run(llm: LLM, prompt: list[int]) -> list[int]:
    out = llm.generate([{"prompt_token_ids": prompt}], PARAMS, use_tqdm=False)
    llm.engine.pool.check_integrity()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
    return out[0].outputs[0].token_ids


@pytest.mark.parametrize(
    "spec",
    [
        {"method": "ngram", "num_speculative_tokens": 4},
        {"method": "draft_model", "model": None, "num_speculative_tokens": 3},
    ],
    ids=["ngram", "own-draft"],
)
def test_greedy_speculation_matches_plain_decoding(setup, spec):
    model, prompt, reference = setup
    if spec["method"] == "draft_model":
        spec = {**spec, "model": model}
    llm = LLM(model, kv_cache_memory=64 << 20, speculative_config=spec)
    where = llm.engine.runner.describe()
    assert _run(llm, prompt) == reference, where
    st = llm.engine.stats().spec_decode
    assert st.num_accepted_tokens > 0, where  # the copy task gives n-gram hits too
    if spec["method"] == "draft_model":
        assert st.num_accepted_tokens == st.num_draft_tokens, where


def test_greedy_speculation_under_a_json_schema_matches_plain_decoding(setup):
    """n-gram proposals cut at the first token the grammar refuses, verified under its masks:
    the same JSON as plain decoding, and proposals were accepted (the answer quotes the prompt)."""
    import json

    from engine.sampling_params import StructuredOutputsParams

    model, _, _ = setup
    schema = {"type": "object", "properties": {"sentence": {"type": "string"}},
              "required": ["sentence"]}  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(json=schema))  # fmt: skip
    plain = LLM(model, kv_cache_memory=64 << 20)
    prompt = plain.tokenizer.apply_chat_template(
        [{"role": "user", "content": f'Answer in JSON with the key "sentence": {TEXT}'}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )  # fmt: skip
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    spec = LLM(model, kv_cache_memory=64 << 20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})  # fmt: skip
    outs = [llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
            for llm in (plain, spec)]  # fmt: skip
    assert outs[1].token_ids == outs[0].token_ids
    spec.engine.pool.check_integrity()
    assert spec.engine.stats().spec_decode.num_accepted_tokens > 0
    assert outs[0].finish_reason == "stop", outs[0].text
    assert "sentence" in json.loads(outs[0].text)
