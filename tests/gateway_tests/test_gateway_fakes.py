"""Test support for the gateway: a tiny tokenizer folder, fake workers, a gateway harness.

The fake workers are real gRPC servers on 127.0.0.1 implementing worker.proto's services with
canned tokens, and they record every call so tests can check Abort/Release/fallback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from gateway.config import GatewayConfig
from gateway.server import GatewayServer
from protos.pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = [("h", "e"), ("l", "l"), ("Ġ", "w"), ("o", "r"), ("he", "ll"), ("Ġw", "or")]
REPLY = "Hello world! Ünïcödé ✓ done."  # multi-byte characters span byte-level tokens


def build_tiny_model_folder(folder: Path, max_position_embeddings: int = 256) -> Path:
    """A byte-level BPE tokenizer (256 bytes + a few merges + ChatML specials) and configs."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(str(folder / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model = {
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": max_position_embeddings,
        "eos_token_id": eos,
    }
    (folder / "config.json").write_text(json.dumps(model))
    return folder


@dataclass
class CallLog:
    prefills: list = field(default_factory=list)
    releases: list = field(default_factory=list)
    decodes: list = field(default_factory=list)
    aborts: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)  # decode request ids whose stream was cancelled
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, value) -> None:
        with self.lock:
            getattr(self, name).append(value)


