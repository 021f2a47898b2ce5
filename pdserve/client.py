"""Typed Python client for the gateway's gRPC API, sync and asyncio.

    from pdserve.client import GatewayClient, GenerationOptions

    with GatewayClient("127.0.0.1:50051") as client:
        result = client.generate("The capital of France is", GenerationOptions(max_tokens=8))
        print(result.text)
        with client.stream("Once upon a time", GenerationOptions(max_tokens=64)) as stream:
            for chunk in stream:          # stream.cancel() aborts the request on every worker
                print(chunk.text, end="")

`AsyncGatewayClient` has the same methods as coroutines / async iterators. Failures raise
`GatewayCallError` with the gRPC status code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).
Callers never touch the generated stubs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import grpc

from contract.structured import StructuredOutputs
from protos.pdserve.v1 import gateway_pb2, gateway_pb2_grpc
from rpc.auth import bearer_metadata
from rpc.finish import finish_reason_from_pb
from rpc.logprobs import token_logprobs_from_pb
from rpc.sampling import fields_to_pb

DEFAULT_ADDRESS = "127.0.0.1:50051"
Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, str]]


@dataclass(slots=True, frozen=True)
class GenerationOptions:
    """Generation parameters (vLLM names); None means the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool | None = None
    n: int | None = None
    structured_outputs: StructuredOutputs | None = None  # json / regex / choice / grammar
    prompt_logprobs: int | None = None  # top-N per prompt token (0: the prompt token's alone)
    allowed_token_ids: tuple[int, ...] = ()  # non-empty: only these tokens may be sampled
    logit_bias: Mapping[int, float] | None = None  # token id -> bias added to its logit
    bad_words: tuple[str, ...] = ()  # words the output never contains


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-N alternatives
    rank: int | None = None  # the token's 1-based rank (set for prompt logprobs)


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, frozen=True)
class GenerationChunk:
    """One streamed delta of one choice; the final message of a stream carries only `usage`."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None
    prompt_token_ids: tuple[int, ...] = ()  # on the first chunk only
    usage: Usage | None = None  # on the last message only
    # With prompt_logprobs: on each choice's first chunk, prompt tokens 1.. (not the first).
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True)
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1..


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    usage: Usage | None

    @property
    def text(self) -> str:
        """The first choice's text."""
        return self.choices[0].text


