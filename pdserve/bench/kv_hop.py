"""The latency the prefill -> decode hop adds to the first token, on the default model.

    python -m pdserve.bench.kv_hop --prompt-tokens 512 --repeats 5 --output-json hop.json

Starts real worker processes on free 127.0.0.1 ports -- one `pdserve prefill` and two `pdserve
decode` (one with `--kv-transport auto`, which picks shared memory on this host, one with
`--kv-transport grpc`) -- and, in turns, for a fresh random prompt each time (no prefix-cache
hits), measures the time to the first token the client sees:

  engine       single-process engine in this process: add_request + step() until the first token
  local        Decode without a KV handle: the decode worker prefills itself (gRPC, no hop)
  disagg_shm   Prefill on P, then Decode with the handle on D (KV pulled through shared memory)
  disagg_grpc  the same with the KV pulled over gRPC

The hop's added latency is disagg - local, per round (same prompt length, same gRPC client
overhead); the KV pull's own time comes from the decode worker's "kv imported ... ms=" log line.
Also reported: the time to the second token (the first one the decode worker computes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.default_model import resolve_model
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

LISTENING = re.compile(r"listening on (\S+:\d+)")
IMPORTED = re.compile(r"kv imported request_id=(\S+) .*transport=(\S+) bytes=(\d+) ms=([\d.]+)")
PATHS = ("engine", "local", "disagg_shm", "disagg_grpc")


class Worker:
    def __init__(self, role: str, model: Path, log_path: Path, *extra: str) -> None:
        argv = [sys.executable, "-m", "pdserve.cli", role, "--port", "0", "--model", str(model)]
        argv += ["--device", "cpu", "--kv-cache-memory", "512MiB", "--log-level", "INFO", *extra]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)

    def wait_listening(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.log_tail()}")
            try:
                match = LISTENING.search(self._lines.get(timeout=0.2))
            except queue.Empty:
                continue
            if match:
                return match.group(1)
        raise TimeoutError(f"worker did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-3000:]

    def imports(self) -> dict[str, tuple[str, int, float]]:
        """request id -> (transport, bytes, ms) from the decode worker's log."""
        self._log.flush()
        out = {}
        for m in IMPORTED.finditer(self.log_path.read_text()):
            out[m.group(1)] = (m.group(2), int(m.group(3)), float(m.group(4)))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def first_tokens(stream) -> tuple[float, float]:
    """Seconds (from now) to the first and the second token of a Decode stream."""
    start = time.perf_counter()
    times: list[float] = []
    for chunk in stream:
        for _ in chunk.token_ids:
            times.append(time.perf_counter() - start)
    if len(times) < 2:
        raise RuntimeError(f"expected 2 tokens, got {len(times)}")
    return times[0], times[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdserve.bench.kv_hop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (after a warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)

    model = resolve_model(args.model)
    logs = Path(tempfile.mkdtemp(prefix="pdserve-hop-"))
    prefill = Worker("prefill", model, logs / "prefill.log")
    dec_shm = Worker("decode", model, logs / "decode-auto.log", "--kv-transport", "auto")
    dec_grpc = Worker("decode", model, logs / "decode-grpc.log", "--kv-transport", "grpc")
    workers = [prefill, dec_shm, dec_grpc]
    channels: list[grpc.Channel] = []
    try:
        addrs = [w.wait_listening() for w in workers]
        channels = [grpc.insecure_channel(a) for a in addrs]
        pstub = worker_pb2_grpc.PrefillServiceStub(channels[0])
        dstubs = {
            "disagg_shm": worker_pb2_grpc.DecodeServiceStub(channels[1]),
            "disagg_grpc": worker_pb2_grpc.DecodeServiceStub(channels[2]),
        }
        engine = LLMEngine(EngineConfig(model=str(model), device="cpu", kv_cache_memory=512 << 20))
        vocab = engine.vocab_size
        rng = random.Random(args.seed)
        params = common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

        def prompt() -> list[int]:
            return [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]

        engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")  # as in the workers

        def run_engine() -> dict:
            return engine_thread.submit(engine_ttft, prompt()).result()

        def engine_ttft(ids: list[int]) -> dict:
            rid = uuid.uuid4().hex
            start = time.perf_counter()
            engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=1))
            while True:
                outs = engine.step()
                if any(o.request_id == rid and o.new_token_ids for o in outs):
                    ttft = time.perf_counter() - start
                    break
            while engine.has_unfinished_requests():
                engine.step()
            return {"ttft_s": ttft}

        def run_local() -> dict:
            req = worker_pb2.DecodeRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=prompt(), sampling=params
            )
            first, second = first_tokens(dstubs["disagg_grpc"].Decode(req, timeout=300))
            return {"ttft_s": first, "second_token_s": second, "decode_step_s": second - first}

        def run_disagg(path: str) -> dict:
            rid = uuid.uuid4().hex
            ids = prompt()
            start = time.perf_counter()
            reply = pstub.Prefill(
                worker_pb2.PrefillRequest(transfer_id=rid, prompt_token_ids=ids, sampling=params),
                timeout=300,
            )
            prefill_s = time.perf_counter() - start
            req = worker_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=ids, sampling=params, kv_handle=reply.handle
            )
            first, second = first_tokens(dstubs[path].Decode(req, timeout=300))
            return {
                "ttft_s": prefill_s + first,
                "second_token_s": prefill_s + second,
                "prefill_rpc_s": prefill_s,
                "decode_leg_s": first,
                "request_id": rid,
            }

        calls = {
            "engine": run_engine,
            "local": run_local,
            "disagg_shm": lambda: run_disagg("disagg_shm"),
            "disagg_grpc": lambda: run_disagg("disagg_grpc"),
        }
        for path in PATHS:  # warm-up
            calls[path]()
        rounds: dict[str, list[dict]] = {path: [] for path in PATHS}
        for _ in range(args.repeats):
            for path in PATHS:
                rounds[path].append(calls[path]())
        pulls = {**dec_shm.imports(), **dec_grpc.imports()}
        for path in ("disagg_shm", "disagg_grpc"):
            for row in rounds[path]:
                transport, nbytes, ms = pulls.get(row["request_id"], ("?", 0, float("nan")))
                row.update(pull_transport=transport, pull_bytes=nbytes, pull_s=ms / 1000)
        report = summarize(args, model, rounds)
    finally:
        for channel in channels:
            channel.close()
        for w in workers:
            w.stop()
    print_report(report)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.keep_logs:
        print(f"worker logs: {logs}")
    return 0


