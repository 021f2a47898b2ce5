"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.core import GatewayCore
from gateway.openai.choices import ChoiceResult, collect, usage_body
from gateway.openai.common import ResponseMeta, check_model, open_runs
from gateway.openai.logprobs import chat_logprobs
from gateway.openai.protocol import ChatCompletionRequest
from gateway.openai.streaming import DONE, merged, sse, start_sse, unless_disconnected
from gateway.request_run import RequestRun
from gateway.schema import ChatPrompt, GenerateRequest


async def create_chat_completion(
    core: GatewayCore, body: ChatCompletionRequest, request: Request
) -> Response:
    check_model(core, body.model)
    params = body.to_params()
    prompt = ChatPrompt(body.chat_messages(), body.add_generation_prompt)
    runs = await open_runs(core, [GenerateRequest(prompt, params)])
    meta = ResponseMeta.new("chatcmpl", core.config.model_name)
    if body.stream:
        return await start_sse(request, _events(core, meta, runs[0], body.include_usage))
    results = await unless_disconnected(request, collect(merged(runs), params.n, 1))
    return JSONResponse(_response_body(core, meta, runs[0], results))


def _response_body(
    core: GatewayCore, meta: ResponseMeta, run: RequestRun, results: Sequence[ChoiceResult]
) -> dict[str, Any]:
    want_logprobs = run.params.logprobs is not None
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(core.tokenizer, c.logprobs) if want_logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in results
    ]
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_body([run]),
    }


async def _events(
    core: GatewayCore, meta: ResponseMeta, run: RequestRun, include_usage: bool
) -> AsyncIterator[str]:
    """Per choice: a role chunk when its first delta arrives, then content, then the finish."""
    want_logprobs = run.params.logprobs is not None
    head = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
    }
    started: set[int] = set()
    async for _, delta in merged([run]):
        if delta.index not in started:
            started.add(delta.index)
            role = {
                "index": delta.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield sse({**head, "choices": [role], "usage": None})
        if not (delta.text or delta.finish_reason or (want_logprobs and delta.token_ids)):
            continue
        choice = {
            "index": delta.index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": chat_logprobs(core.tokenizer, delta.logprobs or ())
            if want_logprobs
            else None,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        yield sse({**head, "choices": [choice], "usage": None})
    if include_usage:
        yield sse({**head, "choices": [], "usage": usage_body([run])})
    yield DONE
