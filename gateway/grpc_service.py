"""The gateway's gRPC front door: protobuf in, core objects, protobuf out."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gateway.core import GatewayCore
from gateway.errors import ErrorKind, GatewayError, invalid
from gateway.schema import (
    ChatMessage,
    ChatPrompt,
    ChoiceDelta,
    GenerateRequest,
    GenerationParams,
    Prompt,
    TextPrompt,
    TokenPrompt,
)
from gateway.version import VERSION
from protos.pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
STATUS_CODES = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FINISH = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
# Optional scalar fields copied from GenerationParams (proto) to GenerationParams (core).
_OPTIONAL_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "logprobs",
    "skip_special_tokens",
    "n",
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            run = self._core.open(generate_request_from_proto(request, context.time_remaining()))
        except GatewayError as exc:
            await context.abort(STATUS_CODES[exc.kind], exc.message)
        first = True
        try:
            async for delta in run.stream():
                message = delta_message(run.request_id, delta)
                if first:
                    message.prompt_token_ids.extend(run.prompt_ids)
                    first = False
                yield message
        except GatewayError as exc:
            await context.abort(STATUS_CODES[exc.kind], exc.message)
        u = run.usage
        yield gateway_pb2.GenerateResponse(
            request_id=run.request_id,
            usage=common_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cached_prompt_tokens=u.cached_tokens,
            ),
        )

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return gateway_pb2.GatewayAbortResponse(aborted=self._core.abort(request.request_id))

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        core = self._core
        return gateway_pb2.ModelInfo(
            model=core.config.model_name,
            max_model_len=core.max_model_len,
            vocab_size=core.tokenizer.vocab_size,
            eos_token_ids=list(core.tokenizer.eos_token_ids),
            max_n=core.limits.max_n,
            max_logprobs=core.limits.max_logprobs,
            version=VERSION,
            has_chat_template=core.tokenizer.has_chat_template,
        )


def generate_request_from_proto(request: Any, timeout_s: float | None) -> GenerateRequest:
    return GenerateRequest(
        prompt=_prompt_from_proto(request),
        params=_params_from_proto(request.params),
        request_id=request.request_id or None,
        timeout_s=timeout_s,
    )


def _prompt_from_proto(request: Any) -> Prompt:
    which = request.WhichOneof("prompt")
    if which == "text":
        return TextPrompt(request.text)
    if which == "token_ids":
        return TokenPrompt(tuple(request.token_ids.ids))
    if which == "chat":
        chat = request.chat
        messages = tuple(ChatMessage(m.role, m.content) for m in chat.messages)
        add = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        return ChatPrompt(messages, add)
    raise invalid("a prompt is required: text, token_ids or chat", "prompt")


def _params_from_proto(message: Any) -> GenerationParams:
    values: dict[str, Any] = {
        name: getattr(message, name) for name in _OPTIONAL_FIELDS if message.HasField(name)
    }
    values["stop"] = tuple(message.stop)
    values["stop_token_ids"] = tuple(message.stop_token_ids)
    return GenerationParams(**values)


def delta_message(request_id: str, delta: ChoiceDelta) -> Any:
    message = gateway_pb2.GenerateResponse(
        request_id=request_id,
        index=delta.index,
        token_ids=delta.token_ids,
        text=delta.text,
        finish_reason=_FINISH[delta.finish_reason],
    )
    for lp in delta.logprobs or ():
        entry = message.logprobs.add(logprob=lp.logprob)
        for token_id, logprob in lp.top:
            entry.top_logprobs.add(token_id=token_id, logprob=logprob)
    if isinstance(delta.stop_reason, str):
        message.stop_reason = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        message.stop_token_id = delta.stop_reason
    return message


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """With --api-key, every Gateway call needs `authorization: Bearer <key>` metadata, compared
    in constant time (the same key as /v1/*); health and reflection stay open, like /health."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key")

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.response_streaming
        else grpc.unary_unary_rpc_method_handler
    )
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def start_grpc_server(
    core: GatewayCore, host: str, port: int
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Gateway + grpc.health.v1 + reflection on host:port (0: a free port)."""
    api_key = core.config.api_key
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(api_key)] if api_key else None)
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC port {host}:{port}")
    await server.start()
    await set_health(health, serving=True)
    return server, bound, health


async def set_health(health: health_aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else (health_pb2.HealthCheckResponse.NOT_SERVING)
    )
    for name in ("", SERVICE_NAME):
        await health.set(name, status)