def summarize(args, model: Path, rounds: dict[str, list[dict]]) -> dict:
    def med(path: str, key: str) -> float | None:
        values = [r[key] for r in rounds[path] if key in r]
        return statistics.median(values) if values else None

    paths = {}
    for path in PATHS:
        paths[path] = {
            key: med(path, key)
            for key in (
                "ttft_s",
                "second_token_s",
                "prefill_rpc_s",
                "decode_leg_s",
                "pull_s",
                "pull_bytes",
                "decode_step_s",
            )
            if med(path, key) is not None
        }
        if rounds[path] and "pull_transport" in rounds[path][0]:
            paths[path]["pull_transport"] = rounds[path][0]["pull_transport"]
    added = {}
    for path in ("disagg_shm", "disagg_grpc"):
        diffs = [
            d["ttft_s"] - loc["ttft_s"]
            for d, loc in zip(rounds[path], rounds["local"], strict=True)
        ]
        added[path] = {
            # Decode call -> first token: pull, commit and (as the engine streams the imported
            # first token with the first decode step's) one decode step
            "decode_leg_median_s": paths[path]["decode_leg_s"],
            "vs_local_median_s": statistics.median(diffs),
            "vs_engine_median_s": paths[path]["ttft_s"] - paths["engine"]["ttft_s"],
        }
    return {
        "model": str(model),
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "paths": paths,
        "added_latency": added,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }


def print_report(report: dict) -> None:
    print(
        f"{report['prompt_tokens']}-token prompt, {Path(report['model']).name}, "
        f"{report['repeats']} rounds (medians); load {report['load_average'][0]:.1f}"
    )
    print(
        f"{'path':<13}{'TTFT ms':>9}{'2nd tok ms':>11}{'prefill ms':>11}{'decode leg':>11}"
        f"{'KV pull ms':>11}"
    )
    for path, row in report["paths"].items():

        def ms(key: str, row=row) -> str:
            return f"{row[key] * 1e3:.1f}" if key in row else "-"

        print(
            f"{path:<13}{ms('ttft_s'):>9}{ms('second_token_s'):>11}{ms('prefill_rpc_s'):>11}"
            f"{ms('decode_leg_s'):>11}{ms('pull_s'):>11}"
        )
    step = report["paths"]["local"].get("decode_step_s")
    if step is not None:
        print(f"one decode step (local, 2nd - 1st token): {step * 1e3:.1f} ms")
    for path, a in report["added_latency"].items():
        print(
            f"{path}: decode leg (Decode call -> first token) {a['decode_leg_median_s'] * 1e3:.1f}"
            f" ms; TTFT vs local prefill {a['vs_local_median_s'] * 1e3:+.1f} ms (per-round "
            f"median), vs in-process engine {a['vs_engine_median_s'] * 1e3:+.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
