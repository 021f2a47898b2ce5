"""Real `pdserve prefill` and `pdserve decode` processes on free 127.0.0.1 ports, tiny model.

Drives Prefill then Decode over gRPC: tokens equal the offline engine's greedy tokens, block
counts return to full on both sides, cancelling mid-stream frees blocks, SIGTERM exits cleanly.
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

import pytest
from cluster_token import worker_channel

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
PROMPT = list(range(20, 61))  # 41 tokens: 3 blocks of 16
MAX_TOKENS = 10
ENGINE_FLAGS = ["--kv-cache-memory", "1MiB", "--device", "cpu", "--block-size", "16"]
LISTENING = re.compile(r"listening on (\S+:\d+)")


class Worker:
    def __init__(self, role: str, model: Path, log_path: Path, *extra: str) -> None:
        argv = [sys.executable, "-m", "pdserve.cli", role, "--port", "0", "--model", str(model)]
        argv += ["--engine-id", f"{role}-it", *ENGINE_FLAGS, *extra]
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = ""

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)

    def wait_listening(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.log_tail()}")
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                continue
            match = LISTENING.search(line)
            if match:
                self.address = match.group(1)
                return self.address
        raise TimeoutError(f"worker did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-3000:]

    def terminate(self, timeout: float = 30.0) -> int:
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
def workers(tiny_llama, tmp_path_factory):
    logs = tmp_path_factory.mktemp("worker-logs")
    p = Worker("prefill", tiny_llama, logs / "prefill.log", "--kv-lease-ms", "20000")
    d = Worker("decode", tiny_llama, logs / "decode.log")
    try:
        p.wait_listening()
        d.wait_listening()
        yield p, d
    finally:
        codes = (p.terminate(), d.terminate())
        # A clean SIGTERM drain exits 0; anything else is a failure of its own.
        assert codes == (0, 0), f"exit codes {codes}\n{p.log_tail()}\n{d.log_tail()}"


@pytest.fixture(scope="module")
def offline_tokens(tiny_llama) -> list[int]:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=1 << 20, device="cpu"))
    engine.add_request("ref", PROMPT, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def stubs(workers):
    p, d = workers
    pc, dc = worker_channel(p.address), worker_channel(d.address)
    return pc, dc, worker_pb2_grpc.PrefillServiceStub(pc), worker_pb2_grpc.DecodeServiceStub(dc)


def wait_clean(stub, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        s = stub.GetDebugState(common_pb2.GetDebugStateRequest(), timeout=5)
        clean = (
            s.num_free_blocks == s.num_blocks
            and s.num_held_leases == 0
            and s.num_running == 0
            and s.num_pending_imports == 0
            and s.num_shm_segments == 0
        )
        if clean or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_prefill_then_decode_matches_offline_and_frees_everything(workers, offline_tokens):
    pc, dc, pstub, dstub = stubs(workers)
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    reply = pstub.Prefill(
        worker_pb2.PrefillRequest(transfer_id="it-1", prompt_token_ids=PROMPT, sampling=params),
        timeout=60,
    )
    assert reply.handle.first_token == offline_tokens[0]
    assert len(reply.handle.block_ids) == 3
    held = pstub.GetDebugState(common_pb2.GetDebugStateRequest(), timeout=5)
    assert list(held.held_transfer_ids) == ["it-1"] and held.num_free_blocks < held.num_blocks
    req = worker_pb2.DecodeRequest(
        request_id="it-1", prompt_token_ids=PROMPT, sampling=params, kv_handle=reply.handle
    )
    chunks = list(dstub.Decode(req, timeout=60))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == offline_tokens
    assert chunks[-1].finish_reason in (
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    )
    for stub in (pstub, dstub):
        state = wait_clean(stub)
        assert state.num_free_blocks == state.num_blocks, state
        assert state.num_held_leases == 0 and state.num_shm_segments == 0, state
    pc.close()
    dc.close()


def test_cancel_mid_stream_frees_blocks_on_both_sides(workers):
    pc, dc, pstub, dstub = stubs(workers)
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    reply = pstub.Prefill(
        worker_pb2.PrefillRequest(transfer_id="it-2", prompt_token_ids=PROMPT, sampling=params),
        timeout=60,
    )
    req = worker_pb2.DecodeRequest(
        request_id="it-2", prompt_token_ids=PROMPT, sampling=params, kv_handle=reply.handle
    )
    call = dstub.Decode(req, timeout=60)
    seen = 0
    for chunk in call:
        seen += len(chunk.token_ids)
        if seen >= 3:
            break
    call.cancel()
    busy = dstub.GetDebugState(common_pb2.GetDebugStateRequest(), timeout=5)
    for stub in (pstub, dstub):
        state = wait_clean(stub)
        assert state.num_free_blocks == state.num_blocks, (busy, state)
        assert state.num_running == 0 and state.num_active_streams == 0, state
    pc.close()
    dc.close()
