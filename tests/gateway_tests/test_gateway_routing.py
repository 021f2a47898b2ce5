"""Gateway core over gRPC against fake workers: routing, fallback, stop strings, cancellation."""

from __future__ import annotations

import grpc
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
from pdserve.client import GatewayCallError, GatewayClient, GenerationOptions

LONG_PROMPT = "a prompt that is long enough to be prefilled remotely"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(folder):
    return GatewayTokenizer(folder)


class Cluster:
    def __init__(self, folder, tok, num_prefill=1, num_decode=1, **config):
        reply = tok.encode(REPLY)
        eos = tok.eos_token_ids[0]
        self.prefill = [FakeWorker("prefill", reply, eos).start() for _ in range(num_prefill)]
        self.decode = [FakeWorker("decode", reply, eos).start() for _ in range(num_decode)]
        config.setdefault("min_prefill_tokens", 8)
        self.gateway = GatewayHarness(make_config(folder, self.prefill, self.decode, **config))
        self.client = GatewayClient(self.gateway.grpc_address, timeout=20)

    def close(self):
        self.client.close()
        self.gateway.close()
        for w in self.prefill + self.decode:
            w.stop()


@pytest.fixture
def cluster(folder, tok):
    made = []

    def make(**kw):
        made.append(Cluster(folder, tok, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_long_prompt_is_prefilled_remotely_and_handle_passed_to_decode(cluster, tok):
    c = cluster()
    n_reply = len(tok.encode(REPLY))
    result = c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=n_reply))
    assert result.text == REPLY
    assert result.choices[0].finish_reason == "length"
    (prefill,) = c.prefill[0].calls.prefills
    (decode,) = c.decode[0].calls.decodes
    assert decode.HasField("kv_handle")
    assert decode.kv_handle.transfer_id == prefill.transfer_id != ""
    assert list(decode.prompt_token_ids) == list(prefill.prompt_token_ids)
    assert list(decode.prompt_token_ids) == tok.encode(LONG_PROMPT)
    assert result.usage.prompt_tokens == len(tok.encode(LONG_PROMPT))
    assert result.usage.completion_tokens == n_reply
    c.gateway.settle()
    assert c.decode[0].calls.aborts == [] and c.prefill[0].calls.releases == []


def test_short_prompt_is_prefilled_on_the_decode_worker(cluster):
    c = cluster(min_prefill_tokens=100)
    c.client.generate("short", GenerationOptions(max_tokens=3))
    assert c.prefill[0].calls.prefills == []
    (decode,) = c.decode[0].calls.decodes
    assert not decode.HasField("kv_handle")


def test_no_healthy_prefill_worker_falls_back_to_local_prefill(cluster):
    c = cluster()
    c.prefill[0].stop()
    c.gateway.poll()
    assert not c.gateway.server.pool.healthy("prefill")
    result = c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=3))
    assert result.choices[0].finish_reason == "length"
    assert not c.decode[0].calls.decodes[0].HasField("kv_handle")


def test_failing_prefill_worker_goes_unhealthy_and_request_falls_back(cluster):
    c = cluster()
    c.prefill[0].fail_with = grpc.StatusCode.UNAVAILABLE
    result = c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=3))
    assert len(result.choices[0].token_ids) == 3
    assert len(c.prefill[0].calls.prefills) == 1
    assert not c.decode[0].calls.decodes[0].HasField("kv_handle")
    assert not c.gateway.server.pool.healthy("prefill")


def test_an_unreachable_prefill_worker_is_skipped_for_the_next_one(cluster):
    c = cluster(num_prefill=2, router="round-robin")
    first, second = sorted(c.prefill, key=lambda w: w.address)  # round-robin's first turn
    first.fail_with = grpc.StatusCode.UNAVAILABLE
    result = c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=3))
    assert len(result.choices[0].token_ids) == 3
    assert (len(first.calls.prefills), len(second.calls.prefills)) == (1, 1)
    assert c.decode[0].calls.decodes[0].HasField("kv_handle")
    assert [w.address for w in c.gateway.server.pool.healthy("prefill")] == [second.address]


def test_routes_to_the_least_loaded_workers(cluster):
    c = cluster(num_prefill=2, num_decode=2)
    c.prefill[0].queue_depth, c.decode[1].queue_depth = 7, 7
    c.gateway.poll()
    c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=2))
    assert (len(c.prefill[0].calls.prefills), len(c.prefill[1].calls.prefills)) == (0, 1)
    assert (len(c.decode[0].calls.decodes), len(c.decode[1].calls.decodes)) == (1, 0)
    # equal queue depth: the lower KV usage wins
    c.prefill[0].queue_depth = c.decode[1].queue_depth = 0
    c.decode[0].kv_cache_usage = 0.9
    c.gateway.poll()
    c.client.generate("short", GenerationOptions(max_tokens=2))
    assert len(c.decode[1].calls.decodes) == 1


