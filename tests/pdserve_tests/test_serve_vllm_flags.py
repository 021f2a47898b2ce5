"""`vllm serve` command lines against `pdserve serve`: the model as a positional argument,
--tokenizer, --max-logprobs and several --served-model-name values, through one real cluster
(1 prefill + 1 decode + gateway) on a tiny model, asked with the official `openai` client."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import READY_TIMEOUT_S, Cluster, descendants, free_ports, is_running

from worker.config import DecodeWorkerConfig
from worker.wire import sampling_params_from_pb

NAMES = ("alpha", "beta")
TEMPLATE_MARK = "TOKFOLDER"
MAX_LOGPROBS = 3


def tokenizer_folder(model: Path, where: Path) -> Path:
    """The model's tokenizer files in a folder of their own, with a chat template the model's
    folder does not have: answers rendered with it show the gateway read this folder."""
    where.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model / name).is_file():
            shutil.copy(model / name, where / name)
    (where / "chat_template.jinja").write_text(
        TEMPLATE_MARK + " {% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    return where


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("vllm_flags")
    tok = tokenizer_folder(tiny_llama, tmp / "tok")
    http, grpc_port, prefill, decode = free_ports(4)
    argv = [sys.executable, "-m", "pdserve.cli", "serve", str(tiny_llama),  # positional, as vLLM
            "--tokenizer", str(tok), "--max-logprobs", str(MAX_LOGPROBS),
            "--served-model-name", *NAMES,
            "--port", str(http), "--grpc-port", str(grpc_port), "--prefill-port", str(prefill),
            "--decode-port", str(decode), "--kv-cache-memory", "16MiB", "--max-model-len", "256",
            "--drain-timeout", "10", "--ready-timeout", str(READY_TIMEOUT_S)]  # fmt: skip
    log = tmp / "serve.log"
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    c = Cluster(proc, log, f"http://127.0.0.1:{http}")
    try:
        c.wait_ready()
        yield c
        c.stop_and_check_no_survivors()
    finally:
        if proc.poll() is None:
            family = descendants(proc.pid)
            proc.kill()
            proc.wait()
            for pid in family:
                if is_running(pid):
                    os.kill(pid, 9)


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0)


def test_every_served_name_is_listed_and_accepted_and_answers_carry_the_first(
    cluster: Cluster, client: openai.OpenAI
) -> None:
    assert [m.id for m in client.models.list().data] == list(NAMES)
    assert f"model {NAMES[0]!r}" in cluster.text()  # the banner names the first
    for name in NAMES:
        out = client.completions.create(model=name, prompt="hello", max_tokens=3)
        assert out.model == NAMES[0]
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.model == NAMES[0]
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gamma", prompt="hello", max_tokens=3)
    assert err.value.body["param"] == "model"


def test_max_logprobs_caps_logprobs_and_top_logprobs_with_a_400_naming_the_field(
    client: openai.OpenAI,
) -> None:
    out = client.completions.create(model="beta", prompt="hello", max_tokens=2,
                                    logprobs=MAX_LOGPROBS)  # fmt: skip
    assert all(len(top) >= MAX_LOGPROBS for top in out.choices[0].logprobs.top_logprobs)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="beta", prompt="hello", max_tokens=2,
                                  logprobs=MAX_LOGPROBS + 1)  # fmt: skip
    assert err.value.body["param"] == "logprobs"
    assert f"[0, {MAX_LOGPROBS}]" in err.value.body["message"]
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="alpha", messages=messages, max_tokens=2,
                                          logprobs=True, top_logprobs=MAX_LOGPROBS)  # fmt: skip
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == MAX_LOGPROBS
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="alpha", messages=messages, max_tokens=2,
                                       logprobs=True, top_logprobs=MAX_LOGPROBS + 1)  # fmt: skip
    assert err.value.body["param"] == "top_logprobs"


def test_the_gateway_renders_with_the_tokenizer_folder(cluster: Cluster) -> None:
    url = cluster.base_url
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    text = f"{TEMPLATE_MARK} hi"
    plain = [
        httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": special}).json()
        for special in (False, True)
    ]
    assert chat.json()["tokens"] in [p["tokens"] for p in plain]


NEW_HISTOGRAMS = (
    "pdserve:request_prefill_time_seconds",
    "pdserve:request_decode_time_seconds",
    "pdserve:request_time_per_output_token_seconds",
)


def test_every_metrics_series_carries_the_model_name(cluster: Cluster, client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="beta", prompt="hello", max_tokens=6,
                              extra_body={"ignore_eos": True})  # fmt: skip
    text = httpx.get(f"{cluster.base_url}/metrics", timeout=10).text
    families = {
        f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("pdserve:")
    }
    samples = [s for f in families.values() for s in f.samples]
    assert len(families) >= 20 and samples
    unlabelled = sorted({s.name for s in samples if s.labels.get("model_name") != NAMES[0]})
    assert not unlabelled, unlabelled
    for name in (*NEW_HISTOGRAMS, "pdserve:prefix_cache_queries", "pdserve:prefix_cache_hits"):
        assert name in families, name
    for name in NEW_HISTOGRAMS:
        count = [s.value for s in families[name].samples if s.name == f"{name}_count"]
        assert count and count[0] >= 1, (name, count)
    tpot_sum = [s.value for s in families[NEW_HISTOGRAMS[2]].samples if s.name.endswith("_sum")]
    assert tpot_sum[0] > 0


def test_a_worker_refuses_more_logprobs_than_its_cap() -> None:
    from protos.pdserve.v1 import common_pb2

    assert sampling_params_from_pb(common_pb2.SamplingParams(logprobs=2), 2).logprobs == 2
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 2\], got 3"):
        sampling_params_from_pb(common_pb2.SamplingParams(logprobs=3), 2)
    with pytest.raises(ValueError, match="max_logprobs"):
        DecodeWorkerConfig(max_logprobs=21)


def test_serve_refuses_a_model_twice_and_a_missing_tokenizer(tiny_llama: Path, tmp_path) -> None:
    from pdserve.cli import main

    base = ["serve", str(tiny_llama)]
    assert main([*base, "--model", str(tmp_path)]) == 2
    assert main([*base, "--tokenizer", str(tmp_path / "nope")]) == 2
    assert main([*base, "--max-logprobs", "21"]) == 2
