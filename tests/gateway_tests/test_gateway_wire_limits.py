"""Numbers past what the worker protocol carries get a 400 naming the field (they used to
overflow a protobuf int32 in the gateway: 500), and fan-out (prompts x n) counts toward
--max-pending (429 with Retry-After, not a 500 from the workers after seconds)."""

from __future__ import annotations

import httpx
import pytest
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
)

from contract.limits import FLOAT32_MAX, INT32_MAX, UINT32_MAX
from contract.sampling import SAMPLING_FIELDS
from gateway.tokenizer import GatewayTokenizer


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"), max_position_embeddings=64)
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    workers = [FakeWorker("prefill", reply, eos).start(), FakeWorker("decode", reply, eos).start()]
    harness = GatewayHarness(make_config(folder, workers[:1], workers[1:], max_pending=32))
    harness.workers = workers
    harness.http = httpx.Client(base_url=harness.http_url, timeout=20)
    yield harness
    harness.http.close()
    harness.close()
    for w in workers:
        w.stop()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 2, "top_k": INT32_MAX + 1}, "top_k"),
        ({"max_tokens": None, "min_tokens": 8589934592}, "min_tokens"),
        ({"max_tokens": UINT32_MAX + 1}, "max_tokens"),
        ({"max_tokens": 2, "temperature": FLOAT32_MAX * 10}, "temperature"),
        ({"max_tokens": 2, "presence_penalty": -1e300}, "presence_penalty"),
        ({"max_tokens": 2, "seed": 2**64}, "seed"),
        ({"max_tokens": 2, "logprobs": 2**40}, "logprobs"),
        ({"max_tokens": 2, "stop_token_ids": [2**33]}, "stop_token_ids"),
    ],
)
def test_numbers_the_wire_cannot_carry_get_a_400_naming_the_field(gw, extra, param):
    resp = gw.http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    chat = gw.http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "hi"}], **extra})  # fmt: skip
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"]["param"] == param


def test_every_numeric_worker_field_declares_what_the_wire_carries():
    numeric = [
        f
        for f in SAMPLING_FIELDS
        if f.to_worker
        and not isinstance(f.example, bool)
        and (
            isinstance(f.example, (int, float))
            or (isinstance(f.example, tuple) and all(isinstance(x, int) for x in f.example))
        )  # tuple: a list of numbers
    ]
    assert numeric and all(f.carries is not None for f in numeric), [
        f.name for f in numeric if f.carries is None
    ]


def test_fan_out_counts_toward_max_pending(gw):
    # 200 prompts x n=16 = 3200 sequences: refused at the door, before tokenizing anything.
    body = {"model": "tiny", "prompt": ["hi"] * 200, "n": 4, "max_tokens": 1}
    resp = gw.http.post("/v1/completions", json=body)
    assert resp.status_code == 429, resp.text
    assert resp.headers["Retry-After"] == "1"
    assert "800 sequences" in resp.json()["error"]["message"]
    # 8 prompts x n=4 = 32 fits exactly; one more prompt does not.
    ok = gw.http.post("/v1/completions", json={**body, "prompt": ["hi"] * 8})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"]) == 32
    assert gw.http.post("/v1/completions", json={**body, "prompt": ["hi"] * 9}).status_code == 429
    assert gw.core.num_sequences == 0
