"""The generation config's sampling defaults on both front doors: the fields a request leaves
unset take the file's values, the ones it sets win, and max_new_tokens caps an unset max_tokens
at what the context leaves. The in-process gateway (fake workers) checks what reaches a worker."""

from __future__ import annotations

import json

import httpx
import pytest
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
)

from contract.generation_config import GENERATION_CONFIG_FILE
from gateway.errors import GatewayError
from gateway.grpc_service import _params_from_proto
from gateway.openai.protocol import ChatCompletionRequest, CompletionRequest
from gateway.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from gateway.tokenizer import GatewayTokenizer
from gateway.validation import Limits, resolve_max_tokens
from pdserve.client import GatewayClient, GenerationOptions
from protos.pdserve.v1 import gateway_pb2

LIMITS = Limits(vocab_size=100, max_model_len=64, max_n=4, max_logprobs=20, max_stop_strings=4)
FILE = {"temperature": 0.0, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "repetition_penalty": 1.2}
DEFAULTS = SamplingDefaults({**FILE, "max_tokens": 3})
MESSAGES = [{"role": "user", "content": "hi"}]


def sampling(params) -> dict:
    return {name: getattr(params, name) for name in FILE}


# -- one rule for both front doors ---------------------------------------------------------------


def test_unset_fields_take_the_file_and_set_fields_win():
    assert sampling(DEFAULTS.params({})) == FILE
    given = {"temperature": 0.9, "top_k": 0, "presence_penalty": 0.5}
    params = DEFAULTS.params(given)
    assert sampling(params) == {**FILE, "temperature": 0.9, "top_k": 0}
    assert params.presence_penalty == 0.5  # not a field a generation config defaults
    # None is unset for the defaultable fields (as vLLM), a value for the others
    params = DEFAULTS.params({"temperature": None, "seed": None})
    assert params.temperature == 0.0 and params.seed is None


def test_without_a_file_the_contract_defaults_stand():
    params = NO_DEFAULTS.params({})
    assert sampling(params) == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    assert params.max_tokens == 16
    assert NO_DEFAULTS.params({}, max_tokens_fallback=None).max_tokens is None


def test_an_unset_max_tokens_becomes_the_capped_default():
    assert DEFAULTS.max_tokens == 3 and NO_DEFAULTS.max_tokens is None
    assert DEFAULTS.params({}).max_tokens is None  # resolved by the core, capped at 3
    assert DEFAULTS.params({"max_tokens": 5}).max_tokens == 5
    assert resolve_max_tokens(10, None, 64, DEFAULTS.max_tokens) == 3
    assert resolve_max_tokens(62, None, 64, DEFAULTS.max_tokens) == 2  # what the context leaves
    assert resolve_max_tokens(10, None, 64) == 54
    with pytest.raises(GatewayError, match="maximum context length"):
        resolve_max_tokens(62, 5, 64, DEFAULTS.max_tokens)  # a request's own value still must fit


@pytest.mark.parametrize(
    "body, with_file, without_file",
    [
        ({}, None, 16),  # absent: the file's (capped by the core), else OpenAI's 16
        ({"max_tokens": None}, None, None),  # null: the file's, else up to the context
        ({"max_tokens": 5}, 5, 5),
    ],
)
def test_completions_max_tokens(body, with_file, without_file):
    request = CompletionRequest(prompt="hi", **body)
    assert request.to_params(DEFAULTS).max_tokens == with_file
    assert request.to_params(NO_DEFAULTS).max_tokens == without_file


def test_openai_routes_apply_the_defaults():
    params = CompletionRequest(prompt="hi", top_p=0.25).to_params(DEFAULTS)
    assert sampling(params) == {**FILE, "top_p": 0.25}
    chat = ChatCompletionRequest(messages=MESSAGES, temperature=0.3)
    params = chat.to_params(defaults=DEFAULTS)
    assert sampling(params) == {**FILE, "temperature": 0.3} and params.max_tokens is None
    chat = ChatCompletionRequest(messages=MESSAGES, max_completion_tokens=4)
    assert chat.to_params(defaults=DEFAULTS).max_tokens == 4
    assert sampling(CompletionRequest(prompt="hi").to_params()) == sampling(NO_DEFAULTS.params({}))


def test_the_grpc_front_door_applies_the_same_defaults():
    message = gateway_pb2.GenerationParams()
    params = _params_from_proto(message, DEFAULTS)
    assert sampling(params) == FILE and params.max_tokens is None
    assert _params_from_proto(message).max_tokens == 16  # the documented default without a file
    message.temperature, message.max_tokens = 0.75, 5
    params = _params_from_proto(message, DEFAULTS)
    assert (params.temperature, params.max_tokens, params.top_k) == (0.75, 5, 7)


# -- loading ---------------------------------------------------------------------------------


def test_load_takes_the_file_and_vllm_ignores_it(tmp_path):
    (tmp_path / GENERATION_CONFIG_FILE).write_text(json.dumps({**FILE, "max_new_tokens": 3}))
    assert SamplingDefaults.load("auto", tmp_path, LIMITS) == DEFAULTS
    assert SamplingDefaults.load("vllm", tmp_path, LIMITS) == NO_DEFAULTS


@pytest.mark.parametrize(
    "content, message",
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in"),
        ({"max_new_tokens": 0}, "max_tokens must be >= 1"),
    ],
)
def test_load_refuses_values_no_request_could_carry(tmp_path, content, message):
    (tmp_path / GENERATION_CONFIG_FILE).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        SamplingDefaults.load("auto", tmp_path, LIMITS)


def test_only_defaultable_fields_are_accepted():
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingDefaults({"presence_penalty": 0.5})


# -- through an in-process gateway: what a worker is sent ------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    content = {**FILE, "max_new_tokens": 3, "do_sample": False}
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(content))
    tok = GatewayTokenizer(folder)
    decode = FakeWorker("decode", tok.encode(REPLY), tok.eos_token_ids[0]).start()
    harness = GatewayHarness(make_config(folder, [], [decode]))
    harness.decode = decode
    yield harness
    harness.close()
    decode.stop()


def last_sampling(gw):
    return gw.decode.calls.decodes[-1].sampling


def test_the_worker_gets_the_files_defaults_over_http(gw):
    body = {"model": "tiny", "prompt": "hi"}
    out = httpx.post(f"{gw.http_url}/v1/completions", json=body, timeout=30).json()
    assert out["usage"]["completion_tokens"] == 3
    sent = last_sampling(gw)
    assert sent.max_tokens == 3 and sent.temperature == 0.0 and sent.top_k == 7
    assert sent.top_p == 0.5 and sent.repetition_penalty == pytest.approx(1.2)
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0.5, "max_tokens": 5}
    out = httpx.post(f"{gw.http_url}/v1/chat/completions", json=body, timeout=30).json()
    assert out["usage"]["completion_tokens"] == 5
    sent = last_sampling(gw)
    assert (sent.temperature, sent.max_tokens, sent.top_k) == (0.5, 5, 7)


def test_the_worker_gets_the_files_defaults_over_grpc(gw):
    with GatewayClient(gw.grpc_address, timeout=30) as client:
        result = client.generate("hi", GenerationOptions())
        assert result.usage.completion_tokens == 3
        assert (last_sampling(gw).temperature, last_sampling(gw).top_k) == (0.0, 7)
        result = client.generate("hi", GenerationOptions(max_tokens=4, top_k=2))
        assert result.usage.completion_tokens == 4 and last_sampling(gw).top_k == 2
