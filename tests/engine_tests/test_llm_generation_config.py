"""The offline LLM's generation_config: get_default_sampling_params() and generate() without
sampling_params take the model's generation_config.json defaults; "vllm" ignores the file."""

from __future__ import annotations

import json
import shutil

import pytest

from contract.generation_config import GENERATION_CONFIG_FILE
from engine.llm import LLM
from engine.sampling_params import SamplingParams

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model_with_defaults(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-genconf") / "model"
    shutil.copytree(tiny_llama, folder)
    path = folder / GENERATION_CONFIG_FILE
    content = json.loads(path.read_text())  # bos/eos as transformers saved them
    content.update(temperature=0.0, top_k=5, max_new_tokens=3, do_sample=False)
    path.write_text(json.dumps(content))
    return folder


def make(model, **kwargs) -> LLM:
    return LLM(model=str(model), kv_cache_memory=1 << 20, block_size=4, **kwargs)


def test_default_sampling_params_come_from_the_file(model_with_defaults):
    llm = make(model_with_defaults)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 5, 3)
    assert (params.top_p, params.min_p, params.repetition_penalty) == (1.0, 0.0, 1.0)
    params.max_tokens = 7  # a copy: changing it does not change the defaults
    assert llm.get_default_sampling_params().max_tokens == 3
    out = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3 or out.finish_reason == "stop"
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert out.token_ids == greedy[0].outputs[0].token_ids  # temperature 0 from the file
    explicit = llm.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(explicit[0].outputs[0].token_ids) == 5  # given params win (vLLM's defaults)


def test_vllm_ignores_the_file(model_with_defaults):
    llm = make(model_with_defaults, generation_config="vllm")
    assert llm.get_default_sampling_params() == SamplingParams()


def test_a_bad_value_in_the_file_fails_at_construction(model_with_defaults, tmp_path):
    (tmp_path / GENERATION_CONFIG_FILE).write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match="top_p must be in"):
        make(model_with_defaults, generation_config=str(tmp_path))
