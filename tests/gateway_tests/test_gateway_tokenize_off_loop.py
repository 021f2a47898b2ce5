"""Tokenizing runs off the event loop and only below a byte cap: a 5 MB prompt is refused
before tokenizing (it took 6.8 s to get its 400, stalling every client), and other clients are
answered while a large prompt is being tokenized."""

from __future__ import annotations

import threading

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

CAP = 1_200_000
BIG = "hello world, the quick brown fox. " * 30_000  # 1.02 MB: about a second to tokenize


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    workers = [FakeWorker("decode", reply, eos).start()]
    harness = GatewayHarness(make_config(folder, [], workers, max_prompt_bytes=CAP))
    harness.workers = workers
    yield harness
    harness.close()
    for w in workers:
        w.stop()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_a_prompt_past_the_byte_cap_is_refused_before_tokenizing(gw, route):
    text = "x" * 5_000_000
    body = {"model": "tiny", "max_tokens": 1}
    body |= (
        {"messages": [{"role": "user", "content": text}]} if "chat" in route else {"prompt": text}
    )
    calls = []
    encode = gw.core.tokenizer.encode
    gw.core.tokenizer.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    try:
        resp = httpx.post(f"{gw.http_url}{route}", json=body, timeout=30)
    finally:
        gw.core.tokenizer.encode = encode
    assert resp.status_code == 400, resp.text
    assert f"at most {CAP} are tokenized" in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] in ("prompt", "messages")
    assert calls == []


def test_other_clients_are_served_while_a_large_prompt_is_tokenized(gw):
    big: dict[str, object] = {}
    encoding, encoded = threading.Event(), threading.Event()
    encode = gw.core.tokenizer.encode

    def watched_encode(*args, **kwargs):
        encoding.set()
        try:
            return encode(*args, **kwargs)
        finally:
            encoded.set()

    def send_big() -> None:
        big["resp"] = httpx.post(f"{gw.http_url}/tokenize",
                                 json={"model": "tiny", "prompt": BIG}, timeout=60)  # fmt: skip

    gw.core.tokenizer.encode = watched_encode
    thread = threading.Thread(target=send_big)
    try:
        thread.start()
        assert encoding.wait(30)
        answered_during = 0
        with httpx.Client(base_url=gw.http_url, timeout=30) as client:
            while not encoded.is_set():
                assert client.get("/health").status_code == 200
                answered_during += not encoded.is_set()
        thread.join()
    finally:
        gw.core.tokenizer.encode = encode
    assert big["resp"].status_code == 200 and big["resp"].json()["count"] > 100_000
    # With tokenizing on the event loop, /health waited for it: no answer while it ran.
    assert answered_during >= 3, answered_during
