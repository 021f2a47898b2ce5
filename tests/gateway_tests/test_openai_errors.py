"""The OpenAI routes' bad-input battery over raw HTTP: 4xx with OpenAI's error body, never 422,
and the server keeps serving afterwards."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
)

from gateway.tokenizer import GatewayTokenizer

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"), max_position_embeddings=64)
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    workers = [FakeWorker("prefill", reply, eos).start(), FakeWorker("decode", reply, eos).start()]
    harness = GatewayHarness(
        make_config(
            folder, workers[:1], workers[1:], api_key=API_KEY, max_body_bytes=64 * 1024, max_n=4
        )
    )
    harness.workers = workers
    harness.http = httpx.Client(base_url=harness.http_url, headers=AUTH, timeout=20)
    yield harness
    harness.http.close()
    harness.close()
    for w in workers:
        w.stop()


def post(gw, path, body, **kw):
    if not isinstance(body, (str, bytes)):
        body = json.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json", **kw.pop("headers", {})}
    return gw.http.post(path, content=body, headers=headers, **kw)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


def assert_still_serving(gw):
    ok = post(gw, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


COMPLETION_BAD = [
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "n": 1.5}, "n"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 5}, "n"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": [1, 2, 10**7]}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"999999999": 1.0}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"prompt": "hi", "allowed_token_ids": [5, 10**7]}, "allowed_token_ids"),
    ({"prompt": "hi", "allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(40)]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"prompt": "a\u0000b"}, "prompt"),
    ({"temperature": 0.5}, "prompt"),
    ({"prompt": "hi", "stop_token_ids": [10**7]}, "stop_token_ids"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("body,param", COMPLETION_BAD)
def test_bad_completion_requests_are_400(gw, body, param):
    assert_error(post(gw, "/v1/completions", body), 400, param)


def test_temperature_nan_is_400(gw):
    assert_error(post(gw, "/v1/completions", '{"prompt": "hi", "temperature": NaN}'), 400)


@pytest.mark.parametrize("body", ["{not json", "[]", '"a string"', "null", "", "[1, 2]"])
def test_malformed_or_non_object_bodies_are_400(gw, body):
    assert_error(post(gw, "/v1/completions", body), 400)
    assert_error(post(gw, "/v1/chat/completions", body), 400)


CHAT_BAD = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": 5}]}, None),
    ({"messages": [{"role": "user", "content": "x\u0000"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "top_logprobs"),
    (
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50},
        "top_logprobs",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "hi"}], "bad_words": ["  "]}, "bad_words"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 1e39}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "no_such_field": 1}, "no_such_field"),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema"},
        },
        "response_format",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}], "guided_json": {"type": "nope"}},
        "guided_json",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(("}},
        "structured_outputs",
    ),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "guided_regex": "a",
            "guided_choice": ["a"],
        },
        "guided_choice",
    ),
]


@pytest.mark.parametrize("body,param", CHAT_BAD)
def test_bad_chat_requests_are_400(gw, body, param):
    assert_error(post(gw, "/v1/chat/completions", body), 400, param)


def test_prompt_over_the_context_is_400_with_lengths(gw):
    response = post(gw, "/v1/completions", {"prompt": "x" * 30, "max_tokens": 40})
    assert_error(response, 400)
    message = response.json()["error"]["message"]
    assert "64" in message and "70" in message and "30" in message
    assert_error(post(gw, "/v1/completions", {"prompt": "y" * 200}), 400)


def test_unknown_model_is_404(gw):
    response = post(gw, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})
    assert_error(response, 404, "model")
    assert_error(
        post(
            gw,
            "/v1/chat/completions",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        ),
        404,
    )


def test_unknown_route_is_404_with_error_body(gw):
    assert_error(gw.http.get("/v1/nothing-here"), 404)


def test_wrong_or_missing_api_key_is_401(gw):
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}, {}):
        response = httpx.post(
            f"{gw.http_url}/v1/completions", json={"prompt": "hi"}, headers=headers
        )
        assert_error(response, 401)
    assert_error(httpx.get(f"{gw.http_url}/v1/models"), 401)
    assert httpx.get(f"{gw.http_url}/health").status_code == 200  # not under /v1


def test_body_over_the_limit_is_413(gw):
    big = json.dumps({"prompt": "x" * (70 * 1024)})
    assert_error(post(gw, "/v1/completions", big), 413)


def test_overload_is_429_with_retry_after(gw):
    core = gw.core
    old = core.config
    core.config = replace(old, max_pending=1)
    gw.workers[1].token_delay_s = 0.05
    try:
        with gw.http.stream(
            "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 50, "stream": True}
        ) as held:
            lines = held.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)
            assert core.num_in_flight == 1
            response = post(gw, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
            assert_error(response, 429)
            assert response.headers["Retry-After"] == "1"
    finally:
        gw.workers[1].token_delay_s = 0.0
        core.config = old


def test_server_still_serves_after_the_battery(gw):
    assert_still_serving(gw)
