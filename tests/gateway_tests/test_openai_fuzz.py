"""Property-based fuzz of the OpenAI routes (hypothesis): whatever the body, the answer is 200 or
a 4xx with OpenAI's error body — never a 5xx, never FastAPI's 422 — and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
)

from gateway.tokenizer import GatewayTokenizer

FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "stream",
    "stream_options",
    "user",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "suffix",
    "best_of",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "x"])}, optional={"content": values}
)
plausible = {
    "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 400), max_size=5) | values,
    "messages": st.lists(message, max_size=3) | values,
    "max_tokens": st.integers(-2, 300) | values,
    "n": st.integers(-1, 20) | values,
}
bodies = st.fixed_dictionaries({}, optional={name: plausible.get(name, values) for name in FIELDS})


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"), max_position_embeddings=64)
    tok = GatewayTokenizer(folder)
    decode = FakeWorker("decode", tok.encode(REPLY), tok.eos_token_ids[0]).start()
    harness = GatewayHarness(make_config(folder, [], [decode], max_n=4))
    harness.http = httpx.Client(base_url=harness.http_url, timeout=20)
    yield harness
    harness.http.close()
    harness.close()
    decode.stop()


def check(response: httpx.Response, body) -> None:
    assert response.status_code in (200, 400, 404), (body, response.text)
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, chat=st.booleans())
def test_no_body_gets_a_5xx_or_422(gw, body, chat):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    payload = json.dumps(body, allow_nan=True)  # NaN/Infinity too: the JSON parser must cope
    check(gw.http.post(path, content=payload, headers={"Content-Type": "application/json"}), body)


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes_are_a_400(gw, raw):
    response = gw.http.post(
        "/v1/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    check(response, raw)


def test_still_serving_after_the_fuzz(gw):
    ok = gw.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "He"
    assert gw.core.num_in_flight == 0
