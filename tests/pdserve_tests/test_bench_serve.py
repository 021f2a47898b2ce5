"""`pdserve bench serve` against a fake OpenAI-compatible streaming server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.bench.arrivals import arrival_offsets
from pdserve.bench.client import RequestOutput
from pdserve.bench.datasets import RandomDatasetConfig, random_requests
from pdserve.bench.metrics import calculate_metrics, parse_goodput, percentile_key
from pdserve.cli import main

TOKEN_DELAY_S = 0.003
API_KEY = "test-key"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class FakeState:
    fail_every: int | None = None  # the n-th, 2n-th, ... request gets a 500
    payloads: list[dict] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(body: dict, state: FakeState, chat: bool) -> Iterator[str]:
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        n = body.get("max_completion_tokens" if chat else "max_tokens") or 16
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        for i in range(n):
            await asyncio.sleep(TOKEN_DELAY_S)
            piece = f" tok{i}"
            choice = (
                {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            )
            yield _sse({"id": "x", "choices": [choice]})
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
        yield _sse({"id": "x", "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        state.in_flight -= 1


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/_state")
    async def get_state() -> dict:
        return dataclasses.asdict(state)

    @app.post("/_reset")
    async def reset() -> dict:
        state.payloads.clear()
        state.auth.clear()
        state.fail_every, state.max_in_flight = None, 0
        return {}

    @app.post("/_fail_every/{n}")
    async def set_fail_every(n: int) -> dict:
        state.fail_every = n
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def handle(request: Request, chat: bool):  # noqa: ANN202
        body = await request.json()
        state.payloads.append(body)
        state.auth.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if state.fail_every and len(state.payloads) % state.fail_every == 0:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        return StreamingResponse(_stream(body, state, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):  # noqa: ANN202
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # noqa: ANN202
        return await handle(request, chat=True)

    return app


def serve_fake(state: FakeState) -> None:
    """Runs the fake server on a free 127.0.0.1 port and prints the port (subprocess entry)."""
    sock = socket.socket()
    # Inherited by accepted connections; without it small SSE writes wait on delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(fake_app(state), log_level="warning")).run(sockets=[sock])


@dataclass
class FakeServer:
    """Handle on the fake server subprocess (its own process, so timings are not GIL-bound)."""

    url: str

    def state(self) -> dict:
        return httpx.get(f"{self.url}/_state").json()

    def fail_every(self, n: int) -> None:
        httpx.post(f"{self.url}/_fail_every/{n}").raise_for_status()


@pytest.fixture(scope="module")
def fake_server_process() -> Iterator[FakeServer]:
    proc = subprocess.Popen([sys.executable, __file__], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        server = FakeServer(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while True:
            try:
                server.state()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "fake server down"
                time.sleep(0.05)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def fake_server(fake_server_process: FakeServer) -> FakeServer:
    httpx.post(f"{fake_server_process.url}/_reset").raise_for_status()
    return fake_server_process


def bench(base_url: str, *extra: str) -> int:
    return main(
        ["bench", "serve", "--base-url", base_url, "--api-key", API_KEY, "--disable-tqdm", *extra]
    )


def test_completions_run_saves_vllm_keys_and_plots(fake_server, tmp_path: Path) -> None:
    url = fake_server.url
    rc = bench(
        url, "--num-prompts", "12", "--random-input-len", "20", "--random-output-len", "6",
        "--max-concurrency", "3", "--goodput", "ttft:10000", "tpot:10000", "e2el:10000",
        "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", "r.json", "--plot", str(tmp_path / "plots"),
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert result[f"{stat}_{name}_ms"] >= 0, f"{stat}_{name}_ms"
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["model_id"] == "fake-model"  # picked from /v1/models
    assert result["total_output_tokens"] == 12 * 6
    state = fake_server.state()
    main_payloads = state["payloads"][1:]  # the first is the endpoint check
    assert result["total_input_tokens"] == sum(len(p["prompt"].split()) for p in main_payloads)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["output_throughput"] == pytest.approx(72 / result["duration"])
    assert result["mean_itl_ms"] >= TOKEN_DELAY_S * 1000 * 0.8
    assert result["mean_tpot_ms"] >= TOKEN_DELAY_S * 1000 * 0.8
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"] > 0
    assert result["max_concurrent_requests"] >= 1
    assert state["max_in_flight"] <= 3
    first = main_payloads[0]
    assert first["stream"] is True and first["stream_options"] == {"include_usage": True}
    assert first["ignore_eos"] is True and first["max_tokens"] == 6
    assert set(state["auth"]) == {f"Bearer {API_KEY}"}
    for png in ("latency_cdf.png", "throughput.png", "concurrency.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:8] == PNG_MAGIC


def test_chat_endpoint_with_jsonl_prompts_and_poisson_arrivals(fake_server, tmp_path: Path) -> None:
    url = fake_server.url
    data = tmp_path / "prompts.jsonl"
    data.write_text('"hello there"\n{"prompt": "one two three", "output_tokens": 3}\n')
    rc = bench(
        url, "--endpoint", "/v1/chat/completions", "--model", "fake-model",
        "--dataset-name", str(data), "--num-prompts", "6", "--custom-output-len", "4",
        "--request-rate", "200", "--burstiness", "0.5", "--save-result",
        "--save-detailed", "--result-dir", str(tmp_path), "--result-filename", "c.json",
    )  # fmt: skip
    assert rc == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["backend"] == "openai-chat" and result["request_rate"] == 200
    assert result["completed"] == 6
    assert sorted(result["output_lens"]) == [3, 3, 3, 4, 4, 4]
    pairs = zip(result["itls"], result["output_lens"], strict=True)
    assert len(result["itls"]) == 6 and all(len(itl) == n - 1 for itl, n in pairs)
    payloads = fake_server.state()["payloads"]
    assert all(p["messages"][0]["role"] == "user" for p in payloads)
    assert all("max_completion_tokens" in p for p in payloads)


def test_failed_requests_are_counted_not_fatal(fake_server, tmp_path: Path) -> None:
    url = fake_server.url
    fake_server.fail_every(4)  # requests 4 and 8 of 1 check + 8 fail
    rc = bench(
        url,
        "--num-prompts",
        "8",
        "--random-input-len",
        "5",
        "--random-output-len",
        "2",
        "--result-dir",
        str(tmp_path),
        "--result-filename",
        "f.json",
    )
    result = json.loads((tmp_path / "f.json").read_text())
    assert rc == 0
    assert (result["completed"], result["failed"]) == (6, 2)
    assert result["errors"] == ['HTTP 500: {"error":{"message":"boom"}}']


def test_rejected_endpoint_check_exits_nonzero(fake_server, capsys) -> None:
    url = fake_server.url
    rc = main(
        [
            "bench",
            "serve",
            "--base-url",
            url,
            "--api-key",
            "wrong",
            "--num-prompts",
            "2",
            "--disable-tqdm",
        ]
    )
    assert rc == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_bad_flags_are_clear_errors(capsys) -> None:
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--goodput", "ttft=5"])
    assert rc == 2
    assert "--goodput expects NAME:MS" in capsys.readouterr().err


def test_poisson_arrivals_have_the_requested_rate() -> None:
    offsets = arrival_offsets(4000, request_rate=20.0, burstiness=1.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert offsets[0] == 0.0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.05)
    assert arrival_offsets(3, math.inf, 1.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, 0.0, 0)


def test_random_prompt_lengths_follow_the_range_ratio() -> None:
    cfg = RandomDatasetConfig(num_prompts=50, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    reqs = random_requests(cfg, tokenizer=None)
    assert all(20 <= r.prompt_len <= 60 and 5 <= r.expected_output_len <= 15 for r in reqs)
    assert len({r.prompt for r in reqs}) == 50
    with pytest.raises(ValueError, match="range_ratio"):
        RandomDatasetConfig(num_prompts=1, range_ratio=1.0)


def test_metrics_follow_vllm_definitions() -> None:
    out = RequestOutput(
        success=True,
        prompt_len=10,
        output_tokens=5,
        start_time=100.0,
        ttft=0.5,
        itl=[0.1] * 4,
        latency=0.9,
        chunk_times=[100.5, 100.6, 100.7, 100.8, 100.9],
    )
    failed = RequestOutput(success=False, error="x", start_time=100.0, latency=0.1)
    m = calculate_metrics([out, failed], 2.0, 100.0, [50, 99.9], goodput_slo_ms={"ttft": 400})
    assert (m.completed, m.failed, m.total_input, m.total_output) == (1, 1, 10, 5)
    assert m.latencies["tpot"].mean == pytest.approx(100.0)  # (0.9 - 0.5) / 4 s
    assert m.latencies["ttft"].percentiles[99.9] == pytest.approx(500.0)
    assert m.request_goodput == 0.0  # TTFT 500 ms misses the 400 ms SLO
    assert m.max_output_tokens_per_s == 5 and m.max_concurrent_requests == 1
    assert percentile_key(99.9) == "p99.9" and percentile_key(99.0) == "p99"
    assert parse_goodput(["ttft:5", "e2el:7.5"]) == {"ttft": 5.0, "e2el": 7.5}


if __name__ == "__main__":
    serve_fake(FakeState())


def test_bench_compare_script_runs_both_servers_and_prints_ratios(fake_server, tmp_path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PDSERVE_URL=fake_server.url, LLAMACPP_URL=fake_server.url,
               ROUNDS="2", PLOTS="0", OUT_DIR=str(tmp_path / "cmp"))  # fmt: skip
    extra = ["--api-key", API_KEY, "--num-prompts", "4", "--random-input-len", "5",
             "--random-output-len", "3", "--request-rate", "inf"]  # fmt: skip
    done = subprocess.run([str(root / "scripts" / "bench_compare.sh"), *extra], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "cmp").glob("*.json"))
    assert names == ["llama.cpp-r1.json", "llama.cpp-r2.json", "pdserve-r1.json", "pdserve-r2.json"]
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["metric", "pdserve-r1", "llama.cpp-r1"]
    assert "llama.cpp-r1/pdserve-r1" in header
    completed = next(r for r in rows if r.startswith("completed requests")).split()
    assert completed[2:6] == ["4", "4", "4", "4"] and completed[6] == "1.00x"
    order = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("== ")]
    assert order == ["pdserve", "llama.cpp", "llama.cpp", "pdserve"]  # rounds alternate


def test_sweep_table_plot_and_flags(tmp_path) -> None:
    from pdserve.bench.sweep import SweepRow, markdown_table, parse_args, plot

    args = parse_args(["--request-rates", "1,2.5", "--deployments", "disagg,aggregated",
                       "--serve-args", "--model /m --kv-cache-memory 64MiB", "--",
                       "--num-prompts", "8"])  # fmt: skip
    assert args.request_rates == [1.0, 2.5] and args.deployments == ["disagg", "aggregated"]
    assert args.serve_args == ["--model", "/m", "--kv-cache-memory", "64MiB"]
    assert args.bench_args == ["--num-prompts", "8"]
    with pytest.raises(SystemExit):
        parse_args(["--deployments", "nonsense"])
    rows = [SweepRow(d, r, f"{d}-{r}.json", {"p99_ttft_ms": 10.0 * r, "p99_itl_ms": 2.0 * r,
                                              "completed": 8, "failed": 0})
            for d in ("disagg", "aggregated") for r in (1.0, 2.5)]  # fmt: skip
    table = markdown_table(rows).splitlines()
    assert table[0].startswith("| deployment | req/s offered | completed | failed |")
    assert table[2].startswith("| disagg | 1 | 8 | 0 |") and len(table) == 6
    assert plot(rows, tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_tokenizer_gives_random_prompts_of_the_asked_token_length(
    tiny_llama: Path, fake_server, tmp_path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = RandomDatasetConfig(num_prompts=10, input_len=60, output_len=4, seed=2)
    lens = [r.prompt_len for r in random_requests(cfg, tokenizer)]
    assert all(57 <= n <= 63 for n in lens), lens
    rc = bench(fake_server.url, "--tokenizer", str(tiny_llama), "--num-prompts", "3",
               "--random-input-len", "20", "--random-output-len", "2",
               "--result-dir", str(tmp_path), "--result-filename", "t.json")  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "t.json").read_text())["tokenizer_id"] == str(tiny_llama)


def test_sweep_seed_base_is_the_last_seed_flag() -> None:
    from pdserve.bench.sweep import _base_seed

    assert _base_seed(["--num-prompts", "8"]) == 0
    assert _base_seed(["--seed", "3", "--ignore-eos", "--seed", "7"]) == 7


def test_sharegpt_samples_follow_vllms_filter(tmp_path: Path) -> None:
    from pdserve.bench.datasets import sharegpt_requests

    def conv(prompt: str, answer: str) -> dict:
        return {"conversations": [{"from": "human", "value": prompt},
                                  {"from": "gpt", "value": answer}]}  # fmt: skip

    rows = [conv("a b c d e", "one two three four"), conv("a b", "one two three four"),
            conv("a b c d", "one"), {"conversations": [{"from": "human", "value": "x y z w"}]},
            conv("w " * 1100, "one two three four"), "not a conversation"]  # fmt: skip
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    out = sharegpt_requests(path, 10, None, seed=0)
    assert [(s.prompt, s.prompt_len, s.expected_output_len) for s in out] == [
        ("a b c d e", 5, 4)
    ]  # short prompt, short answer, one turn, too long prompt: all skipped
    fixed = sharegpt_requests(path, 10, None, seed=0, fixed_output_len=7)
    assert sorted((s.prompt_len, s.expected_output_len) for s in fixed) == [(4, 7), (5, 7)]
    with pytest.raises(ValueError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        sharegpt_requests(tmp_path / "bad.json", 1, None, seed=0)


def test_backend_and_endpoint_must_agree(capsys) -> None:
    rc = main(["bench", "serve", "--backend", "openai-chat", "--endpoint", "/v1/completions",
               "--base-url", "http://127.0.0.1:1", "--disable-tqdm"])  # fmt: skip
    assert rc == 2
    assert "does not send to" in capsys.readouterr().err