@dataclass(slots=True, frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_n: int
    max_logprobs: int
    version: str
    has_chat_template: bool


class GatewayCallError(Exception):
    """A gateway call failed; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


# -- sync ---------------------------------------------------------------------------------------


class GenerationStream:
    """Iterate for chunks; `cancel()` (or leaving the `with` block early) aborts the request."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[GenerationChunk]:
        prompt_ids: list[int] = []  # from the first message: names the prompt logprobs' tokens
        try:
            for message in self._call:
                prompt_ids = prompt_ids or list(message.prompt_token_ids)
                yield _chunk(message, prompt_ids)
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class GatewayClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        api_key: str | None = None,  # the gateway's --api-key, sent as a Bearer token
    ) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout = timeout  # default deadline of every call, seconds
        self._metadata = bearer_metadata(api_key)

    def stream(
        self,
        prompt: Prompt | None = None,
        options: GenerationOptions | None = None,
        *,
        messages: Messages | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerationStream:
        request = build_request(prompt, messages, options, request_id)
        call = self._stub.Generate(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return GenerationStream(call)

    def generate(
        self,
        prompt: Prompt | None = None,
        options: GenerationOptions | None = None,
        *,
        messages: Messages | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        with self.stream(
            prompt, options, messages=messages, request_id=request_id, timeout=timeout
        ) as chunks:
            return aggregate(chunks)

    def abort(self, request_id: str) -> bool:
        request = gateway_pb2.GatewayAbortRequest(request_id=request_id)
        return self._unary(self._stub.Abort, request).aborted

    def model_info(self) -> ModelInfo:
        return _model_info(self._unary(self._stub.GetModelInfo, gateway_pb2.GetModelInfoRequest()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, rpc: Any, request: Any) -> Any:
        try:
            return rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc


# -- asyncio ------------------------------------------------------------------------------------


class AsyncGenerationStream:
    """`async for` for chunks; `cancel()` (or leaving `async with` early) aborts the request."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        prompt_ids: list[int] = []  # from the first message: names the prompt logprobs' tokens
        try:
            async for message in self._call:
                prompt_ids = prompt_ids or list(message.prompt_token_ids)
                yield _chunk(message, prompt_ids)
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncGatewayClient:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        api_key: str | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout = timeout
        self._metadata = bearer_metadata(api_key)

    def stream(
        self,
        prompt: Prompt | None = None,
        options: GenerationOptions | None = None,
        *,
        messages: Messages | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerationStream:
        request = build_request(prompt, messages, options, request_id)
        call = self._stub.Generate(
            request, timeout=timeout or self._timeout, metadata=self._metadata
        )
        return AsyncGenerationStream(call)

    async def generate(
        self,
        prompt: Prompt | None = None,
        options: GenerationOptions | None = None,
        *,
        messages: Messages | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        async with self.stream(
            prompt, options, messages=messages, request_id=request_id, timeout=timeout
        ) as stream:
            return aggregate([chunk async for chunk in stream])

    async def abort(self, request_id: str) -> bool:
        request = gateway_pb2.GatewayAbortRequest(request_id=request_id)
        return (await self._unary(self._stub.Abort, request)).aborted

    async def model_info(self) -> ModelInfo:
        message = await self._unary(self._stub.GetModelInfo, gateway_pb2.GetModelInfoRequest())
        return _model_info(message)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, rpc: Any, request: Any) -> Any:
        try:
            return await rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _call_error(exc) from exc


# -- conversions ----------------------------------------------------------------------------------


def build_request(
    prompt: Prompt | None,
    messages: Messages | None,
    options: GenerationOptions | None,
    request_id: str | None,
) -> Any:
    """The GenerateRequest message: exactly one of a text / token-id prompt or chat messages."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text or token ids) or messages")
    request = gateway_pb2.GenerateRequest(request_id=request_id or "")
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt is not None:
        request.token_ids.ids.extend(int(t) for t in prompt)
    else:
        for m in messages or ():
            request.chat.messages.add(role=m["role"], content=m["content"])
        request.chat.SetInParent()
    _fill_params(request.params, options or GenerationOptions())
    return request


def _fill_params(message: Any, options: GenerationOptions) -> None:
    fields_to_pb(message, {f.name: getattr(options, f.name) for f in fields(options)})


def aggregate(chunks: Any) -> GenerationResult:
    """Fold a stream of chunks into whole choices."""
    request_id, prompt_ids, usage = "", [], None
    choices: dict[int, Choice] = {}
    for chunk in chunks:
        request_id = chunk.request_id
        prompt_ids = prompt_ids or list(chunk.prompt_token_ids)
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        choice = choices.setdefault(chunk.index, Choice(chunk.index))
        choice.text += chunk.text
        choice.token_ids.extend(chunk.token_ids)
        choice.logprobs.extend(chunk.logprobs)
        choice.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = chunk.finish_reason, chunk.stop_reason
    ordered = [choices[i] for i in sorted(choices)]
    return GenerationResult(request_id, prompt_ids, ordered, usage)


def _chunk(message: Any, prompt_ids: list[int]) -> GenerationChunk:
    usage = None
    if message.HasField("usage"):
        u = message.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    stop_reason: str | int | None = message.stop_reason or None
    if message.HasField("stop_token_id"):
        stop_reason = message.stop_token_id
    logprobs = _token_logprobs(message.token_ids, message.logprobs)
    prompt_logprobs = ()
    if len(message.prompt_logprobs):
        prompt_logprobs = _token_logprobs(prompt_ids[1:], message.prompt_logprobs)
    return GenerationChunk(
        request_id=message.request_id,
        index=message.index,
        token_ids=tuple(message.token_ids),
        text=message.text,
        logprobs=logprobs,
        finish_reason=finish_reason_from_pb(message.finish_reason),
        stop_reason=stop_reason,
        prompt_token_ids=tuple(message.prompt_token_ids),
        usage=usage,
        prompt_logprobs=prompt_logprobs,
    )


def _token_logprobs(token_ids: Any, messages: Any) -> tuple[TokenLogprob, ...]:
    return tuple(token_logprobs_from_pb(token_ids, messages, TokenLogprob))


def _model_info(m: Any) -> ModelInfo:
    return ModelInfo(
        m.model,
        m.max_model_len,
        m.vocab_size,
        tuple(m.eos_token_ids),
        m.max_n,
        m.max_logprobs,
        m.version,
        m.has_chat_template,
    )


def _call_error(exc: grpc.RpcError) -> GatewayCallError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return GatewayCallError(code, details or "")