class FakeWorker:
    """Both worker services over one canned reply; behaviour knobs are plain attributes."""

    def __init__(self, role: str, reply_ids: list[int], eos_id: int) -> None:
        self.role = role
        self.reply_ids = reply_ids
        self.eos_id = eos_id
        self.calls = CallLog()
        self.token_delay_s = 0.0  # between decode chunks
        self.prefill_delay_s = 0.0
        self.load_delay_s = 0.0  # GetLoad sleeps this long first (a frozen worker: long)
        self.fail_with: grpc.StatusCode | None = None  # every Prefill/Decode fails with this
        self.queue_depth = 0
        self.kv_cache_usage = 0.0
        self.serving = True
        self.end_with_eos = False  # stop with EOS after the reply instead of running to length
        self.fail_after: int | None = None  # Decode dies (INTERNAL) after this many tokens
        self._server: grpc.Server | None = None
        self.address = ""

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> FakeWorker:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        worker_pb2_grpc.add_PrefillServiceServicer_to_server(_Prefill(self), self._server)
        worker_pb2_grpc.add_DecodeServiceServicer_to_server(_Decode(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    # -- behaviour ----------------------------------------------------------------------------
    def completion(self, max_tokens: int) -> tuple[list[int], int]:
        """Tokens to stream and the finish reason."""
        ids = list(self.reply_ids)
        if self.end_with_eos and len(ids) + 1 <= max_tokens:
            return ids + [self.eos_id], common_pb2.FINISH_REASON_STOP
        while len(ids) < max_tokens:
            ids += self.reply_ids
        return ids[:max_tokens], common_pb2.FINISH_REASON_LENGTH

    def load(self) -> common_pb2.LoadReport:
        return common_pb2.LoadReport(
            engine_id=f"fake-{self.role}",
            role=self.role,
            queue_depth=self.queue_depth,
            kv_cache_usage=self.kv_cache_usage,
            serving=self.serving,
            num_running=1,
            num_waiting=2,
            num_blocks=100,
        )


def _token_logprobs(sampling, token_id: int) -> common_pb2.TokenLogprobs:
    top = [
        common_pb2.Logprob(token_id=token_id + k, logprob=-0.5 - k)
        for k in range(sampling.logprobs)
    ]
    return common_pb2.TokenLogprobs(logprob=-0.5, top_logprobs=top)


def prompt_logprobs(role: str, request) -> list[common_pb2.TokenLogprobs]:
    """Made-up prompt logprobs, as a worker of `role` computes them: prompt token i + 1 at
    FAKE_PROMPT_LOGPROB[role] - i / 8 with rank i + 1; the top-N are token ids 0, 1, ..."""
    if not request.sampling.HasField("prompt_logprobs"):
        return []
    top = [
        common_pb2.Logprob(token_id=k, logprob=-0.25 * (k + 1))
        for k in range(request.sampling.prompt_logprobs)
    ]
    base = FAKE_PROMPT_LOGPROB[role]
    return [
        common_pb2.TokenLogprobs(logprob=base - i / 8, rank=i + 1, top_logprobs=top)
        for i in range(len(request.prompt_token_ids) - 1)
    ]


FAKE_PROMPT_LOGPROB = {"prefill": -1.0, "decode": -2.0}  # tells who computed them


class _Prefill(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: FakeWorker) -> None:
        self.w = worker

    def Prefill(self, request, context):
        self.w.calls.add("prefills", request)
        time.sleep(self.w.prefill_delay_s)
        if self.w.fail_with is not None:
            context.abort(self.w.fail_with, "fake prefill failure")
        first = self.w.reply_ids[0]
        handle = worker_pb2.KVHandle(
            engine_id="fake-prefill",
            transfer_id=request.transfer_id,
            num_tokens=len(request.prompt_token_ids),
            first_token=first,
            kv_endpoint=self.w.address,
            lease_ms=30000,
        )
        usage = common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=1)
        return worker_pb2.PrefillResponse(
            handle=handle, usage=usage, prompt_logprobs=prompt_logprobs("prefill", request)
        )

    def Release(self, request, context):
        self.w.calls.add("releases", request.transfer_id)
        return worker_pb2.ReleaseResponse(released=True)

    def GetLoad(self, request, context):
        time.sleep(self.w.load_delay_s)
        return self.w.load()


class _Decode(worker_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: FakeWorker) -> None:
        self.w = worker

    def Decode(self, request, context):
        self.w.calls.add("decodes", request)
        if self.w.fail_with is not None:
            context.abort(self.w.fail_with, "fake decode failure")
        context.add_callback(lambda: self.w.calls.add("cancelled", request.request_id))
        ids, reason = self.w.completion(request.sampling.max_tokens)
        want_lp = request.sampling.HasField("logprobs")
        for i, token_id in enumerate(ids):
            if not context.is_active():
                return
            if self.w.fail_after is not None and i == self.w.fail_after:
                context.abort(grpc.StatusCode.INTERNAL, "fake decode died mid-stream")
            if i and self.w.token_delay_s:
                time.sleep(self.w.token_delay_s)
            chunk = worker_pb2.DecodeChunk(token_ids=[token_id])
            if i == 0 and not request.HasField("kv_handle"):  # prefilled here
                chunk.prompt_logprobs.extend(prompt_logprobs("decode", request))
            if want_lp:
                chunk.logprobs.append(_token_logprobs(request.sampling, token_id))
            if i == len(ids) - 1:
                chunk.finish_reason = reason
                chunk.usage.CopyFrom(
                    common_pb2.Usage(
                        prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(ids)
                    )
                )
            yield chunk

    def Abort(self, request, context):
        self.w.calls.add("aborts", request.request_id)
        return worker_pb2.AbortResponse(aborted=True)

    def GetLoad(self, request, context):
        return self.w.load()


class GatewayHarness:
    """A GatewayServer on its own asyncio loop in a background thread (ports picked freely)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: GatewayServer = self.call(self._make(config))
        self.call(self.server.start())

    @staticmethod
    async def _make(config: GatewayConfig) -> GatewayServer:
        return GatewayServer(config, log_level="warning")

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def core(self):
        return self.server.core

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def poll(self) -> None:
        self.call(self.server.pool.poll_once())

    def settle(self) -> None:
        """Wait for background clean-up calls (Abort/Release) to finish."""
        self.call(self.server.core.drain_background())

    def close(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def make_config(folder: Path, prefill: list[FakeWorker], decode: list[FakeWorker], **kw):
    return GatewayConfig(
        model_path=folder,
        prefill_addresses=tuple(w.address for w in prefill),
        decode_addresses=tuple(w.address for w in decode),
        served_model_names=("tiny",),
        http_port=0,
        grpc_port=0,
        load_interval_s=kw.pop("load_interval_s", 30.0),  # tests poll explicitly
        **kw,
    )


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- tests of the support itself ----------------------------------------------------------------


def test_tiny_tokenizer_round_trips_multibyte_text(tmp_path):
    from gateway.tokenizer import GatewayTokenizer

    tok = GatewayTokenizer(build_tiny_model_folder(tmp_path))
    ids = tok.encode(REPLY)
    assert tok.decode(ids) == REPLY
    assert len(ids) > len("Hello")  # merges exist but most bytes stay single tokens
    assert tok.eos_token_ids == (tok._tok.token_to_id("<|im_end|>"),)


def test_fake_worker_streams_reply_then_length(tmp_path):
    worker = FakeWorker("decode", [5, 6, 7], eos_id=1).start()
    try:
        stub = worker_pb2_grpc.DecodeServiceStub(grpc.insecure_channel(worker.address))
        request = worker_pb2.DecodeRequest(
            request_id="r", prompt_token_ids=[1], sampling=common_pb2.SamplingParams(max_tokens=4)
        )
        chunks = list(stub.Decode(request, timeout=5))
    finally:
        worker.stop()
    assert [c.token_ids[0] for c in chunks] == [5, 6, 7, 5]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
