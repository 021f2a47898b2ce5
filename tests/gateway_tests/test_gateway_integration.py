"""Gateway + prefill + decode as real processes on free 127.0.0.1 ports, tiny random Llama.

Greedy text through the gateway (OpenAI client and gRPC client) equals the offline `LLM`;
streaming adds up to the same text; cancelling mid-stream frees blocks on both workers.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from cluster_token import worker_channel
from test_workers_integration import Worker, wait_clean

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from pdserve.client import GatewayClient, GenerationOptions
from protos.pdserve.v1 import worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"gateway listening on http (\S+:\d+), grpc (\S+:\d+)")
LONG_PROMPT = "the quick brown fox jumps over the lazy dog and prefill on one worker"
SHORT_PROMPT = "hello"
MAX_TOKENS = 12


class GatewayProcess:
    def __init__(
        self, model: Path, prefill: str, decode: str, log_path: Path, *extra: str
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "gateway",
            "--model",
            str(model),
            "--prefill",
            prefill,
            "--decode",
            decode,
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--min-prefill-tokens",
            "8",
            "--served-model-name",
            "tiny",
            "--load-interval",
            "0.2",
            "--log-level",
            "warning",
            *extra,
        ]
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.http = self.grpc = ""

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)

    def wait_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log_tail()}")
            try:
                match = LISTENING.search(self._lines.get(timeout=0.2))
            except queue.Empty:
                continue
            if match:
                self.http, self.grpc = f"http://{match.group(1)}", match.group(2)
                return
        raise TimeoutError(f"gateway did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-3000:]

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-it-logs")
    p = Worker("prefill", tiny_llama, logs / "prefill.log", "--kv-lease-ms", "20000")
    d = Worker("decode", tiny_llama, logs / "decode.log")
    g = None
    try:
        p.wait_listening()
        d.wait_listening()
        g = GatewayProcess(tiny_llama, p.address, d.address, logs / "gateway.log")
        g.wait_listening()
        wait_healthy(g.http)
        yield p, d, g
    finally:
        codes = [g.terminate()] if g is not None else []
        codes += [p.terminate(), d.terminate()]
        assert codes == [0] * len(codes), (codes, g.log_tail() if g else "")


def wait_healthy(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(httpx.get(f"{url}/health").text)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def offline(tiny_llama):
    llm = LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = llm.generate([LONG_PROMPT, SHORT_PROMPT], params, use_tqdm=False)
    return {o.prompt: o.outputs[0] for o in outs}


def _metric(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def remote_prefills(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('pdserve:disaggregated_requests_total{model_name="tiny",prefill="remote"}'):
            return float(line.split()[-1])
    return 0.0


def test_greedy_text_equals_offline_llm(cluster, offline):
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    before = remote_prefills(g.http)
    for prompt in (LONG_PROMPT, SHORT_PROMPT):
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0
        )
        assert out.choices[0].text == offline[prompt].text, prompt
    assert remote_prefills(g.http) == before + 1  # the long prompt went through the prefill worker
    with GatewayClient(g.grpc, timeout=60) as grpc_client:
        result = grpc_client.generate(
            LONG_PROMPT, GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)
        )
    assert result.choices[0].token_ids == offline[LONG_PROMPT].token_ids
    assert result.text == offline[LONG_PROMPT].text


def test_streaming_adds_up_to_the_offline_text(cluster, offline):
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    stream = client.completions.create(
        model="tiny",
        prompt=LONG_PROMPT,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline[LONG_PROMPT].text
    assert chunks[-1].usage.completion_tokens == len(offline[LONG_PROMPT].token_ids)
    chat = client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0.0, messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(cluster):
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    runs = [
        client.completions.create(
            model="tiny", prompt=LONG_PROMPT, max_tokens=8, n=2, seed=123, temperature=1.0
        )
        for _ in range(2)
    ]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]


def test_allowed_token_ids_logit_bias_and_bad_words_hold_on_both_workers(cluster):
    """The prefill worker samples the first token, the decode worker the rest: both apply the
    token edits, streamed or not."""
    _, _, g = cluster
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    allowed = [7, 9, 11]
    for stream in (False, True):
        out = client.completions.create(
            model="tiny", prompt=LONG_PROMPT, max_tokens=6, temperature=1.0, seed=5,
            logprobs=0, stream=stream, extra_body={"allowed_token_ids": allowed,
                                                    "return_tokens_as_token_ids": True},
        )  # fmt: skip
        chunks = list(out) if stream else [out]
        tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
        assert len(tokens) == 6 and {int(t.split(":")[1]) for t in tokens} <= set(allowed)
    forced = client.completions.create(
        model="tiny", prompt=LONG_PROMPT, max_tokens=4, temperature=0.0, logprobs=0,
        extra_body={"logit_bias": {"42": 100}, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    assert forced.choices[0].logprobs.tokens == ["token_id:42"] * 4

    def tokens(**extra) -> list[int]:
        out = client.completions.create(
            model="tiny", prompt=LONG_PROMPT, max_tokens=8, temperature=0.0, logprobs=0,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True, **extra},
        )  # fmt: skip
        return [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]

    def spells_back(token: int) -> str | None:
        text = httpx.post(f"{g.http}/detokenize", json={"tokens": [token]}).json()["prompt"]
        ids = httpx.post(
            f"{g.http}/tokenize", json={"prompt": text, "add_special_tokens": False}
        ).json()["tokens"]
        return text if ids == [token] and text.strip() else None

    reference = tokens()
    token, word = next((t, w) for t in reference if (w := spells_back(t)) is not None)
    assert token not in tokens(bad_words=[word])


def test_disconnect_mid_stream_frees_blocks_on_both_workers(cluster):
    p, d, g = cluster
    body = {
        "model": "tiny",
        "prompt": LONG_PROMPT,
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
    }
    with httpx.stream("POST", f"{g.http}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):  # a few tokens in
            next(lines)
    for address in (p.address, d.address):
        channel = worker_channel(address)
        stub = (
            worker_pb2_grpc.PrefillServiceStub
            if address == p.address
            else worker_pb2_grpc.DecodeServiceStub
        )(channel)
        state = wait_clean(stub, timeout=20)
        assert state.num_free_blocks == state.num_blocks, state
        assert state.num_held_leases == 0 and state.num_running == 0, state
        channel.close()
    assert 'finished_reason="abort"' in httpx.get(f"{g.http}/metrics").text


def test_sixteen_concurrent_disaggregated_requests_equal_offline(cluster, tiny_llama):
    """16 different long prompts at once (batched on both workers) give the offline greedy text."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, g = cluster
    prompts = [f"{LONG_PROMPT} number {i} and the lazy dog" for i in range(16)]
    llm = LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu")
    expected = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)]
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    before = remote_prefills(g.http)

    def one(prompt: str) -> str:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        return out.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == expected
    assert remote_prefills(g.http) == before + 16


