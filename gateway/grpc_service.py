"""The gateway's gRPC front door: protobuf in, core objects, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from gateway.core import GatewayCore
from gateway.errors import GatewayError, invalid
from gateway.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from gateway.schema import (
    ChatMessage,
    ChatPrompt,
    ChoiceDelta,
    GenerateRequest,
    GenerationParams,
    Prompt,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
)
from gateway.version import VERSION
from protos.pdserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from rpc import finish as finish_reasons
from rpc.auth import BearerTokenInterceptor
from rpc.sampling import fields_from_pb
from rpc.server import RunningServer, ServerOptions, start_server
from rpc.status import grpc_code

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, core: GatewayCore) -> None:
        self._core = core

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            run = await self._core.open(
                generate_request_from_proto(
                    request, context.time_remaining(), self._core.sampling_defaults
                )
            )
        except GatewayError as exc:
            await context.abort(grpc_code(exc.kind), exc.message)
        first = True
        try:
            async for delta in run.stream():
                message = delta_message(run.request_id, delta)
                if first:
                    message.prompt_token_ids.extend(run.prompt_ids)
                    first = False
                yield message
        except GatewayError as exc:
            await context.abort(grpc_code(exc.kind), exc.message)
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


def generate_request_from_proto(
    request: Any, timeout_s: float | None, defaults: SamplingDefaults = NO_DEFAULTS
) -> GenerateRequest:
    return GenerateRequest(
        prompt=_prompt_from_proto(request),
        params=_params_from_proto(request.params, defaults),
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


def _params_from_proto(message: Any, defaults: SamplingDefaults = NO_DEFAULTS) -> GenerationParams:
    """The fields the client set; unset ones take `defaults` (the OpenAI routes' rule too)."""
    return defaults.params(fields_from_pb(message))


def delta_message(request_id: str, delta: ChoiceDelta) -> Any:
    message = gateway_pb2.GenerateResponse(
        request_id=request_id,
        index=delta.index,
        token_ids=delta.token_ids,
        text=delta.text,
        finish_reason=finish_reasons.TO_PB[delta.finish_reason],
    )
    for lp in delta.logprobs or ():
        _add_logprobs(message.logprobs, lp)
    for lp in delta.prompt_logprobs or ():
        _add_logprobs(message.prompt_logprobs, lp)
    if isinstance(delta.stop_reason, str):
        message.stop_reason = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        message.stop_token_id = delta.stop_reason
    return message


def _add_logprobs(field: Any, lp: TokenLogprob) -> None:
    entry = field.add(logprob=lp.logprob, rank=lp.rank)
    for token_id, logprob in lp.top:
        entry.top_logprobs.add(token_id=token_id, logprob=logprob)


async def start_grpc_server(core: GatewayCore, host: str, port: int) -> RunningServer:
    """Gateway + grpc.health.v1 + reflection on host:port (0: a free port). With --api-key,
    every Gateway call needs `authorization: Bearer <key>` metadata (the same key as /v1/*);
    health and reflection stay open, like /health."""
    api_key = core.config.api_key
    interceptors = (
        [BearerTokenInterceptor(api_key, [SERVICE_NAME], "invalid or missing API key")]
        if api_key
        else None
    )

    def register(server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(core), server)
        return [SERVICE_NAME]

    options = ServerOptions(host=host, port=port, max_message_bytes=None, reuse_port=True)
    return await start_server(options, register, interceptors=interceptors)
