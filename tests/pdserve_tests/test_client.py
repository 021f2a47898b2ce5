"""pdserve.client against a gateway with fake workers: sync and asyncio, streaming and not,
cancellation, chat messages, errors and model info."""

from __future__ import annotations

import asyncio

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
from pdserve.client import (
    AsyncGatewayClient,
    GatewayCallError,
    GatewayClient,
    GenerationOptions,
    build_request,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    folder = build_tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    tok = GatewayTokenizer(folder)
    decode = FakeWorker("decode", tok.encode(REPLY), tok.eos_token_ids[0]).start()
    harness = GatewayHarness(make_config(folder, [], [decode]))
    harness.decode, harness.tok = decode, tok
    yield harness
    harness.close()
    decode.stop()


def test_sync_generate_with_chat_messages_and_model_info(gw):
    with GatewayClient(gw.grpc_address, timeout=10) as client:
        result = client.generate(
            messages=[{"role": "user", "content": "hi"}],
            options=GenerationOptions(max_tokens=4, logprobs=1),
        )
        info = client.model_info()
    assert result.text == "Hello" and result.choices[0].finish_reason == "length"
    assert [lp.logprob for lp in result.choices[0].logprobs] == [-0.5] * 4
    assert len(result.choices[0].logprobs[0].top) == 1
    prompt = gw.tok.decode(result.prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert (info.model, info.max_model_len, info.vocab_size) == ("tiny", 256, gw.tok.vocab_size)
    assert info.has_chat_template and info.max_logprobs == 20


def test_async_stream_generate_and_cancel(gw):
    async def scenario():
        async with AsyncGatewayClient(gw.grpc_address, timeout=10) as client:
            whole = await client.generate([5, 6, 7], GenerationOptions(max_tokens=3, n=2))
            gw.decode.token_delay_s = 0.05
            async with client.stream("hi", GenerationOptions(max_tokens=200)) as stream:
                seen = 0
                async for chunk in stream:
                    seen += len(chunk.token_ids)
                    if seen == 3:
                        break
            return whole, seen

    try:
        whole, seen = asyncio.run(scenario())
    finally:
        gw.decode.token_delay_s = 0.0
    assert [c.text for c in whole.choices] == ["Hell", "Hell"]
    assert whole.usage.prompt_tokens == 3 and whole.usage.total_tokens == 9
    assert seen == 3
    wait_until(lambda: len(gw.decode.calls.aborts) == 1)
    wait_until(lambda: gw.core.num_in_flight == 0)


def test_errors_carry_the_status_code(gw):
    with GatewayClient(gw.grpc_address, timeout=10) as client:
        with pytest.raises(GatewayCallError) as err:
            client.generate("", GenerationOptions(max_tokens=2))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in err.value.message


def test_request_needs_exactly_one_prompt_kind():
    with pytest.raises(ValueError):
        build_request(None, None, None, None)
    with pytest.raises(ValueError):
        build_request("a", [{"role": "user", "content": "b"}], None, None)
    request = build_request([1, 2], None, GenerationOptions(temperature=0.0, stop=("x",)), "id")
    assert request.WhichOneof("prompt") == "token_ids" and request.request_id == "id"
    assert request.params.HasField("temperature") and not request.params.HasField("top_p")


def test_grpc_health_and_reflection_are_served(gw):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gw.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="pdserve.v1.Gateway"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in answer.list_services_response.service}
        assert {"pdserve.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_example_script_runs(gw):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [
            sys.executable,
            "examples/grpc_client.py",
            "--address",
            gw.grpc_address,
            "--max-tokens",
            "4",
            "hi",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "-> 'Hello'" in out.stdout and "cancelled after 5 tokens" in out.stdout
