"""`--generation-config` through real processes: one decode worker and two gateways on a copy of
the tiny random Llama whose generation_config.json sets temperature 0.0 and max_new_tokens 3.

The `auto` gateway (the default) answers a request without max_tokens with 3 tokens and samples
it greedily; a request's own max_tokens and temperature win. The `vllm` gateway ignores the
file: OpenAI's 16 tokens and temperature 1.0.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from test_gateway_integration import GatewayProcess, wait_healthy
from test_workers_integration import Worker

from contract.generation_config import GENERATION_CONFIG_FILE
from pdserve.client import GatewayClient, GenerationOptions

PROMPT = "the quick brown fox"
NO_EOS = {"ignore_eos": True}  # lengths are then exact


@pytest.fixture(scope="module")
def model(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("genconf") / "tiny"
    shutil.copytree(tiny_llama, folder)
    path = folder / GENERATION_CONFIG_FILE
    content = json.loads(path.read_text())  # bos/eos as transformers saved them
    content.update(temperature=0.0, max_new_tokens=3)
    path.write_text(json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def gateways(model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("genconf-logs")
    d = Worker("decode", model, logs / "decode.log")
    started: list[GatewayProcess] = []
    try:
        d.wait_listening()
        for mode in ("auto", "vllm"):
            extra = () if mode == "auto" else ("--generation-config", mode)
            g = GatewayProcess(model, "", d.address, logs / f"gateway-{mode}.log", *extra)
            started.append(g)
            g.wait_listening()
            wait_healthy(g.http)
        yield {"auto": started[0], "vllm": started[1]}
    finally:
        codes = [g.terminate() for g in started] + [d.terminate()]
        assert codes == [0] * len(codes), (codes, [g.log_tail() for g in started])


def client(g: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")


def completion_tokens(g: GatewayProcess, **kwargs) -> int:
    out = client(g).completions.create(model="tiny", prompt=PROMPT, extra_body=NO_EOS, **kwargs)
    assert out.choices[0].finish_reason == "length"
    return out.usage.completion_tokens


def texts(g: GatewayProcess, **kwargs) -> list[str]:
    out = client(g).completions.create(model="tiny", prompt=PROMPT, extra_body=NO_EOS, **kwargs)
    return [c.text for c in out.choices]


def test_auto_takes_max_new_tokens_as_the_default_max_tokens(gateways):
    g = gateways["auto"]
    assert completion_tokens(g) == 3
    assert completion_tokens(g, max_tokens=5) == 5  # the request's value wins
    chat = client(g).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body=NO_EOS
    )
    assert chat.usage.completion_tokens == 3
    with GatewayClient(g.grpc, timeout=60) as grpc_client:  # the gRPC front door too
        result = grpc_client.generate(PROMPT, GenerationOptions(ignore_eos=True))
    assert result.usage.completion_tokens == 3


def test_auto_samples_at_the_files_temperature(gateways):
    g = gateways["auto"]
    greedy = texts(g, max_tokens=4, temperature=0.0)
    assert texts(g, max_tokens=4, n=4) == greedy * 4  # temperature 0.0 from the file
    sampled = texts(g, max_tokens=4, n=4, temperature=1.0, seed=7)  # the request's wins
    assert len(set(sampled)) > 1


def test_vllm_ignores_the_file(gateways):
    g = gateways["vllm"]
    assert completion_tokens(g) == 16  # OpenAI's default for completions
    assert completion_tokens(g, max_tokens=5) == 5
    assert len(set(texts(g, max_tokens=4, n=4, seed=7))) > 1  # temperature 1.0
