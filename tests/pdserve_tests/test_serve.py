"""`pdserve serve` end to end: a real cluster on a tiny random-weight model, on free ports.

One cluster (1 prefill + 1 decode) serves a completion and a short `pdserve bench serve` run;
an aggregated cluster is stopped with SIGTERM while under load. Every process must exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pdserve.cli import main as pdserve_main

READY_TIMEOUT_S = 240.0


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc (ppid links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.add(pid)
            todo.append(pid)
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Cluster:
    proc: subprocess.Popen
    log: Path
    base_url: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "serve | ready" not in self.text():
            assert self.proc.poll() is None, f"pdserve serve exited:\n{self.text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{self.text()[-4000:]}"
            time.sleep(0.5)

    def stop_and_check_no_survivors(self) -> None:
        family = descendants(self.proc.pid)
        assert len(family) >= 4, f"expected watchers and children, got {family}"
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=90) == 0, self.text()[-4000:]
        deadline = time.monotonic() + 10
        while (alive := [p for p in family if is_running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"processes left behind: {alive}"
        assert "serve | all processes exited" in self.text()


def start_cluster(model: Path, tmp: Path, *extra: str) -> Cluster:
    http, grpc_port, prefill, decode = free_ports(4)
    argv = [sys.executable, "-m", "pdserve.cli", "serve", "--model", str(model),
            "--port", str(http), "--grpc-port", str(grpc_port), "--prefill-port", str(prefill),
            "--decode-port", str(decode), "--kv-cache-memory", "16MiB", "--max-model-len", "256",
            "--drain-timeout", "10", "--ready-timeout", str(READY_TIMEOUT_S), *extra]  # fmt: skip
    log = tmp / "serve.log"
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    return Cluster(proc, log, f"http://127.0.0.1:{http}")


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator:
    made: list[Cluster] = []

    def make(model: Path, *extra: str) -> Cluster:
        made.append(start_cluster(model, tmp_path, *extra))
        return made[-1]

    yield make
    for c in made:  # a failed test must not leave a cluster running
        if c.proc.poll() is None:
            family = descendants(c.proc.pid)
            c.proc.kill()
            c.proc.wait()
            for pid in family:
                if is_running(pid):
                    os.kill(pid, signal.SIGKILL)


def generated_tokens(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("pdserve:generation_tokens_total{")]
    return float(lines[0].split()[1]) if lines else 0.0


def bench_args(base_url: str, result: Path, *extra: str) -> list[str]:
    return ["bench", "serve", "--base-url", base_url, "--random-input-len", "24",
            "--random-output-len", "8", "--ignore-eos", "--disable-tqdm",
            "--result-dir", str(result.parent), "--result-filename", result.name, *extra]  # fmt: skip


def test_serve_answers_a_completion_and_a_bench_run_then_stops_cleanly(
    tiny_llama: Path, cluster_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(tiny_llama)
    cluster.wait_ready()
    text = cluster.text()
    for role in ("prefill-0", "decode-0", "gateway"):
        assert f"{role} | " in text, role
    assert f"curl {cluster.base_url}/v1/completions" in text

    body = {"model": tiny_llama.name, "prompt": "hello world", "max_tokens": 5, "ignore_eos": True}
    resp = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 5

    result = tmp_path / "bench.json"
    argv = bench_args(cluster.base_url, result, "--num-prompts", "12", "--max-concurrency", "4")
    assert pdserve_main(argv) == 0
    data = json.loads(result.read_text())
    assert (data["completed"], data["failed"]) == (12, 0)
    assert data["model_id"] == tiny_llama.name
    assert data["total_output_tokens"] == 12 * 8
    assert data["total_input_tokens"] >= 12 * 24  # the server's own count of the prompts
    assert 0 < data["mean_ttft_ms"] < data["mean_e2el_ms"]
    assert data["mean_itl_ms"] > 0 and data["request_throughput"] > 0

    # A `vllm bench serve` command line on a local ShareGPT file runs unchanged.
    words = "the quick brown fox jumps over the lazy dog".split()
    conversations = [
        {"conversations": [{"from": "human", "value": " ".join(words[: 4 + i % 5] * 2)},
                           {"from": "gpt", "value": " ".join(words[: 4 + i % 3])}]}
        for i in range(8)
    ] + [{"conversations": [{"from": "human", "value": "too short"}]}]  # fmt: skip
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps(conversations))
    for backend in ("vllm", "openai-chat"):
        result = tmp_path / f"sharegpt-{backend}.json"
        argv = ["bench", "serve", "--backend", backend, "--base-url", cluster.base_url,
                "--model", tiny_llama.name, "--tokenizer", str(tiny_llama), "--dataset-name",
                "sharegpt", "--dataset-path", str(sharegpt), "--num-prompts", "6",
                "--ignore-eos", "--disable-tqdm", "--result-dir", str(tmp_path),
                "--result-filename", result.name]  # fmt: skip
        assert pdserve_main(argv) == 0, backend
        data = json.loads(result.read_text())
        assert (data["completed"], data["failed"], data["backend"]) == (6, 0, backend)
        assert data["endpoint"] == ("/v1/chat/completions" if backend == "openai-chat"
                                    else "/v1/completions")  # fmt: skip

    cluster.stop_and_check_no_survivors()
    assert "stopping gateway (SIGTERM)" in cluster.text()
    assert "killing" not in cluster.text()


def test_sigterm_under_load_ends_every_request_and_process(
    tiny_llama: Path, cluster_factory, tmp_path: Path
) -> None:
    cluster = cluster_factory(tiny_llama, "--aggregated")
    cluster.wait_ready()
    assert "prefill-0" not in cluster.text()
    result = tmp_path / "load.json"
    argv = bench_args(cluster.base_url, result, "--num-prompts", "400", "--request-rate", "40",
                      "--random-output-len", "32")  # fmt: skip
    bench = subprocess.Popen([sys.executable, "-m", "pdserve.cli", *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while generated_tokens(cluster.base_url) < 50:  # load is flowing: stop in the middle
            assert time.monotonic() < deadline and bench.poll() is None, "no load reached it"
            time.sleep(0.2)
        cluster.stop_and_check_no_survivors()
        out, _ = bench.communicate(timeout=120)  # no request may hang
    finally:
        if bench.poll() is None:
            bench.kill()
    data = json.loads(result.read_text())
    assert data["completed"] + data["failed"] == 400, out[-3000:]
    assert data["completed"] > 0 and data["failed"] > 0  # stopped part-way through
    # Requests in flight at the signal were drained; later ones found the port closed, or a
    # pooled keep-alive connection closed under them before any answer: connection errors raised
    # before a response head, never an HTTP error or a stream cut mid-answer.
    assert data["errors"] and all("before any answer" in e for e in data["errors"]), data["errors"]
    assert not any(e.startswith("HTTP ") for e in data["errors"]), data["errors"]


def test_serve_passes_speculative_config_to_the_decode_worker(
    tiny_llama: Path, cluster_factory
) -> None:
    """`--speculative-config` on `pdserve serve`: the decode worker speculates (the model as its
    own draft, so every proposal is accepted), the greedy text equals plain offline decoding and
    the gateway's /metrics shows the counters."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    spec = {"method": "draft_model", "model": str(tiny_llama), "num_speculative_tokens": 3}
    cluster = cluster_factory(tiny_llama, "--speculative-config", json.dumps(spec))
    cluster.wait_ready()
    prompt = [5, 17, 42, 99, 3, 250, 77, 12, 5, 17, 42, 99]
    body = {"model": tiny_llama.name, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip
    resp = httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    offline = LLM(str(tiny_llama), kv_cache_memory=16 << 20, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    expected = offline.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert resp.json()["choices"][0]["text"] == expected[0].outputs[0].text

    def counter(name: str) -> float:
        for line in httpx.get(f"{cluster.base_url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"pdserve:spec_decode_{name}_total{{"):
                return float(line.split()[-1])
        return 0.0

    deadline = time.monotonic() + 20
    while counter("num_draft_tokens") == 0:  # load reports arrive every few hundred ms
        assert time.monotonic() < deadline, "no speculation reached /metrics"
        time.sleep(0.3)
    assert counter("num_accepted_tokens") == counter("num_draft_tokens")
    cluster.stop_and_check_no_survivors()
