"""Progress deadline on Prefill: a prefill worker that stops answering (frozen: even GetLoad
hangs) has its Prefill abandoned after about two progress periods and the prompt is prefilled on
the decode worker; a slow but alive one is waited for (the only cap used to be the 300 s
prefill timeout)."""

from __future__ import annotations

import time

import httpx
import pytest
from test_gateway_fakes import (
    REPLY,
    FakeWorker,
    GatewayHarness,
    build_tiny_model_folder,
    make_config,
    wait_until,
)

from gateway.tokenizer import GatewayTokenizer

LONG_PROMPT = "a prompt that is long enough to be prefilled remotely"
PROGRESS_S = 0.5


@pytest.fixture
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    prefill, decode = (
        FakeWorker("prefill", reply, eos).start(),
        FakeWorker("decode", reply, eos).start(),
    )
    harness = GatewayHarness(make_config(folder, [prefill], [decode], min_prefill_tokens=4,
                                         prefill_progress_s=PROGRESS_S))  # fmt: skip
    harness.prefill, harness.decode = prefill, decode
    harness.poll()
    yield harness
    prefill.prefill_delay_s = prefill.load_delay_s = 0.0
    harness.close()
    prefill.stop()
    decode.stop()


def complete(gw) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    body = {"prompt": LONG_PROMPT, "max_tokens": 4, "ignore_eos": True}
    resp = httpx.post(f"{gw.http_url}/v1/completions", json=body, timeout=60)
    return resp, time.monotonic() - started


def test_a_frozen_prefill_worker_is_abandoned_for_local_prefill(gw):
    gw.prefill.prefill_delay_s = 30.0  # frozen: neither answers nor reports its load
    gw.prefill.load_delay_s = 30.0
    resp, seconds = complete(gw)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 4
    decode = gw.decode.calls.decodes[-1]
    assert not decode.HasField("kv_handle")  # prefilled on the decode worker
    assert seconds < 10 * PROGRESS_S, seconds  # not the 30 s freeze, nor the 300 s timeout
    # The abandoned prefill's lease is released (the worker would free it on expiry anyway).
    wait_until(lambda: decode.request_id in "".join(gw.prefill.calls.releases), timeout=40)
    assert not gw.server.pool.healthy("prefill")  # new requests avoid it until a poll succeeds


def test_a_slow_but_alive_prefill_worker_is_waited_for(gw):
    gw.prefill.prefill_delay_s = 6 * PROGRESS_S  # busy, but it reports its load
    resp, seconds = complete(gw)
    assert resp.status_code == 200, resp.text
    assert gw.decode.calls.decodes[-1].HasField("kv_handle")  # the remote prefill was used
    assert seconds >= 6 * PROGRESS_S
