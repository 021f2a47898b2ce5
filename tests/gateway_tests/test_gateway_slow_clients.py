"""Slow clients: a request head that never completes has its connection closed, a body shorter
than its Content-Length gets 408, connections past the cap are closed when accepted, and none
of this cuts a slow answer to a fast client (50 slow-header connections stayed open for 60 s
and a short body was held forever before)."""

from __future__ import annotations

import socket
import time

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

TIMEOUT_S = 0.5
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    reply, eos = tok.encode(REPLY), tok.eos_token_ids[0]
    workers = [FakeWorker("decode", reply, eos).start()]
    config = make_config(folder, [], workers, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S,
                         max_connections=MAX_CONNECTIONS)  # fmt: skip
    harness = GatewayHarness(config)
    harness.workers = workers
    yield harness
    harness.close()
    for w in workers:
        w.stop()


def connect(gw) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.server.http_port), timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (EOF), reading whatever it sends; None if not."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_a_request_head_that_never_completes_is_closed(gw):
    sock = connect(gw)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a byte now and then does not keep it open
        time.sleep(0.1)
        sock.sendall(b"X")
    assert closed_within(sock, 5) is not None
    sock.close()


def test_a_body_shorter_than_its_content_length_gets_408(gw):
    sock = connect(gw)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
    sock.settimeout(5)
    answer = b""
    while chunk := sock.recv(4096):  # the head and the body may come in separate segments
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.5 s" in answer


def test_connections_past_the_cap_are_closed_and_the_gateway_recovers(gw):
    idle = [connect(gw) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.1)
    extra = connect(gw)
    assert closed_within(extra, 0.3) is not None  # refused at once
    extra.close()
    for sock in idle:  # the idle ones go at the head deadline
        assert closed_within(sock, 5) is not None
        sock.close()
    assert httpx.get(f"{gw.http_url}/health", timeout=5).status_code == 200


def test_a_slow_answer_outlives_the_timeouts(gw):
    gw.workers[0].token_delay_s = 0.1
    try:
        with httpx.Client(base_url=gw.http_url, timeout=30) as client:
            for _ in range(2):  # twice on one keep-alive connection
                body = {
                    "prompt": "hello there",
                    "max_tokens": 12,
                    "ignore_eos": True,
                    "stream": True,
                }
                started = time.monotonic()
                with client.stream("POST", "/v1/completions", json=body) as resp:
                    lines = [line for line in resp.iter_lines() if line]
                assert time.monotonic() - started > 2 * TIMEOUT_S
                assert lines[-1] == "data: [DONE]" and len(lines) >= 12
    finally:
        gw.workers[0].token_delay_s = 0.0