def test_seeded_sampling_equals_single_process(cluster, tiny_llama):
    """A seeded sample through prefill worker -> KV pull -> decode worker equals one engine's."""
    _, _, g = cluster
    llm = LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu")
    params = SamplingParams(temperature=1.0, seed=4242, max_tokens=10, ignore_eos=True)
    expected = llm.generate(LONG_PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    with GatewayClient(g.grpc, timeout=60) as grpc_client:
        result = grpc_client.generate(
            LONG_PROMPT, GenerationOptions(max_tokens=10, temperature=1.0, seed=4242, ignore_eos=True)
        )
    assert result.choices[0].token_ids == expected


def test_one_both_worker_behind_the_gateway(tiny_llama, offline, tmp_path):
    """`pdserve both` named as the gateway's prefill and its decode worker: the long prompt is
    prefilled remotely (on it) and decoded on it, greedy text equal to offline, blocks all back."""
    b = Worker("both", tiny_llama, tmp_path / "both.log", "--kv-lease-ms", "20000")
    g = None
    try:
        b.wait_listening()
        g = GatewayProcess(tiny_llama, b.address, b.address, tmp_path / "gateway.log")
        g.wait_listening()
        wait_healthy(g.http)
        client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
        before = remote_prefills(g.http)
        for prompt in (LONG_PROMPT, SHORT_PROMPT):
            out = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0
            )
            assert out.choices[0].text == offline[prompt].text, prompt
        assert remote_prefills(g.http) == before + 1
        # The in-pool copy of the long prompt's blocks is reported like a pull, under the
        # worker's decode entry.
        series = f'pdserve:kv_transfer_bytes_total{{model_name="tiny",role="decode",worker="{b.address}"}}'
        deadline = time.monotonic() + 15
        while _metric(g.http, series) <= 0:
            assert time.monotonic() < deadline, httpx.get(f"{g.http}/metrics").text[-3000:]
            time.sleep(0.3)
        with worker_channel(b.address) as channel:
            for stub in (
                worker_pb2_grpc.PrefillServiceStub(channel),
                worker_pb2_grpc.DecodeServiceStub(channel),
            ):
                state = wait_clean(stub)
                assert state.num_free_blocks == state.num_blocks and state.num_held_leases == 0
    finally:
        codes = [g.terminate()] if g is not None else []
        codes.append(b.terminate())
        assert codes == [0] * len(codes), (codes, b.log_tail())


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_tokens_text_is_dropped_as_offline(cluster, tiny_llama, include):
    """The token a request stops on (stop_token_ids) is not in the text unless
    include_stop_str_in_output, through the gateway (disaggregated and local prefill, streaming
    or not) as offline; its id is still counted. The first stop is the prefill worker's token."""
    _, _, g = cluster
    llm = LLM(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu")
    client = openai.OpenAI(base_url=f"{g.http}/v1", api_key="unused")
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for prompt in (LONG_PROMPT, SHORT_PROMPT):
        ref = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
        for stop in (ref[0], ref[3]):
            params = greedy.clone(stop_token_ids=[stop], include_stop_str_in_output=include)
            want = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
            assert want.token_ids == ref[: ref.index(stop) + 1]
            assert want.text == llm.tokenizer.decode(want.token_ids[: None if include else -1])
            extra = {"ignore_eos": True, "stop_token_ids": [stop],
                     "include_stop_str_in_output": include}
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                            temperature=0.0, extra_body=extra)
            assert out.choices[0].text == want.text, (prompt, stop)
            assert out.usage.completion_tokens == len(want.token_ids)
            assert (out.choices[0].finish_reason, out.choices[0].stop_reason) == ("stop", stop)
            chunks = list(client.completions.create(
                model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                stream=True, extra_body=extra))
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