def test_stop_string_spanning_tokens_truncates_and_aborts_decode(cluster):
    c = cluster()
    result = c.client.generate("hi", GenerationOptions(max_tokens=40, stop=("lo wor",)))
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == ("Hel", "stop", "lo wor")
    c.gateway.settle()
    assert c.decode[0].calls.aborts == [c.decode[0].calls.decodes[0].request_id]


def test_stop_string_included_when_asked(cluster):
    c = cluster()
    options = GenerationOptions(max_tokens=40, stop=("✓",), include_stop_str_in_output=True)
    result = c.client.generate("hi", options)
    assert result.text == REPLY[: REPLY.index("✓") + 1]


def test_streamed_text_is_whole_characters_and_adds_up(cluster, tok):
    c = cluster()
    n_reply = len(tok.encode(REPLY))
    with c.client.stream("hi", GenerationOptions(max_tokens=n_reply)) as stream:
        chunks = list(stream)
    texts = [ch.text for ch in chunks if ch.usage is None]
    assert "".join(texts) == REPLY
    assert all("\ufffd" not in t for t in texts)
    assert chunks[0].prompt_token_ids == tuple(tok.encode("hi"))
    assert chunks[-1].usage.completion_tokens == n_reply


def test_client_cancel_aborts_decode_and_releases_prefill(cluster):
    c = cluster()
    c.decode[0].token_delay_s = 0.05
    with c.client.stream(LONG_PROMPT, GenerationOptions(max_tokens=200)) as stream:
        for i, _ in enumerate(stream):
            if i == 2:
                stream.cancel()
                break
    decode = c.decode[0].calls.decodes[0]
    wait_until(lambda: c.decode[0].calls.aborts == [decode.request_id])
    wait_until(lambda: c.prefill[0].calls.releases == [decode.kv_handle.transfer_id])
    wait_until(lambda: c.gateway.core.num_in_flight == 0)


def test_overload_is_refused_before_tokenizing(cluster):
    c = cluster(max_pending=1)
    c.decode[0].token_delay_s = 0.05
    core = c.gateway.core
    calls = []
    encode = core.tokenizer.encode
    core.tokenizer.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    try:
        with c.client.stream("hi", GenerationOptions(max_tokens=100)) as held:
            next(iter(held))
            assert len(calls) == 1
            with pytest.raises(GatewayCallError) as err:
                c.client.generate("hi", GenerationOptions(max_tokens=2))
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(calls) == 1  # the refused request was never tokenized
    finally:
        core.tokenizer.encode = encode


def test_n_fans_out_with_distinct_seeds_and_transfer_ids(cluster):
    c = cluster()
    result = c.client.generate(LONG_PROMPT, GenerationOptions(max_tokens=3, n=2, seed=41))
    assert [ch.index for ch in result.choices] == [0, 1]
    decodes = sorted(c.decode[0].calls.decodes, key=lambda d: d.request_id)
    assert [d.sampling.seed for d in decodes] == [41, 42]
    assert len({d.request_id for d in decodes}) == 2
    assert len({d.kv_handle.transfer_id for d in decodes}) == 2
    assert result.usage.completion_tokens == 6


def test_abort_by_request_id_ends_the_stream(cluster):
    c = cluster()
    c.decode[0].token_delay_s = 0.05
    with c.client.stream("hi", GenerationOptions(max_tokens=200), request_id="mine") as stream:
        chunks = iter(stream)
        next(chunks)
        assert c.client.abort("mine") is True
        rest = list(chunks)
    assert rest[-2].finish_reason == "abort"
    wait_until(lambda: c.decode[0].calls.aborts == ["mine-0"])
    assert c.client.abort("mine") is False


def test_client_deadline_aborts_the_request(cluster):
    c = cluster()
    c.decode[0].token_delay_s = 0.05
    with pytest.raises(GatewayCallError) as err:
        c.client.generate("hi", GenerationOptions(max_tokens=200), timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: len(c.decode[0].calls.aborts) == 1)


def test_decode_worker_failure_is_unavailable_and_marks_it_unhealthy(cluster):
    c = cluster()
    c.decode[0].fail_with = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(GatewayCallError) as err:
        c.client.generate("hi", GenerationOptions(max_tokens=2))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert not c.gateway.server.pool.healthy("decode")
    with pytest.raises(GatewayCallError) as err:
        c.client.generate("hi", GenerationOptions(max_tokens=2))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_invalid_parameters_are_invalid_argument(cluster):
    c = cluster()
    for options in (
        GenerationOptions(temperature=-1.0),
        GenerationOptions(n=0),
        GenerationOptions(max_tokens=10_000),
        GenerationOptions(stop=("",)),
    ):
        with pytest.raises(GatewayCallError) as err:
            c.client.generate("hi", options)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, options
    with pytest.raises(GatewayCallError) as err:
        c.client.generate([10**6])
    assert "out of vocabulary" in err.value.message
    assert c.decode[0].calls.decodes == []
